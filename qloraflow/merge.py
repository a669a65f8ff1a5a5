"""Merge the adapter into 16-bit base weights, then prove the merged model equals base + adapter.

The base is loaded in the training compute dtype on the task's GPU (the CPU without one; never the
4-bit model: merging into quantised weights and saving would either fail or silently bake in
rounding), the adapter applied and folded in with ``merge_and_unload``, and the result saved as
safetensors with the tokenizer (and its chat template), a generation config whose EOS ids include the
template's end-of-turn token, and no ``quantization_config``::

    from qloraflow.merge import merge_and_verify, probe_rows
    info = merge_and_verify("base-model", "out/train/adapter", "out/merged", "bfloat16",
                            probe_rows("out/tok", 8))

:func:`verify_merge` checks the saved folder in two ways, each with a meaning that does not change
with the model's depth or the scale of its weights and logits:

1. **Weights, exactly, one tensor at a time.** Each merged tensor is compared with the base's tensor
   (in the compute dtype) plus the adapter's delta ``scaling * B @ A``, computed in float32 from the
   files. Rounding to bf16 moves a number by at most half a unit in the last place (ulp); PEFT may
   round twice (the delta, then the sum), so every element must lie within one ulp of the exact
   value plus one ulp of the delta. Tensors the adapter does not touch must be bit-identical to the
   base's. The bound is per element, so it is the same for 4 layers as for 80; an adapter scaled by
   1.5, one layer's delta left out, or another base all put elements many ulps away.
2. **Outputs, on held-out answers.** The next-token distributions of base + adapter (unmerged: the
   model evaluated as ``candidate``) and of the merged model, at the answer positions of
   ``merge.probe_samples`` test rows: the mean KL divergence and greedy (argmax) agreement. Their bound
   is measured in the same check: the merged model with every adapted weight moved one ulp up or down
   at random (one more rounding, twice the most an honest merge moves any weight) shows the KL and
   disagreement that bf16 rounding alone causes at this depth and logit scale. The merge passes
   when its KL is at most ``merge.kl_factor`` times that (KL grows with the square of a small
   perturbation: 4 allows twice the rounding noise) and it disagrees on at most twice as many
   positions plus one.

Only one 16-bit model is on the device at any time: the reference distributions are kept on the host
while the merged model is loaded, and the weight check streams tensors from the files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError

from qloraflow.checkpoint import MANIFEST, save_atomic
from qloraflow.errors import MergeVerificationError, QloraflowError
from qloraflow.paired import match_ids
from qloraflow.precision import DTYPES, accelerator, nudge_by_ulp, release_memory, ulp
from qloraflow.tokenize import IGNORE_INDEX


class MergeError(QloraflowError):
    """The merged model could not be written (disk full, unwritable folder)."""


def _folder_bytes(folder: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(f"*{suffix}"))


# ------------------------------------------------------------------------------------------- merge

def merge_adapter(base_model: str, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  dtype_name: str) -> dict[str, Any]:
    """Fold a LoRA adapter into the 16-bit base and save it atomically.

    Raises:
        MergeError: the disk filled up or the folder is not writable; nothing is left under ``out_dir``.
        MergeVerificationError: a merged tensor is not in the training dtype.
    """
    return _merge(base_model, adapter_dir, out_dir, dtype_name, probe=None)[0]


def merge_and_verify(base_model: str, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                     dtype_name: str, probe: list[dict], kl_factor: float = 4.0) -> dict[str, Any]:
    """:func:`merge_adapter`, then :func:`verify_merge` with the reference taken before the fold.

    The base + adapter model that is merged also gives the reference distributions, so the 16-bit base
    is read once. Returns the merge info with the check's numbers under ``verify``.
    """
    started = time.perf_counter()
    info, reference = _merge(base_model, adapter_dir, out_dir, dtype_name, probe)
    merged = time.perf_counter()
    info["verify"] = verify_merge(base_model, adapter_dir, out_dir, probe, dtype_name, kl_factor, reference)
    info.update(merge_seconds=round(merged - started, 1), verify_seconds=round(time.perf_counter() - merged, 1))
    return info


def load_adapted(base_model: str, adapter_dir: str | os.PathLike, dtype: torch.dtype) -> Any:
    """The 16-bit base with the adapter applied, unmerged, on the accelerator."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype, device_map={"": accelerator()})
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def _merge(base_model: str, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype_name: str,
           probe: Optional[list[dict]]) -> tuple[dict[str, Any], Optional[dict[str, torch.Tensor]]]:
    from transformers import AutoTokenizer

    dtype = DTYPES[dtype_name]
    model = load_adapted(base_model, adapter_dir, dtype)
    reference = next_token_logprobs(model, probe) if probe else None
    merged = model.merge_and_unload()
    wrong = sorted({str(p.dtype) for p in merged.parameters() if p.dtype != dtype})
    if wrong:
        raise MergeVerificationError(f"merged weights have dtypes {wrong}, expected {dtype}: refusing to save")
    merged.config.dtype = dtype
    if hasattr(merged.config, "quantization_config"):
        del merged.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    gen = merged.generation_config
    gen.eos_token_id = _eos_ids(tokenizer, gen.eos_token_id)
    gen.pad_token_id = tokenizer.pad_token_id

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    out_dir = Path(out_dir)
    try:
        save_atomic(out_dir, write)
    except (OSError, SafetensorError) as e:  # safetensors reports I/O failures as its own error type
        for leftover in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        raise MergeError(f"could not write the merged model to {out_dir}: {_io_reason(e)}; free space (it needs "
                         f"about {_param_bytes(merged) / 2**20:.0f} MiB) or choose another output folder") from e
    info = {"dtype": dtype_name, "bytes": _folder_bytes(out_dir),
            "base_bytes": _folder_bytes(Path(base_model)) if Path(base_model).is_dir() else None,
            "eos_token_id": gen.eos_token_id, "sha256": model_digest(out_dir)}
    # No paths in the file: it travels with the folder it describes (kept, copied, registered), so a
    # path of where the merge happened to write (a Flyte sandbox) would only go stale.
    (out_dir / "merge_info.json").write_text(json.dumps(info, indent=1))
    info["merged_dir"] = str(out_dir)
    del model, merged
    release_memory()
    return info, reference


def model_digest(folder: str | os.PathLike) -> str:
    """sha256 over a saved model's files, names and bytes; not the bookkeeping (paths, write times).

    Equal digests mean the same served model: weights, config, tokenizer and chat template. The
    registry keys on it, so re-merging the same adapter adds no version while any change does.
    """
    folder, h = Path(folder), hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ("merge_info.json", MANIFEST)):
        h.update(f"{f.relative_to(folder).as_posix()}\0{f.stat().st_size}\0".encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _io_reason(e: Exception) -> str:
    code = getattr(e, "errno", None)
    if code is None:  # SafetensorError: "I/O error: No space left on device (os error 28)"
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else None
    return {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file size limit was reached",
            errno.EDQUOT: "the disk quota is exceeded"}.get(code, str(e))


def _param_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _eos_ids(tokenizer: Any, current: Any) -> list[int]:
    """EOS plus the chat template's end-of-turn token, so generation stops where training taught it."""
    ids = set(current if isinstance(current, list) else [current] if current is not None else [])
    ids.add(tokenizer.eos_token_id)
    for marker in ("<|im_end|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and marker in (tokenizer.chat_template or ""):
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


# ------------------------------------------------------------------------------------------ probes

def probe_rows(tok_dir: str | os.PathLike, n: int, max_positions: int = 256) -> list[dict]:
    """The first ``n`` tokenized test rows and, in each, the positions whose next token is an answer token.

    Returns:
        ``[{"id": ..., "input_ids": [...], "positions": [...]}]``: position ``t`` predicts token ``t + 1``;
        ``id`` is the row's record id (``#2``, ``#3`` ... after it for a record's later turns; the row's
        number for a split tokenized without ids).
    """
    import datasets

    rows = datasets.load_from_disk(str(Path(tok_dir) / "test"))
    rows = rows.select_columns([c for c in ("input_ids", "labels", "id") if c in rows.column_names])
    probe, seen = [], {}
    for k, row in enumerate(rows.select(range(min(n, len(rows))))):
        rid = row.get("id") or f"row {k}"
        seen[rid] = seen.get(rid, 0) + 1
        positions = [t for t in range(len(row["labels"]) - 1) if row["labels"][t + 1] != IGNORE_INDEX]
        if positions:
            probe.append({"id": rid if seen[rid] == 1 else f"{rid}#{seen[rid]}", "input_ids": row["input_ids"],
                          "positions": positions[:max_positions]})
    return probe


@torch.no_grad()
def next_token_logprobs(model: Any, probe: list[dict]) -> dict[str, torch.Tensor]:
    """Log-probabilities (float32, on the host) of the next token at each probe position, by probe row id."""
    out = {}
    for k, row in enumerate(probe):
        ids = torch.tensor([row["input_ids"]], device=model.device)
        keep = torch.tensor(row["positions"], device=model.device)
        logits = model(input_ids=ids, logits_to_keep=keep).logits[0].float()
        out[row.get("id") or f"row {k}"] = torch.log_softmax(logits, dim=-1).cpu()
    return out


def compare_distributions(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean and largest KL(reference || other) per position, and the share of equal argmax tokens, the
    rows matched by record id.

    Raises:
        RecordMismatchError: a row id is on one side only.
    """
    device = accelerator()
    kls, agree, n = [], 0, 0
    ids = match_ids(reference, other, "the reference distributions", "the compared ones") if reference or other else []
    for rid in ids:
        a, b = reference[rid].to(device), other[rid].to(device)
        kls.append((a.exp() * (a - b)).sum(-1).clamp_min(0).cpu())
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        n += a.shape[0]
    kl = torch.cat(kls) if kls else torch.zeros(0)
    return {"mean_kl": float(kl.mean()) if n else 0.0, "max_kl": float(kl.max()) if n else 0.0,
            "greedy_agreement": agree / n if n else 1.0, "positions": n}


def compare_answers(merged: dict[str, str], adapter: dict[str, str]) -> float:
    """Share of test records whose greedy answer from the merged model equals base + adapter's, by record id.

    Raises:
        RecordMismatchError: the two answered different records.
    """
    ids = match_ids(merged, adapter, "the merged model's answers", "the adapter's")
    return sum(merged[i].strip() == adapter[i].strip() for i in ids) / len(ids)


# ------------------------------------------------------------------------------------------ weights

def _weight_files(model: str) -> list[Path]:
    path = Path(model)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model, allow_patterns=["*.safetensors", "*.json"]))
    return sorted(path.glob("*.safetensors"))


def _tensor_files(files: list[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    where = {}
    for f in files:
        with safe_open(str(f), "pt") as st:
            where.update({k: f for k in st.keys()})
    return where


def adapter_deltas(adapter_dir: str | os.PathLike) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], list[str]]:
    """The adapter's LoRA factors by the base weight they change: ``{"model.layers.0...q_proj.weight": (A, B, scaling)}``.

    Returns:
        The factors, and notes on adapter parts the exact weight check cannot follow (DoRA, trained
        embeddings or heads); those tensors are then checked by the output comparison alone.
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    alpha_pattern = config.get("alpha_pattern") or {}
    deltas, notes = {}, []
    for key, a in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
        b = state[key.replace(".lora_A.", ".lora_B.")]
        rank = a.shape[0]
        alpha = next((v for p, v in alpha_pattern.items() if re.search(rf"(^|\.){p}$", module)), config["lora_alpha"])
        scaling = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
        deltas[f"{module}.weight"] = (a, b, scaling)
    other = sorted({k.rsplit(".", 2)[-2] for k in state if ".lora_A." not in k and ".lora_B." not in k})
    if config.get("use_dora"):
        notes.append("DoRA rescales each merged row: its weights are checked by the outputs only")
    if other:
        notes.append(f"adapter tensors {other} are not LoRA factors: the weights they change are checked "
                     f"by the outputs only")
    if config.get("fan_in_fan_out"):
        notes.append("fan_in_fan_out adapters (Conv1D layers) are checked by the outputs only")
    return deltas, notes


@torch.no_grad()
def check_merged_weights(base_model: str, adapter_dir: str | os.PathLike, merged_dir: str | os.PathLike,
                         dtype: torch.dtype, deltas: Optional[tuple[dict, list[str]]] = None) -> dict[str, Any]:
    """Every merged tensor against base + adapter, element by element (the bound is in the module docstring).

    Returns:
        Counts, the tensors outside the bound with their worst distance in ulps, keys missing on
        either side, tensors the adapter does not touch that changed, and ``delta_lost_share``: the
        share of non-zero delta elements that rounding to ``dtype`` erased (merged equals base there).
    """
    from safetensors import safe_open

    device = accelerator()
    deltas, notes = deltas or adapter_deltas(adapter_dir)
    exact = not notes
    base = _tensor_files(_weight_files(base_model))
    merged = _tensor_files(sorted(Path(merged_dir).glob("*.safetensors")))
    outside, changed, worst, lost, nonzero, expected_bytes = [], [], 0.0, 0, 0, 0
    for key in sorted(merged):
        if key not in base:
            continue
        with safe_open(str(base[key]), "pt", device="cpu") as f:
            w = f.get_tensor(key).to(device=device, dtype=dtype)
        with safe_open(str(merged[key]), "pt", device="cpu") as f:
            m = f.get_tensor(key).to(device)
        expected_bytes += w.numel() * w.element_size()
        if key not in deltas:
            if exact and not torch.equal(w, m.to(dtype)):  # a trained head or embedding may differ otherwise
                changed.append(key)
            continue
        if not exact:
            continue
        a, b, scaling = deltas[key]
        delta = (b.to(device, torch.float32) @ a.to(device, torch.float32)) * scaling
        want = w.float() + delta
        err = (m.float() - want).abs()
        bound = ulp(want, dtype) + ulp(delta, dtype)
        bad = int((err > bound).sum())
        distance = float((err / ulp(want, dtype)).max())
        worst = max(worst, distance)
        if bad:
            outside.append({"tensor": key, "elements": bad, "of": err.numel(), "worst_ulps": round(distance, 1)})
        moved = delta != 0
        nonzero += int(moved.sum())
        lost += int((moved & (m == w)).sum())
        del w, m, delta, want, err, bound, moved
    return {"tensors": len(merged), "adapted": len(deltas), "outside_bound": outside, "worst_ulps": worst,
            "unadapted_changed": changed, "missing_in_merged": sorted(set(base) - set(merged)),
            "not_in_base": sorted(set(merged) - set(base)), "expected_bytes": expected_bytes,
            "delta_lost_share": lost / nonzero if nonzero else 0.0, "notes": notes}


def weight_problems(weights: dict[str, Any]) -> list[str]:
    """What :func:`check_merged_weights` found wrong, one sentence each (empty: the weights are right)."""
    problems = []
    if weights["outside_bound"]:
        first = weights["outside_bound"][0]
        problems.append(f"{len(weights['outside_bound'])} of {weights['adapted']} adapted tensors are not base + "
                        f"adapter to rounding in the compute dtype (worst {weights['worst_ulps']:.1f} ulp; e.g. {first['tensor']}: "
                        f"{first['elements']} of {first['of']} elements)")
    if weights["unadapted_changed"]:
        problems.append(f"{len(weights['unadapted_changed'])} tensors the adapter does not touch differ from the "
                        f"base's (e.g. {weights['unadapted_changed'][0]}): merged into another base?")
    if weights["missing_in_merged"] or weights["not_in_base"]:
        problems.append(f"tensor names differ from the base's: missing {weights['missing_in_merged'][:3]}, "
                        f"extra {weights['not_in_base'][:3]}")
    return problems


# ------------------------------------------------------------------------------------------- verify

def verify_merge(base_model: str, adapter_dir: str | os.PathLike, merged_dir: str | os.PathLike,
                 probe: list[dict], dtype_name: str, kl_factor: float = 4.0,
                 reference: Optional[dict[str, torch.Tensor]] = None) -> dict[str, Any]:
    """Prove the saved merged model equals base + adapter (the two checks of the module docstring).

    Args:
        probe: token rows and positions (:func:`probe_rows`).
        reference: base + adapter's distributions on ``probe``, if already computed (:func:`merge_and_verify`);
            otherwise base + adapter is loaded, measured and released before the merged model is loaded.

    Returns:
        The numbers of both checks.

    Raises:
        MergeVerificationError: any check fails; the message gives the numbers.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = DTYPES[dtype_name]
    merged_dir = Path(merged_dir)
    problems = []
    if getattr(AutoConfig.from_pretrained(merged_dir), "quantization_config", None):
        problems.append("config.json has a quantization_config")
    for shard in merged_dir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            bad = {str(f.get_slice(k).get_dtype()) for k in f.keys()} - {_st_name(dtype)}
            if bad:
                problems.append(f"{shard.name} holds {sorted(bad)} tensors, expected {_st_name(dtype)}")

    factors = adapter_deltas(adapter_dir)  # read once: the weight check and the rounding probe both use it
    weights = check_merged_weights(base_model, adapter_dir, merged_dir, dtype, factors)
    problems += weight_problems(weights)
    merged_bytes = _folder_bytes(merged_dir)
    if weights["expected_bytes"] and abs(merged_bytes - weights["expected_bytes"]) > 0.01 * weights["expected_bytes"]:
        problems.append(f"merged weights are {merged_bytes} bytes; the base's tensors in {dtype_name} are "
                        f"{weights['expected_bytes']}")
    merged_tok, adapter_tok = AutoTokenizer.from_pretrained(str(merged_dir)), AutoTokenizer.from_pretrained(str(adapter_dir))
    if merged_tok.chat_template != adapter_tok.chat_template:
        problems.append("the merged model's chat template is not the one the adapter was trained with")

    if reference is None:
        model = load_adapted(base_model, adapter_dir, dtype)
        reference = next_token_logprobs(model, probe)
        del model
        release_memory()
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=dtype, device_map={"": accelerator()}).eval()
    ours = next_token_logprobs(model, probe)
    outputs = compare_distributions(reference, ours)
    generator = torch.Generator(model.device).manual_seed(0)
    adapted = {k.rsplit(".", 1)[0] for k in factors[0]}
    for name, module in model.named_modules():
        if name in adapted:
            nudge_by_ulp(module.weight, generator)
    rounding = compare_distributions(ours, next_token_logprobs(model, probe))
    del model
    release_memory()
    kl_bound = kl_factor * rounding["mean_kl"] + 1e-9
    flips, flips_bound = 1 - outputs["greedy_agreement"], 2 * (1 - rounding["greedy_agreement"]) + 1 / max(outputs["positions"], 1)
    if outputs["mean_kl"] > kl_bound:
        problems.append(f"mean KL from base + adapter {outputs['mean_kl']:.3g} nats > {kl_factor:g} x "
                        f"{rounding['mean_kl']:.3g}, what one more bf16 rounding of the adapted weights causes "
                        f"(merge.kl_factor)")
    if flips > flips_bound + 1e-12:
        problems.append(f"greedy next tokens differ at {flips:.2%} of {outputs['positions']} answer positions; "
                        f"one more rounding flips {1 - rounding['greedy_agreement']:.2%}")
    result = {"weights": weights, "outputs": outputs, "rounding": rounding, "kl_bound": kl_bound,
              "merged_bytes": merged_bytes, "prompts": len(probe)}
    if problems:
        raise MergeVerificationError(f"merged model {merged_dir} failed verification: " + "; ".join(problems))
    return result


def _st_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
