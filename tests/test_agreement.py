"""The served-vs-merged token check on a real tiny model (transformers and peft, no server).

The answers checked here are HF greedy generations, of the model itself (must pass: every token is
its own argmax) and of the same model with another adapter merged in (must fail: a served model with
other weights). The vLLM side is in tests/test_serve.py (the same check on the server's token ids).
"""

from __future__ import annotations

import pytest
import torch

from qloraflow.agreement import (NEAR_TIE_ULPS, RELATIVE_FLOOR, annotate_mismatches, check_answer, check_served_tokens,
                                 served_dtype)
from qloraflow.precision import ulp
from qloraflow.serve import compare_with_hf

QUESTIONS = ["how many customers live in Paris?", "list every order", "count the customers in Rome"]


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # init_lora_weights=False: B is random too, so the other adapter changes the model (as another run's would).
    other = get_peft_model(other, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                             init_lora_weights=False)).merge_and_unload().eval()
    prompts = {str(k): tokenizer.apply_chat_template([{"role": "user", "content": f"Write an SQLite query: {q}"}],
                                                     add_generation_prompt=True, tokenize=False)
               for k, q in enumerate(QUESTIONS)}
    return model, other, tokenizer, prompts


@torch.no_grad()
def greedy_ids(model, tokenizer, prompt: str, n: int = 12) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_the_models_own_greedy_tokens_pass_and_another_adapters_fail(models):
    model, other, tokenizer, prompts = models
    own = {rid: greedy_ids(model, tokenizer, p) for rid, p in prompts.items()}
    foreign = {rid: greedy_ids(other, tokenizer, p) for rid, p in prompts.items()}
    assert own != foreign  # the other adapter changes the answers, so the check has something to catch

    ok = check_served_tokens(model, tokenizer, prompts, own, "bfloat16")
    assert ok["passed"] and ok["failed"] == [] and ok["answers_all_argmax"] == ok["n"] == len(prompts)
    assert ok["argmax_tokens"] == ok["tokens"] == 12 * len(prompts) and ok["worst_margin_ulps"] <= 1e-6

    # Negative control: the served model had other weights. Far beyond a near-tie, even at bf16's coarse scale.
    bad = check_served_tokens(model, tokenizer, prompts, foreign, "bfloat16")
    assert not bad["passed"] and bad["failed"]
    assert bad["worst_margin_ulps"] > 4 * NEAR_TIE_ULPS
    first = next(a["first_divergence"] for a in bad["answers"].values() if a["first_divergence"])
    assert first["served_token"] != first["merged_token"] and first["margin"] > 0


def test_a_flip_within_a_near_tie_passes_and_a_wider_one_fails(models):
    """The criterion at one position: the runner-up token is accepted only when it is within the near-tie scale."""
    model, _other, tokenizer, prompts = models
    prompt_ids = tokenizer(prompts["0"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids])).logits[0, -1].float()
    top2 = torch.topk(logits, 2)
    runner_up, gap = int(top2.indices[1]), float(top2.values[0] - top2.values[1])
    top = top2.values[:1]
    flipped = check_answer(model, tokenizer, prompt_ids, [runner_up], "bfloat16")
    d = flipped["first_divergence"]
    assert d["position"] == 0 and d["margin"] == pytest.approx(gap, abs=1e-5)
    assert flipped["argmax_tokens"] == 0
    # Passes exactly when the gap is within NEAR_TIE_ULPS bf16 ulps of the top logit.
    assert flipped["passed"] == d["near_tie"] == (gap <= NEAR_TIE_ULPS * float(ulp(top, torch.bfloat16)[0]))
    # At float32's scale (the relative floor) the same flip is a real difference unless the tie is that close.
    fp32 = check_answer(model, tokenizer, prompt_ids, [runner_up], "float32")
    assert fp32["passed"] == (gap <= max(NEAR_TIE_ULPS * float(ulp(top, torch.float32)[0]),
                                         RELATIVE_FLOOR * float(top.abs()[0])))
    # A token far down the list fails at either scale.
    last = int(logits.argmin())
    assert not check_answer(model, tokenizer, prompt_ids, [last], "bfloat16")["passed"]


def test_mismatches_are_annotated_with_where_the_served_answer_left_the_merged_model(models):
    model, other, tokenizer, prompts = models
    own = {rid: greedy_ids(model, tokenizer, p) for rid, p in prompts.items()}
    served = {**own, "1": greedy_ids(other, tokenizer, prompts["1"])}
    check = check_served_tokens(model, tokenizer, prompts, served, "bfloat16")
    agreement = annotate_mismatches(compare_with_hf({r: tokenizer.decode(i) for r, i in served.items()},
                                                    {r: tokenizer.decode(i) for r, i in own.items()}), check)
    assert [m["id"] for m in agreement["mismatches"]] == ["1"] and check["failed"] == ["1"]
    assert agreement["mismatches"][0]["first_divergence"]["near_tie"] is False
    assert agreement["near_tie_mismatches"] == 0


def test_served_dtype_follows_vllms_auto_rule_and_names_a_bad_one():
    assert served_dtype("auto", {"dtype": "bfloat16"}) == "bfloat16"
    assert served_dtype("auto", {"torch_dtype": "float16"}) == "float16"
    assert served_dtype("float32", {"dtype": "bfloat16"}) == "float32"
    with pytest.raises(ValueError, match="serve.dtype"):
        served_dtype("int8", {})
    with pytest.raises(KeyError, match="no prompt"):
        check_served_tokens(None, None, {}, {"x": [1]}, "bfloat16")
