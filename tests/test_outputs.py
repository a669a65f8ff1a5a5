"""What a user keeps under outputs/<name>/: the model outlives the sandbox, paths stay inside, Decks per task."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from qloraflow.outputs import keep_execution, paths_into
from tasks.register import format_summary, write_summary


def _sandbox_model(tmp_path: Path) -> Path:
    model = tmp_path / "flyte-sandbox" / "user_space" / "merge" / "merged_model"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights" * 100)
    (model / "merge_info.json").write_text(json.dumps({"dtype": "bfloat16"}))
    return model


def test_kept_outputs_outlive_the_sandbox_and_every_path_is_inside_the_folder(tmp_path):
    model = _sandbox_model(tmp_path)
    root = tmp_path / "outputs" / "tiny-sql"
    results = {"base": {"heldout_loss": 13.3}, "candidate": {"heldout_loss": 0.4}, "merged": {"heldout_loss": 0.4}}
    sample = {"id": "1", "messages": [{"role": "user", "content": "q?"}], "reference": "a", "answer": "a"}
    kept = keep_execution(root, "run1", str(model), {"data": "<p>data</p>", "deploy": ""}, results,
                          {m: [sample] for m in results})
    assert kept["merged_model"] == "runs/run1/merged_model" and list(kept["decks"]) == ["data"]
    weights = root / kept["merged_model"] / "model.safetensors"
    assert os.stat(weights).st_ino == os.stat(model / "model.safetensors").st_ino  # a hard link: no second copy
    summary = {"mlflow_run_id": "run1", "merged_dir": kept["merged_model"], "merged_bytes": 700,
               "outputs": {k: v for k, v in kept.items() if k != "merged_model"}}
    own = write_summary(root, "run1", summary)
    for written in (own, root / "summary.json"):
        data = json.loads(written.read_text())
        assert paths_into(data, [tmp_path / "flyte-sandbox"]) == []
        assert data["summary_file"] == "runs/run1/summary.json"
        for rel in [data["merged_dir"], data["outputs"]["comparison_png"], data["outputs"]["eval_samples"],
                    *data["outputs"]["decks"].values()]:
            assert not os.path.isabs(rel) and (root / rel).resolve().is_relative_to(root.resolve()), rel
            assert (root / rel).exists(), rel
    shutil.rmtree(tmp_path / "flyte-sandbox")  # Flyte cleans its sandbox: what was kept stays
    assert weights.read_bytes() == b"weights" * 100
    table = json.loads((root / kept["eval_samples"]).read_text())
    assert table["merged verdict"] == ["match"]
    # the negative control: a summary pointing into the sandbox is caught
    assert paths_into({"merged_dir": str(model)}, [tmp_path / "flyte-sandbox"]) == [f"merged_dir: {model}"]


def test_printed_summary_says_where_each_deck_is(tmp_path):
    root = tmp_path / "outputs" / "t"
    s = {"data": {"read": 3, "kept": 3, "rejected": 0}, "stages": {"data": "ran"}, "tokenize": {},
         "train": {"global_step": 2, "train_loss_first": 2.0, "train_loss_last": 1.0},
         "eval": {"base": {"exact_match": 0.0}}, "merged_dir": "runs/r/merged_model", "merged_bytes": 2**20,
         "merge_check": {"worst_ulps": 0.5, "mean_kl": 1e-5, "kl_bound": 1e-4, "greedy_agreement": 1.0},
         "registry": {"model": "t", "version": "1", "promoted": False, "reason": "x"},
         "deploy": {"skipped": "serve.enabled is false"}, "mlflow_run_id": "r", "flyte_execution_id": "e",
         "summary_file": "runs/r/summary.json",
         "outputs": {"comparison_png": "runs/r/comparison.png", "eval_samples": "runs/r/eval_samples.json",
                     "decks": {"data": "runs/r/decks/data.html", "train": "runs/r/decks/train.html"}}}
    text = format_summary(s, root)
    assert f"data:     {root}/runs/r/decks/data.html" in text and f"train:    {root}/runs/r/decks/train.html" in text
    assert f"merged    {root}/runs/r/merged_model" in text and f"summary   {root}/runs/r/summary.json" in text


def test_each_local_task_deck_holds_only_its_own_tabs():
    """Two tasks in one local execution (one process): each task's deck.html has its own tab, not the other's."""
    import re

    from flytekit import FlyteContextManager, task, workflow

    from tasks.common import show_deck

    @task(enable_deck=True)
    def first_stage() -> int:
        show_deck({"first stage report": "<p>one</p>"})
        return 1

    @task(enable_deck=True)
    def second_stage(x: int) -> int:
        show_deck({"second stage report": "<p>two</p>", "second stage extra": "<p>2b</p>"})
        return x + 1

    @workflow
    def two_stages() -> int:
        return second_stage(x=first_stage())

    sandbox = Path(FlyteContextManager.current_context().file_access.local_sandbox_dir)
    before = set(sandbox.rglob("deck.html"))
    assert two_stages() == 2
    decks = sorted(set(sandbox.rglob("deck.html")) - before, key=lambda p: p.stat().st_mtime)
    tabs = [re.findall(r'<li onclick="handleLinkClick\(this\)">([^<]*)</li>', p.read_text()) for p in decks]
    assert len(tabs) == 2, tabs
    assert "first stage report" in tabs[0] and not any(t.startswith("second") for t in tabs[0]), tabs[0]
    assert {"second stage report", "second stage extra"} <= set(tabs[1]) and "first stage report" not in tabs[1], tabs[1]
