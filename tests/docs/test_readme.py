"""Every command in the README, run as written on tiny data (budgets shrunk), in README order.

Substitutions, and nothing else: ``--steps N``/``--epochs N`` become 2 steps, training commands get a small
batch and no worker processes, and the folders the README names (``my_images/``...) are generated here.
Not run here: ``make setup``/``make test`` (that is ``.ci/run``), ``beit demo`` (tests/demo/test_demo.py runs its
fast variant), and the ImageNet-on-GPUs ``torchrun`` lines, which are parsed by the real parser and checked
for known presets; the CPU ``torchrun`` line runs with 2 processes; a ``VAR=value beit ...`` line runs in a new
process with those variables set (they must be set before torch loads).
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import beit
from beit import machine
from beit.cli import build_parser, main
from tests.helpers.paths import ROOT

README = ROOT / "README.md"
TRAINING = ("tokenizer train", "pretrain", "finetune", "segment")


def readme_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


def readme_commands() -> list[str]:
    cmds = []
    for block in readme_blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


def shrink(argv: list[str]) -> list[str]:
    """Training commands: 2 steps, batch 8, no worker processes; other commands unchanged."""
    training = any(" ".join(argv).startswith(t) for t in TRAINING)
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--steps", "--epochs"):
            i += 2
            continue
        out.append(argv[i])
        i += 1
    if training:
        out += ["--steps", "2", "--batch-size", "8", "train.num_workers=0"]
    return out


def _images(folder: Path, n: int, seed: int, size: int = 32) -> None:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"img{i}.png")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "my_images", 16, 0)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "my_images" / "example.png")
    _images(tmp_path / "my_heldout_images", 8, 1)
    for split, n in (("train", 8), ("val", 4)):
        for c in ("cats", "dogs"):
            _images(tmp_path / "my_labelled" / split / c, n, hash((split, c)) % 1000)
    # an official-format BEiT pretraining checkpoint ({'model': ...}), tiny so the test is quick
    from beit.config import ModelConfig
    from beit.models.vit import VisionTransformer

    cfg = ModelConfig(img_size=224, patch_size=16, embed_dim=32, depth=2, num_heads=2, vocab_size=64)
    torch.save({"model": VisionTransformer(cfg).state_dict()}, tmp_path / "beit_base_patch16_224_pt22k.pth")
    # OpenAI-format DALL-E pickles (whole modules of the dall_e package), small
    dall_e = pytest.importorskip("dall_e")
    torch.save(dall_e.Encoder(n_hid=32, n_blk_per_group=1, vocab_size=64, requires_grad=False), tmp_path / "encoder.pkl")
    torch.save(dall_e.Decoder(n_hid=32, n_blk_per_group=1, vocab_size=64, requires_grad=False), tmp_path / "decoder.pkl")
    return tmp_path


def check_python_block(scope: dict, workdir: Path, block: str) -> None:
    """What each README Python snippet promises, by the names it defines."""
    images = torch.rand(2, 3, 32, 32)
    if "mim" in scope:  # beit.load of each kind
        assert scope["model"](images).shape == (2, 2)
        mask = torch.zeros(2, 64, dtype=torch.bool)
        mask[:, :3] = True
        assert scope["mim"](images, mask).shape[0] == 6
        ids = scope["tok"].encode(images)
        assert ids.shape == (2, 8, 8) and scope["tok"].decode(ids).shape == (2, 3, 32, 32)
    elif "res" in scope:  # the Python API
        assert scope["res"].run_dir == Path("runs/ft_py") and scope["res"].step == 2 and "top1" in scope["res"].best
        assert scope["pre"].step == 2 and (workdir / "runs/mae_py/config.yaml").is_file()
        assert scope["knn"].best["pool"] == "mean"
        assert scope["emb"].features.shape == (8, beit.load("runs/ft_py").cfg.embed_dim)
        assert scope["emb"].classes == ["cats", "dogs"]
    else:  # embeddings in five lines
        lines = [ln for ln in block.splitlines() if ln.strip()]
        assert len(lines) <= 5, lines  # the promise: embeddings for a folder in five lines
        width = scope["model"].cfg.embed_dim
        assert scope["emb"].shape == (8, width)  # 8 validation images, pooled
        direct = beit.load("runs/ft")
        x = scope["tf"](Image.open(sorted((workdir / "my_labelled/val").rglob("*.png"))[0]))
        with torch.no_grad():
            torch.testing.assert_close(scope["emb"][0], direct.forward_pooled(x[None])[0], rtol=0, atol=1e-5)


def test_readme_commands_run(workdir):
    cmds = readme_commands()
    beit_cmds = [c for c in cmds if c.startswith("beit ")]
    assert len(beit_cmds) >= 12, beit_cmds
    parser = build_parser()
    ran, ran_ddp, ran_env = 0, False, 0
    for cmd in cmds:
        argv = shlex.split(cmd)
        env_words = list(itertools.takewhile(lambda w: "=" in w, argv))
        if env_words:  # `VAR=value beit ...`: a variable that must be set before torch loads, so a new process
            argv = argv[len(env_words):]
            assert argv[0] == "beit", cmd
            env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **dict(w.split("=", 1) for w in env_words))
            subprocess.run([sys.executable, "-m", "beit", *shrink(argv[1:])], env=env, check=True, capture_output=True,
                           timeout=600, cwd=workdir)
            ran_env += 1
            continue
        if argv[0] in ("make", "source"):
            continue
        if argv[:2] == ["beit", "demo"]:
            continue  # tests/demo/test_demo.py
        if argv[0] == "torchrun":
            k = argv.index("-m") + 1  # `-m beit`
            parser.parse_args(argv[k + 1:])  # the real parser accepts it (presets included)
            if "--device" in argv and argv[argv.index("--device") + 1] == "cpu":  # runnable here: run it
                run = [sys.executable, "-m", "torch.distributed.run", *argv[1:k + 1], *shrink(argv[k + 1:])]
                env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
                subprocess.run(run, env=env, check=True, capture_output=True, timeout=600, cwd=workdir)
                ran_ddp = True
            continue
        assert argv[0] == "beit", cmd
        code = main(shrink(argv[1:]))
        assert code == 0, cmd
        ran += 1
    assert ran == len(beit_cmds) - 1 and ran_env >= 1
    assert ran_ddp, "the README's CPU torchrun line did not run"
    assert (workdir / "export/hf/config.json").is_file()
    assert (workdir / "export/timm/config.json").is_file()
    assert (workdir / "attention.png").is_file() and (workdir / "mim.png").is_file()

    # the Python snippets, as written (training lengths shrunk as for the commands)
    blocks = readme_blocks("python")
    assert len(blocks) == 3
    for block in blocks:
        block = re.sub(r"steps=\d+", "steps=2", block)
        block = re.sub(r'"batch_size": \d+', '"batch_size": 8, "num_workers": 0', block)
        scope: dict = {}
        exec(compile(block, "README.md", "exec"), scope)
        check_python_block(scope, workdir, block)
    assert isinstance(beit.load(workdir / "runs/beit"), beit.VisionTransformer)
    # the AVX2-capped run (section "Precision on your CPU"): auto measured bf16 as slow and ran in fp32
    if "avx2" in machine.cpu_flags():
        assert yaml.safe_load((workdir / "runs/mae_avx2/config.yaml").read_text())["train"]["precision"] == "fp32"
