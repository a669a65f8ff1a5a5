"""What a user keeps of a pipeline execution: everything under ``<output_dir>/<name>/``.

::

    outputs/<name>/
      summary.json                 the latest execution's summary
      runs/<mlflow run id>/
        summary.json               this execution's summary
        merged_model/              the merged model: hard links to the files the merge wrote (a copy
                                   across file systems), so it outlives Flyte's sandbox folders
        comparison.png             base, candidate, merged and champion, one axis per metric
        eval_samples.json          question, reference, each model's answer and verdict
        evaluation.html            that comparison and those samples as a page
        decks/<stage>.html         each stage's Deck page: data, tokenize, train, evaluate, merge, deploy
      deploy/<target>/             the champion's serving manifests

Paths written into the summaries are relative to ``outputs/<name>/``, so the folder can be moved or
archived whole; none points into a sandbox or names a process that has stopped::

    from qloraflow.outputs import keep_execution
    kept = keep_execution(root, run_id, merged_model="/tmp/flyte.../merged_model", pages={...},
                          results=metrics_by_model, samples=samples_by_model)
    kept["merged_model"]  # 'runs/<run id>/merged_model'
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

from qloraflow.comparison import comparison_png, evaluation_html, samples_table
from qloraflow.reports import page_html


def keep_folder(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """``src`` at ``dest`` as hard links (a copy where linking fails: another file system), atomically.

    A hard link costs no space and stays valid when Flyte deletes its sandbox copy; the files are
    never modified in place (a merge writes a new folder), so sharing them is safe.
    """
    src, dest = Path(src), Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, tmp, copy_function=link, symlinks=False)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.replace(dest)
    return dest


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
    tmp.replace(path)
    return path


def keep_execution(root: str | os.PathLike, run_id: str, merged_model: Optional[str], pages: dict[str, str],
                   results: dict[str, dict[str, float]], samples: dict[str, list[dict]],
                   gate_section: str = "") -> dict[str, Any]:
    """Keep one execution's model, plots, samples and stage pages under ``root/runs/<run_id>/``.

    Args:
        root: ``<output_dir>/<name>``.
        run_id: the pipeline's MLflow run.
        merged_model: the merged model folder on this machine, or a remote URI (kept as the URI).
        pages: stage -> its Deck page (``report_html`` of its result); empty pages are skipped.
        results: model (base, candidate, merged, champion) -> metrics.
        samples: model -> its answered samples (dicts with messages, reference, answer, id).
        gate_section: the promotion gate's decision as HTML (``qloraflow.comparison.gate_html``), shown
            at the top of the kept evaluation page.

    Returns:
        What was kept, as paths relative to ``root``: ``merged_model`` (or ``merged_model_uri``),
        ``comparison_png``, ``eval_samples``, ``evaluation_html`` and ``decks`` (stage -> page).
    """
    root = Path(root)
    own = root / "runs" / run_id
    own.mkdir(parents=True, exist_ok=True)
    kept: dict[str, Any] = {}
    if merged_model and Path(merged_model).is_dir():
        kept["merged_model"] = relative(root, keep_folder(merged_model, own / "merged_model"))
    elif merged_model:
        kept["merged_model_uri"] = merged_model  # a remote run's blob store: nothing local to keep
    png = Path(comparison_png(results, own / "comparison.png"))
    table = samples_table(samples)
    _write(own / "eval_samples.json", json.dumps(table, indent=1))
    page = gate_section + evaluation_html(results, table, png.read_bytes())
    _write(own / "evaluation.html", page_html("evaluation", page))
    kept.update(comparison_png=relative(root, png), eval_samples=relative(root, own / "eval_samples.json"),
                evaluation_html=relative(root, own / "evaluation.html"))
    kept["decks"] = {stage: relative(root, _write(own / "decks" / f"{stage}.html", text))
                     for stage, text in pages.items() if text}
    return kept


def relative(root: str | os.PathLike, path: str | os.PathLike) -> str:
    """``path`` relative to ``root`` (POSIX separators).

    Raises:
        ValueError: ``path`` is not inside ``root``: it would not travel with the folder.
    """
    return Path(os.path.abspath(path)).relative_to(os.path.abspath(root)).as_posix()


def _strings(data: Any, at: str = "") -> Iterator[tuple[str, str]]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _strings(v, f"{at}.{k}" if at else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _strings(v, f"{at}[{i}]")
    elif isinstance(data, str):
        yield at, data


def paths_into(data: Any, folders: list[str | os.PathLike]) -> list[str]:
    """Every string in ``data`` (a summary) naming a path inside one of ``folders`` (e.g. Flyte's
    sandbox), as ``key: value``: what would go stale once those folders are cleaned."""
    roots = [Path(os.path.realpath(f)) for f in folders]
    problems = []
    for key, value in _strings(data):
        if "\n" in value or "://" in value or not value.startswith("/"):
            continue
        path = Path(os.path.realpath(value))
        if any(path == r or path.is_relative_to(r) for r in roots):
            problems.append(f"{key}: {value}")
    return problems
