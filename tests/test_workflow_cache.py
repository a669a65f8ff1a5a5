"""Flyte's cache, for real: change one input at a time and check exactly which stages re-run.

Eight `pyflyte run` executions of the finetune workflow on one Flyte cache and one MLflow server, each
after one change (none; the data file rewritten at the same path; train.learning_rate;
the execution-only settings, which only say how the work is spread (train.distributed for several
GPUs, data.dedupe_workers, tokenize.num_proc) and never reach a cache key; the base model's chat
template; the code of qloraflow/merge.py; the code of qloraflow/attention.py, which only the training
code imports). Every execution's summary says, per stage,
"ran" or "cached (computed by pipeline run X)"; each must name exactly the stages the change
reaches, and a cached stage must name the execution that last ran it. The runs use a snapshot of the
project, so the code change is an edit of the snapshot, and the test checks it is the snapshot's
module that Python imported.
"""

from __future__ import annotations

import shutil

import pytest
import yaml

from conftest import finished_pyflyte, pyflyte_env, quick_pipeline_config, snapshot_project, start_pyflyte

pytestmark = pytest.mark.slow

STAGES = ("data", "tokenize", "train", "evaluate", "merge")  # deploy and export are switched off: always "skipped"
# Each change and the stages it must re-run; the others must come from the cache.
CHANGES = {
    "first": set(STAGES),
    "unchanged": set(),
    "data": set(STAGES),
    "config": {"train", "evaluate", "merge"},
    "execution": set(),  # execution-only: never in a cache key
    "tokenizer": {"tokenize", "train", "evaluate", "merge"},
    "code": {"merge"},
    "attention": {"train", "evaluate", "merge"},  # found through train.py's imports, listed nowhere
}
MARKER = "[qloraflow:merge] code edited in the snapshot:"
ATTENTION_MARKER = "[qloraflow:attention] code edited in the snapshot:"


@pytest.fixture(scope="module")
def executions(tmp_path_factory, mlflow_server, small_demo):
    from qloraflow.tokenize import TEMPLATES

    root = tmp_path_factory.mktemp("cache")
    project = snapshot_project(root / "project")
    demo = root / "demo"
    shutil.copytree(small_demo, demo)
    cfg = quick_pipeline_config(demo, root / "outputs", **{"registry.model_name": "cache-sql",
                                                          "tracking.experiment": "cache"})
    config = root / "config.yaml"
    env = pyflyte_env(root, mlflow_server)
    runs = {}

    def execute(change: str) -> None:
        config.write_text(yaml.safe_dump(cfg))
        log = root / f"{change}.log"
        out, summary = finished_pyflyte(start_pyflyte(project, config, env, log), log)
        runs[change] = {"out": out, "summary": summary}

    execute("first")
    execute("unchanged")
    train_file = demo / "data" / "train.jsonl"  # same path, other bytes
    train_file.write_text("".join(train_file.read_text().splitlines(keepends=True)[:-20]))
    execute("data")
    cfg["train"]["learning_rate"] = 1e-3
    execute("config")
    cfg["train"]["distributed"] = "fsdp"
    cfg["data"]["dedupe_workers"] = 1
    cfg["tokenize"]["num_proc"] = 2
    execute("execution")
    template = TEMPLATES["chatml"].replace("message['role'] + '\n'", "message['role'] + ':\n'").replace(
        "'<|im_start|>assistant\n'", "'<|im_start|>assistant:\n'")
    assert template != TEMPLATES["chatml"] and (demo / "base-model" / "chat_template.jinja").exists()
    (demo / "base-model" / "chat_template.jinja").write_text(template)
    execute("tokenizer")
    merge_py = project / "qloraflow" / "merge.py"
    merge_py.write_text(merge_py.read_text() + f'\nprint(f"{MARKER} {{__file__}}", flush=True)\n')
    execute("code")
    attention_py = project / "qloraflow" / "attention.py"
    attention_py.write_text(attention_py.read_text() + f'\nprint(f"{ATTENTION_MARKER} {{__file__}}", flush=True)\n')
    execute("attention")
    return {"runs": runs, "project": project, "uri": mlflow_server}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_reruns_exactly_the_stages_it_reaches(executions, change):
    runs = executions["runs"]
    last_ran = {}  # stage -> the pipeline run that computed the output the cache now holds
    for name, reran in CHANGES.items():
        summary = runs[name]["summary"]
        expected = {s: "ran" if s in reran else f"cached (computed by pipeline run {last_ran[s][:8]})" for s in STAGES}
        if name == change:
            assert summary["stages"] == {**expected, "deploy": "skipped", "export": "skipped"}, (change, summary["stages"])
            return
        last_ran.update({s: summary["mlflow_run_id"] for s in reran})


def test_the_changes_reach_the_stage_outputs(executions):
    runs = {k: v["summary"] for k, v in executions["runs"].items()}
    assert runs["data"]["data"]["read"] < runs["unchanged"]["data"]["read"]  # the rewritten file was read
    assert runs["unchanged"]["train"] == runs["first"]["train"]  # the cached training result, unchanged
    assert runs["config"]["train"]["train_loss_last"] != runs["data"]["train"]["train_loss_last"]
    # "role:\n" in every rendered turn: more tokens from the same records
    assert runs["tokenizer"]["tokenize"]["train"]["tokens"] > runs["config"]["tokenize"]["train"]["tokens"]


def test_the_code_change_ran_from_the_snapshot(executions):
    out = executions["runs"]["code"]["out"]
    assert f"{MARKER} {executions['project'] / 'qloraflow' / 'merge.py'}" in out  # not the installed package
    assert MARKER not in executions["runs"]["tokenizer"]["out"]
    assert ATTENTION_MARKER in executions["runs"]["attention"]["out"]


def test_each_new_model_is_registered_once(executions):
    from qloraflow import registry

    reg = {k: v["summary"]["registry"] for k, v in executions["runs"].items()}
    assert reg["first"]["version"] == "1"
    assert reg["unchanged"]["version"] == "1" and reg["unchanged"]["reason"] == "unchanged: already registered"
    new = [reg[c]["version"] for c in ("first", "data", "config", "tokenizer")]
    assert len(set(new)) == 4  # every change that alters the model adds a version
    # the merge re-ran on edited code but wrote the same model bytes: no new version
    assert reg["code"]["version"] == reg["tokenizer"]["version"]
    assert reg["code"]["reason"] == "unchanged: already registered"
    # retraining after the attention.py edit registers a version only if it trained other weights
    extra = int(reg["attention"]["version"] not in new)
    client = registry.client_for(executions["uri"])
    assert len(registry.list_versions(client, "cache-sql")) == 4 + extra
