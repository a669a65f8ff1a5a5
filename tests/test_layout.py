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
