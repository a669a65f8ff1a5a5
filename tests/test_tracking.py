"""MLflow tracking under real faults: a killed, a hung (SIGSTOP) and a late server, a fresh store raced.

One real ``mlflow server`` (SQLite backend, local artifact root) per module, killed and restarted on
the same port by the tests that need it; every wait on it is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, free_port, tiny_config, wait_http
from qloraflow.errors import TrackingError
from qloraflow.tracking import MlflowTracker, end_run
from qloraflow.tracking_buffer import BUFFERS_TAG, DEGRADED_TAG
from qloraflow.train import train_adapter

REQUEST_TIMEOUT_S = 4  # MLFLOW_HTTP_REQUEST_TIMEOUT in this module: a hung server costs this per timeout


class Server:
    """A real ``mlflow server`` that a test can kill (SIGKILL), freeze (SIGSTOP) and start again."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def up(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
             f"sqlite:///{self.root}/m.db", "--artifacts-destination", str(self.root / "art"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_http(self.uri + "/health", 180)  # a fresh store migrates first: tens of seconds on a loaded machine
        # The first API call opens the store: let it take its time here, not in a test's timed call.
        urllib.request.urlopen(self.uri + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default",
                               timeout=60).close()

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def freeze(self, frozen: bool) -> None:
        os.killpg(self.proc.pid, signal.SIGSTOP if frozen else signal.SIGCONT)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("mlflow-outage"))
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(REQUEST_TIMEOUT_S)
    try:
        srv.up()
        yield srv
    finally:
        if srv.proc is not None and srv.proc.poll() is None:
            os.killpg(srv.proc.pid, signal.SIGCONT)
            os.killpg(srv.proc.pid, signal.SIGKILL)
            srv.proc.wait(10)


@pytest.fixture
def pending(tmp_path, monkeypatch):
    folder = tmp_path / "pending"
    monkeypatch.setenv("QLORAFLOW_TRACKING_PENDING", str(folder))
    return folder


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _download(uri, run_id, path, dst):
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst),
                                                    tracking_uri=uri))


def _dataset_input():
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return DatasetInput(Dataset(name="t-train", digest="abc123", source_type="local", source='{"uri": "train.parquet"}',
                                profile='{"num_rows": 2}'), tags=[InputTag("mlflow.data.context", "training")])


def _log_everything(tracker, tmp_path):
    """One of each kind, the files deleted right after logging: only the buffer's copies remain."""
    payload = os.urandom(50_000)
    (tmp_path / "report.bin").write_bytes(payload)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "weights.bin").write_bytes(payload[::-1])
    tracker.log_metrics({"loss": 0.25}, step=7)
    tracker.log_params({"lr": "0.1"})
    tracker.set_tags({"phase": "outage"})
    tracker.log_artifact(tmp_path / "report.bin", "data")
    tracker.log_artifact(tmp_path / "adapter", "adapter")
    tracker.log_dict({"kept": [1, 2], "nested": {"a": "b"}}, "report/summary.json")
    tracker.log_table({"question": ["q1", "q2"], "score": [1.0, 0.5]}, "eval_samples.json")
    tracker.log_inputs([_dataset_input()])
    (tmp_path / "report.bin").unlink()
    (tmp_path / "adapter" / "weights.bin").unlink()
    return payload


def _assert_everything_there(uri, run_id, payload, tmp_path):
    run = _client(uri).get_run(run_id)
    assert run.data.metrics["loss"] == 0.25 and run.data.params["lr"] == "0.1" and run.data.tags["phase"] == "outage"
    got = tmp_path / "got"
    assert _download(uri, run_id, "data/report.bin", got).read_bytes() == payload
    assert _download(uri, run_id, "adapter/weights.bin", got).read_bytes() == payload[::-1]
    assert json.loads(_download(uri, run_id, "report/summary.json", got).read_text()) == {"kept": [1, 2],
                                                                                          "nested": {"a": "b"}}
    table = json.loads(_download(uri, run_id, "eval_samples.json", got).read_text())
    assert table["columns"] == ["question", "score"] and table["data"] == [["q1", 1.0], ["q2", 0.5]]
    (logged,) = run.inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest, logged.dataset.profile) == ("t-train", "abc123",
                                                                                    '{"num_rows": 2}')
    assert {t.key: t.value for t in logged.tags} == {"mlflow.data.context": "training"}
    return run


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=uri.replace(".", r"\.")):
        MlflowTracker("x", uri, fallback_dir=tmp_path)
    assert time.monotonic() - t0 < 15


def test_hung_server_costs_one_timeout_not_one_per_call(server, tmp_path, pending):
    server.up()
    tracker = MlflowTracker("outage", server.uri, run_name="hung", fallback_dir=tmp_path, probe_interval_s=30)
    tracker.log_metrics({"loss": 1.0}, step=0)
    server.freeze(True)
    try:
        t0 = time.monotonic()
        for step in range(1, 11):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        elapsed = time.monotonic() - t0
    finally:
        server.freeze(False)
    # It did wait on the hung server once (so the fault was real), and only once.
    assert REQUEST_TIMEOUT_S * 0.9 <= elapsed < 2 * REQUEST_TIMEOUT_S, elapsed
    tracker.close()
    run = _client(server.uri).get_run(tracker.run_id)
    steps = [m.step for m in _client(server.uri).get_metric_history(tracker.run_id, "loss")]
    assert sorted(steps) == list(range(11)) and run.info.status == "FINISHED"
    assert run.data.tags[DEGRADED_TAG] == "replayed: buffered 10 (metrics 10), replayed 10, rejected 0, pending 0"
    assert tracker.buffer_dir is None and not list(pending.glob("*.json"))


def test_server_killed_mid_run_loses_nothing_and_close_replays_it(server, tmp_path, pending):
    server.up()
    tracker = MlflowTracker("outage", server.uri, run_name="killed", fallback_dir=tmp_path, probe_interval_s=60)
    tracker.log_metrics({"loss": 0.5}, step=1)
    server.kill()
    payload = _log_everything(tracker, tmp_path)
    buffered = tracker.buffer_dir
    assert buffered is not None and len(list(pending.glob("*.json"))) == 1
    server.up()  # same port, same store
    tracker.close()
    run = _assert_everything_there(server.uri, tracker.run_id, payload, tmp_path)
    assert run.info.status == "FINISHED"
    assert run.data.tags[DEGRADED_TAG] == ("replayed: buffered 8 (artifact 2, dict 1, inputs 1, metrics 1, params 1, "
                                           "table 1, tags 1), replayed 8, rejected 0, pending 0")
    assert json.loads(run.data.tags[BUFFERS_TAG])[buffered.name]["pending"] == {}
    assert not buffered.exists() and not list(pending.glob("*.json"))


def test_server_down_at_close_the_next_stage_or_the_replay_command_ends_the_run(server, tmp_path, monkeypatch):
    server.up()
    monkeypatch.setenv("QLORAFLOW_TRACKING_PENDING", str(tmp_path / "pending-a"))
    failed = MlflowTracker("outage", server.uri, run_name="failed-stage", fallback_dir=tmp_path / "a")
    monkeypatch.setenv("QLORAFLOW_TRACKING_PENDING", str(tmp_path / "pending-b"))
    finished = MlflowTracker("outage", server.uri, run_name="finished-stage", fallback_dir=tmp_path / "b")
    pipeline = MlflowTracker("outage", server.uri, run_name="pipeline", fallback_dir=tmp_path / "p")
    server.kill()
    monkeypatch.setenv("QLORAFLOW_TRACKING_PENDING", str(tmp_path / "pending-a"))
    (tmp_path / "x").mkdir()
    payload = _log_everything(failed, tmp_path / "x")
    failed.close("FAILED")
    monkeypatch.setenv("QLORAFLOW_TRACKING_PENDING", str(tmp_path / "pending-b"))
    finished.log_metrics({"loss": 0.5}, step=3)
    finished.close()
    # The pipeline's run ended from another process (a failed stage) while the server is down: buffered too.
    end_run("outage", server.uri, pipeline.run_id, "FAILED", {"qloraflow.failed_stage": "tokenize"}, tmp_path / "p")
    server.up()
    client = _client(server.uri)
    assert client.get_run(failed.run_id).info.status == "RUNNING"  # the fault: nothing has ended them yet
    assert client.get_run(finished.run_id).info.status == "RUNNING"

    # The next stage's tracker (same pending folder) replays the earlier stage's buffer and ends its run.
    MlflowTracker("outage", server.uri, run_name="next-stage", fallback_dir=tmp_path / "c").close()
    run = client.get_run(finished.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 0.5
    assert run.data.tags[DEGRADED_TAG].startswith("replayed: buffered 1 (metrics 1)")
    ended = client.get_run(pipeline.run_id)
    assert ended.info.status == "FAILED" and ended.data.tags["qloraflow.failed_stage"] == "tokenize"
    assert client.get_run(failed.run_id).info.status == "RUNNING"  # its pointer is elsewhere

    # The other buffer by its folder (as from a remote task's downloaded outputs), with the real command.
    out = subprocess.run([sys.executable, "-m", "qloraflow.cli", "tracking", "replay", str(tmp_path / "a")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"run {failed.run_id}: replayed: buffered 8" in out.stdout and "run ended FAILED" in out.stdout
    run = _assert_everything_there(server.uri, failed.run_id, payload, tmp_path)
    assert run.info.status == "FAILED" and run.data.tags[DEGRADED_TAG].endswith("pending 0")
    assert not list((tmp_path / "a").rglob("records.jsonl")) and not list((tmp_path / "pending-a").glob("*"))


RACE = r"""
import sys, time
from pathlib import Path
from qloraflow.tracking import MlflowTracker
me, root = sys.argv[1], Path(sys.argv[2])
(root / f"ready-{me}").touch()
for trial in range(4):
    go = root / f"go-{trial}"
    deadline = time.monotonic() + 60
    while not go.exists():
        assert time.monotonic() < deadline, "no go"
        time.sleep(0.01)
    t = MlflowTracker("race", f"sqlite:///{root}/t{trial}/mlflow.db", run_name=f"p{me}", fallback_dir=root / me)
    t.log_metrics({"x": 1.0})
    t.close()
    assert not t.degraded, "the store failed and the records were buffered"
    (root / f"done-{me}-{trial}").touch()
"""


def test_two_processes_on_a_fresh_sqlite_store_both_finish(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(n), str(tmp_path)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}) for n in (1, 2)]
    try:
        deadline = time.monotonic() + 90
        while not all((tmp_path / f"ready-{n}").exists() for n in (1, 2)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "workers did not start"
            time.sleep(0.05)
        for trial in range(4):  # both create the same fresh store at the same moment, four times
            (tmp_path / f"go-{trial}").touch()
            while not all((tmp_path / f"done-{n}-{trial}").exists() for n in (1, 2)):
                assert time.monotonic() < deadline + 60 and all(p.poll() is None for p in procs), "a worker died"
                time.sleep(0.05)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    for trial in range(4):
        runs = _client(f"sqlite:///{tmp_path}/t{trial}/mlflow.db").search_runs(
            [_client(f"sqlite:///{tmp_path}/t{trial}/mlflow.db").get_experiment_by_name("race").experiment_id])
        assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]


def test_server_lost_mid_run_training_continues_and_records_are_kept(server, tmp_path, pending, tiny_model_dir,
                                                                     tiny_tokenized):
    server.up()
    tracker = MlflowTracker("lost", server.uri, run_name="lost-mid-run", fallback_dir=tmp_path)
    cfg = tiny_config(tiny_model_dir, **{"train.max_steps": 6, "train.save_steps": 2})

    def lose_server(_folder: Path) -> None:  # after the first checkpoint, the server dies
        if server.proc.poll() is None:
            server.kill()

    summary = train_adapter(cfg, tiny_tokenized, tmp_path / "run", tracker=tracker, on_checkpoint=lose_server)
    tracker.close()
    assert summary["global_step"] == 6 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert tracker.degraded is True
    buffers = list((tmp_path / "mlflow-buffer").glob("*/records.jsonl"))
    assert len(buffers) == 1 and len(list(pending.glob("*.json"))) == 1
    records = [json.loads(line) for line in buffers[0].read_text().splitlines()]
    steps = sorted({r["payload"]["step"] for r in records if r["kind"] == "metrics"})
    assert steps[-1] == 6 and 3 in steps  # every metric after the loss is kept, up to the last step
    assert records[-1]["kind"] == "end" and records[-1]["payload"]["status"] == "FINISHED"
