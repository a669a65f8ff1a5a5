"""Checkpoints count only when their manifest (written last) matches every file."""

import json

import pytest

from qloraflow import checkpoint as ckpt


def _make(root, step, payload=b"weights"):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(payload)
    (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return d


def test_latest_complete_skips_half_written_and_corrupted(tmp_path):
    ckpt.write_manifest(_make(tmp_path, 10))
    ckpt.write_manifest(_make(tmp_path, 20))
    corrupted = _make(tmp_path, 30)
    ckpt.write_manifest(corrupted)
    (corrupted / "adapter_model.safetensors").write_bytes(b"torn write")
    _make(tmp_path, 40)  # killed before its manifest
    with pytest.warns(UserWarning) as record:
        best = ckpt.latest_complete(tmp_path)
    assert best == tmp_path / "checkpoint-20"
    messages = " ".join(str(w.message) for w in record)
    assert "checkpoint-40" in messages and "no manifest" in messages
    assert "checkpoint-30" in messages and "does not match its hash" in messages
    # set aside, not deleted: nothing finished is ever lost, and the trainer cannot reuse the name
    aside = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("incomplete-"))
    assert len(aside) == 2 and not (tmp_path / "checkpoint-40").exists()


def test_no_checkpoint_at_all(tmp_path):
    assert ckpt.latest_complete(tmp_path / "missing") is None
    assert ckpt.latest_complete(tmp_path) is None


def test_save_atomic_replaces_only_when_complete(tmp_path):
    final = tmp_path / "adapter"
    ckpt.save_atomic(final, lambda d: (d / "a.bin").write_bytes(b"v1"))
    assert ckpt.verify(final) is None and (final / "a.bin").read_bytes() == b"v1"

    def crash(d):
        (d / "a.bin").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        ckpt.save_atomic(final, crash)
    assert (final / "a.bin").read_bytes() == b"v1"  # the previous complete version is untouched
