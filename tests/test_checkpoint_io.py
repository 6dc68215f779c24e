"""Safe weight I/O: safetensors round trip with metadata, atomic writes, pickles that run code refused."""

from __future__ import annotations

import argparse
import os

import pytest
import torch

from beit.checkpoint_io import CheckpointError, load_weights, read_torch_file, save_weights


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
