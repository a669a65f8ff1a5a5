"""An MLX folder of the merged model (for Apple Silicon), converted with mlx-lm and checked to load and answer.

mlx-lm runs in an environment of its own (``.venv-mlx``: ``mlx[cpu]==0.32.4`` and ``mlx-lm`` install on
Linux x86-64 and run on the CPU, slowly: fine for a few tokens of a check). Both steps run there::

    .venv-mlx/bin/python -m mlx_lm convert --hf-path MODEL_DIR --mlx-path OUT [-q]
    .venv-mlx/bin/python -m qloraflow.export_mlx answer OUT request.json

The check loads the converted folder with ``mlx_lm.load`` and answers the held-out prompts greedily,
rendered by the folder's own chat template; the caller compares them with the merged model's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def convert_mlx(model_dir: str | Path, out: str | Path, python: str, quantize: bool = False,
                timeout_s: float = 1800) -> Path:
    """``mlx_lm convert`` of a Hugging Face folder (``quantize``: mlx-lm's default 4-bit)."""
    from qloraflow.errors import ExportError

    if not Path(python).exists():
        raise ExportError(f"export.mlx needs {python}: `python3 -m venv .venv-mlx && .venv-mlx/bin/pip install "
                          "'mlx[cpu]==0.32.4' mlx-lm` (README 'Export for local runtimes')")
    out = Path(out)
    command = [python, "-m", "mlx_lm", "convert", "--hf-path", str(model_dir), "--mlx-path", str(out)]
    done = subprocess.run(command + (["-q"] if quantize else []), capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise ExportError(f"mlx_lm convert failed on {model_dir}:\n" + (done.stdout + done.stderr)[-1500:])
    return out


def answer_mlx(folder: str | Path, conversations: list[list[dict]], max_new_tokens: int, python: str,
               timeout_s: float = 1800) -> list[dict]:
    """Greedy mlx-lm answers of the converted folder: ``[{"rendered", "text"}]`` per conversation."""
    import tempfile

    from qloraflow.errors import ExportError

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"conversations": conversations, "max_new_tokens": max_new_tokens}, f)
    # -m from the checkout (not the script's path: qloraflow/tokenize.py would shadow the standard library's).
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([python, "-m", "qloraflow.export_mlx", "answer", str(folder), f.name], capture_output=True,
                          text=True, timeout=timeout_s, cwd=root)
    Path(f.name).unlink()
    if done.returncode != 0:
        raise ExportError(f"mlx-lm could not load or answer with {folder}:\n" + (done.stdout + done.stderr)[-1500:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _answer(folder: str, request_path: str) -> None:  # runs in the mlx environment
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    request = json.loads(Path(request_path).read_text())
    model, tokenizer = load(folder)
    rows = []
    for messages in request["conversations"]:
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text = generate(model, tokenizer, rendered, max_tokens=request["max_new_tokens"],
                        sampler=make_sampler(temp=0.0), verbose=False)
        rows.append({"rendered": rendered, "text": text})
    sys.stdout.write("\n" + json.dumps(rows) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "answer":
        raise SystemExit(__doc__)
    _answer(sys.argv[2], sys.argv[3])
