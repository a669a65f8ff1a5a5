"""Merge the adapter into 16-bit base weights, then prove the merged model equals the adapter.

The base is loaded in the training compute dtype (never the 4-bit model: merging into quantised
weights and saving would either fail or silently bake in rounding), the adapter applied and folded in
with ``merge_and_unload``, and the result saved as safetensors with the tokenizer (and its chat
template), a generation config whose EOS ids include the template's end-of-turn token, and no
``quantization_config``::

    from qloraflow.merge import merge_adapter, verify_merge
    info = merge_adapter("base-model", "out/train/adapter", "out/merged", "bfloat16")
    check = verify_merge("base-model", "out/train/adapter", "out/merged", prompts, atol=0.05)
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from qloraflow.checkpoint import MANIFEST, save_atomic
from qloraflow.errors import MergeVerificationError, QloraflowError


class MergeError(QloraflowError):
    """The merged model could not be written (disk full, unwritable folder)."""


def _folder_bytes(folder: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in folder.glob(f"*{suffix}"))


def merge_adapter(base_model: str, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  dtype_name: str) -> dict[str, Any]:
    """Fold a LoRA adapter into the 16-bit base and save it atomically.

    Raises:
        MergeError: the disk filled up or the folder is not writable; nothing is left under ``out_dir``.
        MergeVerificationError: a merged tensor is not in the training dtype.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qloraflow.train import DTYPES

    dtype = DTYPES[dtype_name]
    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
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
    info = {"merged_dir": str(out_dir), "dtype": dtype_name, "bytes": _folder_bytes(out_dir),
            "base_bytes": _folder_bytes(Path(base_model)), "eos_token_id": gen.eos_token_id,
            "sha256": model_digest(out_dir)}
    (out_dir / "merge_info.json").write_text(json.dumps(info, indent=1))
    return info


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


@torch.no_grad()
def verify_merge(base_model: str, adapter_dir: str | os.PathLike, merged_dir: str | os.PathLike,
                 prompts: list[str], rtol: float, dtype_name: str) -> dict[str, Any]:
    """Compare the merged model with base + adapter (unmerged) on held-out prompts.

    Checks: the saved weights are in the training dtype and the same size as the base's; the config has
    no quantization; logits agree within ``rtol`` of the largest logit (rounding the merged weights to
    bf16 moves a logit by about 2**-8 of its size per layer, so an absolute bound would depend on scale).

    Raises:
        MergeVerificationError: any check fails; the message gives the numbers.
    """
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from qloraflow.train import DTYPES

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
    merged_bytes, base_bytes = _folder_bytes(merged_dir), _folder_bytes(Path(base_model))
    if base_bytes and abs(merged_bytes - base_bytes) > 0.01 * base_bytes:
        problems.append(f"merged weights are {merged_bytes} bytes, the base's {base_bytes}")

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype),
                                          str(adapter_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=dtype).eval()
    worst, scale = 0.0, 0.0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        a = reference(input_ids=ids).logits.float()
        b = merged(input_ids=ids).logits.float()
        worst, scale = max(worst, (a - b).abs().max().item()), max(scale, a.abs().max().item())
    relative = worst / max(scale, 1e-6)
    if relative > rtol:
        problems.append(f"logits differ by up to {worst:.4f} ({relative:.2%} of the largest logit {scale:.2f}) "
                        f"> merge.logits_rtol {rtol:.2%}")
    result = {"max_logit_diff": worst, "relative_logit_diff": relative, "merged_bytes": merged_bytes,
              "base_bytes": base_bytes, "prompts": len(prompts)}
    if problems:
        raise MergeVerificationError(f"merged model {merged_dir} failed verification: " + "; ".join(problems))
    return result


def _st_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
