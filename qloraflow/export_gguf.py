"""GGUF files from a Hugging Face model folder, with llama.cpp's own converter and quantizer.

The converter (``convert_hf_to_gguf.py``, its ``conversion`` package and ``gguf-py``) is taken from
the pinned ``llama-cpp-python==0.3.36`` sdist, checksum checked (asset ``llama-cpp`` in
``qloraflow/assets.py``); nothing of it is copied into this repository. Converter and quantizer run
in the export environment that ``make setup-export`` builds (``.venv-export``: torch, transformers,
sentencepiece and the llama_cpp binding built once from the same sdist); k-quants (``q4_k_m``) come
from llama.cpp's ``llama_model_quantize`` there (``qloraflow/llamacpp_worker.py``). By hand::

    .venv-export/bin/python -m qloraflow.export_gguf convert MODEL_DIR OUT.gguf q8_0
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from qloraflow.errors import ExportError

CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
"""Types the converter writes itself; the others (``q4_k_m`` ...) are quantized from an f16 file."""


def converter_dir() -> Path:
    """The unpacked converter (fetched once from the pinned sdist)."""
    from qloraflow.assets import fetch

    return fetch("llama-cpp")


def _plain_byte_level(model_dir: Path) -> bool:
    """True when the tokenizer pre-tokenizes exactly as GPT-2 does (one ByteLevel step, GPT-2's regex).

    Such a tokenizer trained here (the demo's) has a vocabulary the converter has never seen, so its
    fingerprint table (``get_vocab_base_pre``) does not name it; llama.cpp's ``gpt2`` pre-tokenizer
    is then the right one. The export's parity check compares llama.cpp's prompt token ids with the
    Hugging Face tokenizer's, so a wrong choice fails the stage.
    """
    path = model_dir / "tokenizer.json"
    if not path.exists():
        return False
    pre = json.loads(path.read_text()).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)


def convert(model_dir: str | Path, outfile: str | Path, outtype: str, python: str, timeout_s: float = 1800) -> Path:
    """Run llama.cpp's ``convert_hf_to_gguf.py`` on a model folder; return the GGUF written.

    Raises:
        ExportError: the converter failed; its last output lines are in the message.
    """
    if outtype not in CONVERTER_TYPES:
        raise ExportError(f"the converter writes {', '.join(CONVERTER_TYPES)}, not {outtype!r}")
    outfile = Path(outfile)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = outfile.with_name(f".{outfile.name}.{os.getpid()}.tmp")
    _check_python(python)
    command = [python, "-m", "qloraflow.export_gguf", "convert", str(model_dir), str(tmp), outtype]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise ExportError(f"convert_hf_to_gguf.py failed on {model_dir} (--outtype {outtype}):\n"
                          + "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:]))
    tmp.replace(outfile)
    return outfile


def quantize(src: Path, dst: Path, ftype: str, python: str, timeout_s: float = 1800) -> Path:
    """A k-quant (``q4_k_m``, ...) of an f16/f32 GGUF, by llama.cpp's ``llama_model_quantize``."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    result = run_worker(python, {"op": "quantize", "src": str(src), "dst": str(tmp), "ftype": ftype}, timeout_s)
    if result["returncode"] != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise ExportError(f"llama_model_quantize({src.name} -> {ftype}) returned {result['returncode']}")
    tmp.replace(dst)
    return dst


def _check_python(python: str) -> None:
    if not Path(python).exists():
        raise ExportError(f"export.python {python} does not exist: build the export environment once with "
                          "`make setup-export` (llama.cpp's binding from its pinned sdist, about 8 minutes on "
                          "2 cores; README 'Export for local runtimes')")


def run_worker(python: str, request: dict, timeout_s: float) -> dict:
    """Run ``llamacpp_worker.py`` with ``python`` (the environment that has llama_cpp); return its JSON."""
    import tempfile

    _check_python(python)
    worker = Path(__file__).with_name("llamacpp_worker.py")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    try:
        # -m from the checkout (not the script's path: qloraflow/tokenize.py would shadow the standard library's).
        done = subprocess.run([python, "-m", "qloraflow.llamacpp_worker", f.name], capture_output=True, text=True,
                              timeout=timeout_s, cwd=worker.parents[1])
    finally:
        os.unlink(f.name)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise ExportError(f"llama.cpp ({python} {worker.name}, op {request['op']}) failed:\n"
                          + "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:]))
    return json.loads(lines[-1])


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The GGUF's key/value metadata (strings, numbers, short arrays), read with the pinned gguf-py."""
    sys.path.insert(0, str(converter_dir() / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.pop(0)
    reader = gguf.GGUFReader(str(path))
    out: dict[str, Any] = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF.") or (fld.types and fld.types[0] == gguf.GGUFValueType.ARRAY and len(fld.data) > 64):
            continue
        out[name] = fld.contents()
    out["general.file_type"] = out.get("general.file_type")
    out["tensor_types"] = sorted({t.tensor_type.name for t in reader.tensors})
    return out


def _run_converter(model_dir: str, outfile: str, outtype: str) -> None:
    """The converter's ``main()`` in this process, with the pinned sources on ``sys.path``."""
    import runpy

    root = converter_dir()
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    if _plain_byte_level(Path(model_dir)):
        from conversion.base import TextModel

        recognised = TextModel.get_vocab_base_pre

        def get_vocab_base_pre(self, tokenizer):  # noqa: ANN001, ANN202
            try:
                return recognised(self, tokenizer)
            except NotImplementedError:  # an unseen vocabulary, GPT-2's pre-tokenizer (see _plain_byte_level)
                return "gpt-2"

        TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", outfile, "--outtype", outtype]
    runpy.run_path(str(root / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "convert":
        raise SystemExit(__doc__)
    _run_converter(*sys.argv[2:])
