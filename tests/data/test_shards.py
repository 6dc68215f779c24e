"""Tar shards and HF datasets folders as ``--data``: packing, reading, exact mid-epoch resume, and every sample
exactly once per epoch across 2 ranks x 2 DataLoader workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from beit.data.folder import DataError, ImageFolder
from beit.data.shards import HFImageDataset, TarShards, expand_braces, open_images, pack, shard_paths, verify
from beit.engine import SeededDataset, StepBatchSampler
from tests.helpers.paths import ROOT


def test_brace_expansion():
    assert expand_braces("s/t-{000..002}.tar") == ["s/t-000.tar", "s/t-001.tar", "s/t-002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(DataError, match="counts down"):
        expand_braces("{3..1}")


@pytest.fixture
def packed(tmp_path, make_image_folder):
    folder = make_image_folder(tmp_path / "imgs", classes=("cat", "dog", "emu"), per_class=8)
    ds = ImageFolder(folder, with_labels=True)
    shards = pack(ds, tmp_path / "shards", shard_size=5)
    return folder, ds, shards


def test_pack_round_trip(packed, tmp_path):
    folder, ds, shards = packed
    assert [p.name for p in shards] == [f"train-{i:06d}.tar" for i in range(5)]  # 24 images, 5 per shard
    for spec in (f"{tmp_path}/shards/train-{{000000..000004}}.tar", tmp_path / "shards" / "shards.txt",
                 tmp_path / "shards"):
        sh = open_images(spec, with_labels=True)
        assert isinstance(sh, TarShards) and len(sh) == len(ds) and sh.classes == ["cat", "dog", "emu"]
        assert sh.targets == ds.targets
        for i in (0, 7, 23):
            a, la = sh[i]
            b, lb = ds[i]
            assert la == lb and np.array_equal(np.asarray(a), np.asarray(b))
    assert isinstance(open_images(folder, with_labels=True), ImageFolder)  # a folder stays a folder


def test_pack_refuses_to_overwrite_and_verify_catches_damage(packed, tmp_path):
    _, ds, shards = packed
    with pytest.raises(DataError, match="already holds shards"):
        pack(ds, tmp_path / "shards")
    sh = TarShards(shards)
    si, offset, size, _ = sh.samples[6][0]
    raw = bytearray(shards[si].read_bytes())
    raw[offset + size // 2] ^= 0xFF  # one byte inside an image member
    shards[si].write_bytes(bytes(raw))
    with pytest.raises(DataError, match="differs from"):
        verify(shards, ds.samples)


def test_missing_shard_is_one_line_error(tmp_path):
    with pytest.raises(DataError, match="2 of the 2 shards"):
        shard_paths(f"{tmp_path}/x-{{0..1}}.tar")


def test_hf_datasets_folder(tmp_path, make_image_folder):
    datasets = pytest.importorskip("datasets")
    folder = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=4)
    ds = ImageFolder(folder, with_labels=True)
    hf = datasets.Dataset.from_dict(
        {"image": [str(p) for p in ds.paths], "label": ds.targets},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])}))
    hf.save_to_disk(str(tmp_path / "hf"))
    got = open_images(tmp_path / "hf", with_labels=True)
    assert isinstance(got, HFImageDataset) and got.classes == ["a", "b"] and got.targets == ds.targets
    for i in range(len(ds)):
        assert np.array_equal(np.asarray(got[i][0]), np.asarray(ds[i][0]))


def _fingerprint(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).reshape(-1)[:48].astype(np.int64))


def test_every_sample_once_per_epoch_over_two_ranks_and_two_workers(packed):
    _, ds, shards = packed
    sh = TarShards(shards, transform=_fingerprint)
    want = sorted(tuple(_fingerprint(ds.load(i)[0]).tolist()) for i in range(len(ds)))
    seen: list[tuple] = []
    steps_per_epoch = len(sh) // 8
    for rank in (0, 1):
        sampler = StepBatchSampler(len(sh), 8, seed=3, start=0, total=steps_per_epoch, rank=rank, world=2, accum=1)
        loader = DataLoader(SeededDataset(sh, 3), batch_sampler=sampler, num_workers=2)
        for batch in loader:
            seen += [tuple(row.tolist()) for row in batch]
    assert sorted(seen) == want  # no sample repeated, none dropped


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("kind", ["tar", "hf"])
def test_pretraining_on_shards_resumes_mid_epoch_exactly(packed, tmp_path, kind):
    pattern = f"{tmp_path}/shards/train-{{000000..000004}}.tar"
    if kind == "hf":  # the same images as an HF datasets folder
        datasets = pytest.importorskip("datasets")
        _, ds, _ = packed
        datasets.Dataset.from_dict({"image": [str(p) for p in ds.paths]},
                                   features=datasets.Features({"image": datasets.Image()})).save_to_disk(
            str(tmp_path / "hf"))
        pattern = str(tmp_path / "hf")
    driver = [sys.executable, "-m", "tests.helpers.pretrain_driver"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    common = ["--data", pattern, "--preset", "mae_tiny_patch4_32", "--steps", "9", "train.num_workers=2"]

    def drive(run, *extra, check=True):
        return subprocess.run([*driver, str(run), *common, *extra], env=env, capture_output=True, text=True,
                              check=check, timeout=300)

    full, cut = tmp_path / "full", tmp_path / "cut"
    drive(full)
    killed = drive(cut, "--kill-at", "5", check=False)  # 24 images, batch 4: checkpoint at step 3 of epoch 0
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    drive(cut, "--resume")
    a, b = _losses(full), _losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 10))
    assert all(a[s] == b[s] for s in a), [(s, a[s], b[s]) for s in a if a[s] != b[s]]


def test_cli_pack_and_info(tmp_path, make_image_folder):
    folder = make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=3)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = [sys.executable, "-m", "beit", "-q", "data"]  # with --json after each subcommand
    res = subprocess.run([*run, "pack", str(folder), "--out", str(tmp_path / "sh"), "--shard-size", "4", "--json"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["shards"] == 2 and out["samples"] == 6 and out["classes"] == 2
    info = subprocess.run([*run, "info", out["pattern"], "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert json.loads(info.stdout.strip().splitlines()[-1]) == {"kind": "TarShards", "samples": 6, "classes": 2,
                                                                "shards": 2}
    again = subprocess.run([*run, "pack", str(folder), "--out", str(tmp_path / "sh")], env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 2 and "Traceback" not in again.stderr and "already holds shards" in again.stderr


@pytest.mark.slow
def test_two_nodes_on_loopback_survive_the_kill_of_one(packed, tmp_path):
    """scripts/two_node_sim.py: two torchrun agents (c10d rendezvous on 127.0.0.1, gloo), node 1 killed after a
    checkpoint, both restarted with --resume: every step's loss equals the uninterrupted two-node run's."""
    pattern = f"{tmp_path}/shards/train-{{000000..000004}}.tar"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "two_node_sim.py"), "--data", pattern,
                          "--work", str(tmp_path / "two"), "--steps", "40", "--ckpt-every", "5", "--kill-after", "12",
                          "--timeout", "240"],
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=900)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert res.returncode == 0 and out["ok"], (out, res.stderr[-2000:])
    assert out["rc_killed"] == [-9, -9] and 12 <= out["killed_after_step"] < 40
    resumed_from = sorted(p.name for p in (tmp_path / "two" / "cut" / "checkpoints").glob("step_*"))
    assert resumed_from[-1] == "step_00000040"
