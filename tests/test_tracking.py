"""MLflow tracking: fail fast when the server is unreachable, keep training when it is lost mid-run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import free_port, tiny_config, wait_http
from qloraflow.errors import TrackingError
from qloraflow.tracking import MlflowTracker
from qloraflow.train import train_adapter


def test_unreachable_server_fails_fast_naming_the_uri(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=uri.replace(".", r"\.")):
        MlflowTracker("x", uri, fallback_dir=tmp_path)
    assert time.monotonic() - t0 < 15


def test_server_lost_mid_run_training_continues_and_records_are_kept(tmp_path, tiny_model_dir, tiny_tokenized):
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
         f"sqlite:///{tmp_path}/m.db", "--artifacts-destination", str(tmp_path / "art"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", 90)
        tracker = MlflowTracker("lost", uri, run_name="lost-mid-run", fallback_dir=tmp_path)
        cfg = tiny_config(tiny_model_dir, **{"train.max_steps": 6, "train.save_steps": 2})

        def lose_server(_folder: Path) -> None:  # after the first checkpoint, the server dies
            if server.poll() is None:
                os.killpg(server.pid, 9)
                server.wait(10)

        summary = train_adapter(cfg, tiny_tokenized, tmp_path / "run", tracker=tracker, on_checkpoint=lose_server)
        tracker.close()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, 9)
    assert summary["global_step"] == 6 and (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert tracker.degraded is True
    records = [json.loads(line) for line in (tmp_path / "mlflow-fallback.jsonl").read_text().splitlines()]
    steps = sorted({r["payload"]["step"] for r in records if r["kind"] == "metrics"} - {None})
    assert steps[-1] == 6 and 3 in steps  # every metric after the loss is kept, up to the last step
    assert all(r["run_id"] == tracker.run_id for r in records)
