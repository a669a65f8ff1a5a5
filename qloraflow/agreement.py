"""Is the served model the merged model? Every served token against the merged model's own greedy choice.

Comparing answer texts with HF ``generate`` says little on its own: vLLM and HF run the same bf16
weights through different kernels, and a greedy answer of 80 tokens flips wherever two tokens are
within rounding of each other (SmolLM2-135M on 32 Spider prompts: 16 of 32 answers differ, every
first difference at a margin of at most 0.13 logits, half of them where float32 sides with vLLM).
So the check here teacher-forces the merged model in float32 (the exact arithmetic of its saved
weights) on each prompt followed by the served answer's token ids and asks, at every served token,
how far below the merged model's top logit it is::

    from qloraflow.agreement import check_served_tokens
    check = check_served_tokens(model_fp32, tokenizer, {rid: prompt}, {rid: served_ids}, "bfloat16")
    check["passed"], check["worst_margin_ulps"], check["answers"][rid]["first_divergence"]

Criterion: a served token passes when it is the float32 argmax, or its logit is within
``NEAR_TIE_ULPS`` units in the last place of the served dtype (at the top logit's magnitude) below
the argmax's (at least ``RELATIVE_FLOOR`` of that logit, for float32 servers). A bf16 server rounds the final logits to that grid (0.125 at logits of 16-32), so two
tokens closer than a few steps of it can come out in either order on any bf16 implementation (the
measured flips sat within 1.1 of them, see README "A real model on the CPU"); a served model with
other weights (another adapter, the base instead of the merge, a wrong template or BOS) picks tokens
that the merged model puts logits below its choice, tens to hundreds of steps
(tests/test_deploy.py's negative control). Checking every token, not only the first difference,
keeps the check sharp after a legitimate flip: the rest of the answer is again held to the merged
model's choice given the served prefix.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from qloraflow.precision import DTYPES, ulp

NEAR_TIE_ULPS = 4.0
"""A served token may be this many units in the last place (of the served dtype, at the top logit)
below the merged model's float32 choice; see the module docstring for why."""
RELATIVE_FLOOR = 1e-4
"""...or this fraction of the top logit's magnitude: a float32 server rounds its logits far more finely
than its kernels, which sum in another order than HF's, agree (about 1e-6 to 1e-5 of a logit after 30
layers), so its near-tie scale is set by that instead of by its ulp."""


def served_dtype(serve_dtype: str, model_config: Mapping[str, Any]) -> str:
    """The dtype the server computes in: ``serve.dtype``, or the saved one for ``auto`` (vLLM's rule).

    Raises:
        ValueError: naming the dtype when it is none of bfloat16, float16, float32.
    """
    name = serve_dtype
    if name == "auto":
        name = str(model_config.get("dtype") or model_config.get("torch_dtype") or "float32")
    name = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"served dtype {serve_dtype!r} (resolved {name!r}) is not one of {sorted(DTYPES)}; "
                         "set serve.dtype to bfloat16, float16 or float32")
    return name


@torch.no_grad()
def token_margins(model: Any, prompt_ids: Sequence[int], answer_ids: Sequence[int]) -> dict[str, torch.Tensor]:
    """The model's top token, its logit and the answer token's logit at every answer position, teacher-forced."""
    ids = torch.tensor([list(prompt_ids) + list(answer_ids)], device=model.device)
    n = len(answer_ids)
    # Positions len(prompt)-1 ... end-1 predict the answer's tokens.
    logits = model(input_ids=ids, logits_to_keep=n + 1).logits[0, :n].float()
    target = torch.tensor(list(answer_ids), device=logits.device)
    top = logits.max(-1)
    return {"top_id": top.indices.cpu(), "top": top.values.cpu(),
            "answer": logits.gather(1, target[:, None])[:, 0].cpu()}


def check_answer(model: Any, tokenizer: Any, prompt_ids: Sequence[int], answer_ids: Sequence[int],
                 dtype_name: str, near_tie_ulps: float = NEAR_TIE_ULPS) -> dict[str, Any]:
    """One served answer against the merged model (see the module docstring).

    Returns:
        ``{"tokens", "argmax_tokens", "passed", "worst_margin", "worst_margin_ulps", "first_divergence"}``;
        ``first_divergence`` is None when every served token is the argmax, else ``{"position",
        "served_token", "merged_token", "margin", "margin_ulps", "near_tie"}`` (margins in float32 logits).
    """
    if not answer_ids:
        return {"tokens": 0, "argmax_tokens": 0, "passed": True, "worst_margin": 0.0, "worst_margin_ulps": 0.0,
                "first_divergence": None}
    m = token_margins(model, prompt_ids, answer_ids)
    margin = m["top"] - m["answer"]
    step = torch.maximum(ulp(m["top"], DTYPES[dtype_name]), RELATIVE_FLOOR / near_tie_ulps * m["top"].abs())
    ulps = margin / step
    differs = (m["top_id"] != torch.tensor(list(answer_ids))).nonzero().flatten().tolist()
    first = None
    if differs:
        k = differs[0]
        first = {"position": k, "served_token": tokenizer.decode([answer_ids[k]]),
                 "merged_token": tokenizer.decode([int(m["top_id"][k])]), "margin": float(margin[k]),
                 "margin_ulps": float(ulps[k]), "near_tie": bool(ulps[k] <= near_tie_ulps)}
    worst = int(ulps.argmax())
    return {"tokens": len(answer_ids), "argmax_tokens": len(answer_ids) - len(differs),
            "passed": bool(ulps.max() <= near_tie_ulps), "worst_margin": float(margin[worst]),
            "worst_margin_ulps": float(ulps[worst]), "first_divergence": first}


def check_served_tokens(model: Any, tokenizer: Any, prompts: Mapping[str, str],
                        served_ids: Mapping[str, Sequence[int]], dtype_name: str,
                        near_tie_ulps: float = NEAR_TIE_ULPS) -> dict[str, Any]:
    """Every served answer's tokens against the merged model's float32 greedy choice, by record id.

    Args:
        model: The merged model, loaded in float32 (``load_reference``).
        tokenizer: Its tokenizer (the one saved with it); prompts are encoded as evaluation encodes them
            (``add_special_tokens=False``: the chat template writes its own special tokens).
        prompts: ``{record id: prompt rendered with the chat template}``.
        served_ids: ``{record id: the server's answer token ids}`` (the stop token included when it stopped).
        dtype_name: The dtype the server computed in (:func:`served_dtype`): sets the near-tie scale.
        near_tie_ulps: See :data:`NEAR_TIE_ULPS`.

    Returns:
        ``{"passed", "near_tie_ulps", "served_dtype", "n", "answers_all_argmax", "tokens", "argmax_tokens",
        "worst_margin", "worst_margin_ulps", "failed": [ids], "answers": {id: check_answer(...)}}``.

    Raises:
        KeyError: a served answer has no prompt (its id named).
    """
    missing = sorted(set(served_ids) - set(prompts))
    if missing:
        raise KeyError(f"served answers {missing[:5]} have no prompt among the {len(prompts)} given")
    answers = {}
    for rid, ids in served_ids.items():
        prompt_ids = tokenizer(prompts[rid], add_special_tokens=False)["input_ids"]
        answers[rid] = check_answer(model, tokenizer, prompt_ids, list(ids), dtype_name, near_tie_ulps)
    worst = max(answers.values(), key=lambda a: a["worst_margin_ulps"], default=None)
    return {
        "passed": all(a["passed"] for a in answers.values()) and bool(answers),
        "near_tie_ulps": near_tie_ulps, "served_dtype": dtype_name, "n": len(answers),
        "answers_all_argmax": sum(a["first_divergence"] is None for a in answers.values()),
        "tokens": sum(a["tokens"] for a in answers.values()),
        "argmax_tokens": sum(a["argmax_tokens"] for a in answers.values()),
        "worst_margin": worst["worst_margin"] if worst else None,
        "worst_margin_ulps": worst["worst_margin_ulps"] if worst else None,
        "failed": [rid for rid, a in answers.items() if not a["passed"]],
        "answers": answers,
    }


def load_reference(model_dir: str, device: Optional[str] = None) -> tuple[Any, Any]:
    """The merged model in float32 (its saved 16-bit weights, exactly) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qloraflow.precision import accelerator

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 device_map={"": device or accelerator()}).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def check_served_model(model_dir: str, serve_dtype: str, prompts: Mapping[str, str],
                       served_ids: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """:func:`check_served_tokens` of a served model folder: loads it in float32, checks, frees it.

    Args:
        model_dir: The folder the server served (config, weights, tokenizer).
        serve_dtype: ``serve.dtype`` as the server was given it (``auto``: the folder's saved dtype).
        prompts: ``{record id: rendered prompt}``.
        served_ids: ``{record id: served answer token ids}``; with none (the server gave no token ids)
            the check does not pass and says why.
    """
    import json
    from pathlib import Path

    from qloraflow.precision import release_memory

    dtype_name = served_dtype(serve_dtype, json.loads((Path(model_dir) / "config.json").read_text()))
    if not served_ids:
        return {"passed": False, "served_dtype": dtype_name, "n": 0, "failed": [], "answers": {},
                "error": "the server returned no token ids (logprobs with return_tokens_as_token_ids)"}
    model, tokenizer = load_reference(model_dir)
    try:
        return check_served_tokens(model, tokenizer, prompts, served_ids, dtype_name)
    finally:
        del model
        release_memory()


def annotate_mismatches(agreement: dict[str, Any], check: Mapping[str, Any]) -> dict[str, Any]:
    """``compare_with_hf``'s mismatches, each with where the served answer left the merged model's choice.

    Adds to every mismatch ``first_divergence`` (see :func:`check_answer`) and ``worst_margin_ulps``,
    and to ``agreement`` ``near_tie_mismatches``: how many mismatching answers passed the token check.
    """
    answers = check.get("answers", {})
    for m in agreement["mismatches"]:
        a = answers.get(m["id"]) or {}
        m["first_divergence"] = a.get("first_divergence")
        m["worst_margin_ulps"] = a.get("worst_margin_ulps")
    agreement["near_tie_mismatches"] = sum(bool((answers.get(m["id"]) or {}).get("passed"))
                                           for m in agreement["mismatches"])
    return agreement
