"""Safe weight I/O: safetensors round trip with metadata, atomic writes, pickles that run code refused;
run checkpoints: content hashes, fallback, leftovers of interrupted writes, failed writes."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path

import pytest
import torch

from beit.checkpoint_io import (
    CheckpointError,
    CheckpointWriteError,
    load_weights,
    read_torch_file,
    save_weights,
)
from tests.helpers.checkpoints import as_written_before_manifests


def test_safetensors_round_trip_with_metadata(tmp_path):
    w = torch.randn(4, 3)
    sd = {"a": w, "b": torch.arange(5), "tied": w, "view": w.t()}  # aliases and non-contiguous tensors
    meta = {"model_config": {"embed_dim": 32, "use_fc_norm": None}, "step": 7, "note": "x"}
    path = save_weights(sd, tmp_path / "sub" / "w.safetensors", meta)
    out, m = load_weights(path)
    assert set(out) == set(sd)
    for k in sd:
        torch.testing.assert_close(out[k], sd[k])
    assert m == meta
    assert [p.name for p in path.parent.iterdir()] == ["w.safetensors"]  # no temporary left behind


def test_failed_write_keeps_previous_file(tmp_path):
    path = save_weights({"a": torch.ones(2)}, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError):
        save_weights({"a": "not a tensor"}, path)  # type: ignore[dict-item]
    assert torch.equal(load_weights(path)[0]["a"], torch.ones(2))
    assert len(list(tmp_path.iterdir())) == 1


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_weights(bad)
    with pytest.raises(CheckpointError, match="no such file"):
        load_weights(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_torch_file(junk)


def test_torch_file_with_tensors_and_namespace(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": {"w": torch.ones(3)}, "epoch": 3, "args": argparse.Namespace(lr=0.1)}, path)
    obj = read_torch_file(path)
    assert torch.equal(obj["model"]["w"], torch.ones(3)) and obj["args"].lr == 0.1


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "payload": _Evil(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refuses to unpickle arbitrary objects"):
        read_torch_file(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------- run checkpoints


def _checkpoint(run, step=5):
    from beit.checkpoint import save_checkpoint

    return save_checkpoint(run, step, {"w": torch.linspace(-1, 1, 4096)}, state={"note": "x"})


def test_manifest_catches_corruption_that_stays_finite(tmp_path):
    from beit.checkpoint import checkpoint_problem, latest_checkpoint, require_checkpoint
    from beit.loading import read_checkpoint

    ck = _checkpoint(tmp_path)
    assert checkpoint_problem(ck) is None and latest_checkpoint(tmp_path) == ck
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[-64:] = torch.full((16,), 0.25).numpy().tobytes()  # still a valid file of finite floats
    (ck / "model.safetensors").write_bytes(bytes(data))
    from safetensors.torch import load_file

    assert torch.isfinite(load_file(ck / "model.safetensors")["w"]).all()
    with pytest.raises(CheckpointError, match="does not match the SHA-256 recorded in it"):
        load_weights(ck / "model.safetensors")  # the file carries its own digest too (issue 26)
    assert "SHA-256" in checkpoint_problem(ck)
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no intact checkpoint .*step_00000005: model.safetensors does not match"):
        require_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="damaged"):
        read_checkpoint(ck)


def test_checkpoint_without_manifest_is_checked_by_parsing(tmp_path, caplog):
    from beit.checkpoint import checkpoint_problem
    from beit.loading import read_checkpoint

    ck = _checkpoint(tmp_path)
    as_written_before_manifests(ck)
    assert checkpoint_problem(ck) is None
    assert torch.equal(read_checkpoint(ck)[0]["w"], torch.linspace(-1, 1, 4096))
    assert sum("predates manifests" in r.getMessage() for r in caplog.records) == 1  # said once
    (ck / "state.json").write_text('{"step": ')
    assert checkpoint_problem(ck) == "state.json is not readable JSON"


def test_leftovers_of_dead_writers_are_removed(tmp_path):
    from beit.checkpoint import remove_stale

    ck = _checkpoint(tmp_path)
    ckdir = ck.parent
    dead = _dead_pid()
    (ckdir / f".tmp-step_00000010-{dead}").mkdir()
    (tmp_path / f".tmp-config.yaml-{dead}").write_text("x")
    (tmp_path / "decode_cache").mkdir()
    (tmp_path / "decode_cache" / f"images.u8.tmp{dead}").write_text("x")  # beit.data.cache's temporary
    os.replace(ck, ckdir / f".old-step_00000005-{dead}")  # killed between the two renames
    live = ckdir / f".tmp-step_00000011-{os.getppid()}"
    live.mkdir()
    removed = remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == [f".tmp-config.yaml-{dead}", f".tmp-step_00000010-{dead}",
                                               f"images.u8.tmp{dead}"]
    assert ck.is_dir() and live.is_dir()  # the interrupted replacement was undone; a live writer's kept
    remove_stale(tmp_path, keep_live=False)
    assert not live.exists()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_failed_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import beit.checkpoint as ckpt

    first = _checkpoint(tmp_path)

    def full(tensors, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    with pytest.raises(CheckpointWriteError, match="no space left on the device; partial files were removed"):
        _checkpoint(tmp_path, 10)
    assert sorted(p.name for p in first.parent.iterdir()) == ["latest", first.name]
