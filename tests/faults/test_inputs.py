"""The fault catalogue, inputs, labels and config (issue 26, cases 2, 5, 6, 8, 9, 10, 13, 14).

Like tests/faults/test_catalogue.py: every case goes through the real CLI and asserts what the user sees (a warned
skip that really skips, or exit status 2 and one ``beit: error:`` line, never a traceback) and what is left
on disk. Data: tiny solid-colour images (16-32 px), so a run or a probe takes a second or two.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import socket
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

import beit.tokenizers
from beit.cli import main
from beit.config import ConfigError
from beit.data.folder import DataError, ImageFolder
from beit.tasks import finetune, probe, segment
from beit.tasks import pretrain as pretrain_task
from beit.tokenizers import train as tok_train
from tests.faults.test_catalogue import assert_user_error, cli_runner, pretrain
from tests.helpers.paths import ROOT
from tests.helpers.synthetic import make_colour_dataset

TINY_FT = ["--init", "none", "--steps", "2", "--batch-size", "4", "--precision", "fp32", "--workers", "0",
           "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.img_size=16", "model.patch_size=4",
           "aug.mixup=0", "aug.cutmix=0"]


@pytest.fixture
def cli(capsys, caplog):
    """``cli(ARGS)`` -> (exit status, stderr + log records), as in tests/faults/test_catalogue.py."""
    return cli_runner(capsys, caplog)


def png_claiming(path: Path, width: int, height: int) -> None:
    """A valid PNG header claiming ``width x height`` pixels, with one tiny IDAT (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def add_bad_files(folder: Path, n: int = 3) -> list[Path]:
    """``n`` kinds of unreadable file in ``folder``: empty, garbage, a PNG signature followed by junk."""
    kinds = [b"", b"this is not an image", b"\x89PNG\r\n\x1a\n junk"]
    made = []
    for i in range(n):
        p = folder / f"bad{i}.png"
        p.write_bytes(kinds[i % len(kinds)])
        made.append(p)
    return made


def knn_pixels(cli, data: Path, out: Path) -> dict:
    code, err = cli(["probe", "knn", "--data", data, "--init", "pixels", "--workers", "0", "--out", out])
    assert code == 0 and "Traceback" not in err, err
    return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------- case 2


def test_unreadable_images_are_skipped_not_replaced_in_a_probe(tmp_path, cli):
    """Zero-byte and garbage PNGs in train/ and val/: the kNN probe (raw pixels) gives exactly the numbers of
    the same folder without them (before: each was replaced by the next readable image, with its label)."""
    clean = make_colour_dataset(tmp_path / "clean", n_train=4, n_val=3)
    dirty = Path(shutil.copytree(clean, tmp_path / "dirty"))
    bad = add_bad_files(dirty / "val" / "red") + add_bad_files(dirty / "train" / "blue", 2)
    ref = knn_pixels(cli, clean, tmp_path / "clean.json")
    got = knn_pixels(cli, dirty, tmp_path / "dirty.json")
    assert got["num_val"] == ref["num_val"] and got["num_train"] == ref["num_train"]
    assert got["best"] == ref["best"] and got["per_layer"] == ref["per_layer"]
    listed = (tmp_path / "dirty.skipped_files.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(map(str, bad))
    assert not (tmp_path / "clean.skipped_files.txt").exists()


def test_unreadable_images_are_skipped_not_replaced_in_finetuning(tmp_path, cli, caplog):
    """Fine-tuning counts only the readable images (training and validation) and lists the rest in the run."""
    caplog.set_level(logging.INFO, logger="beit")
    clean = make_colour_dataset(tmp_path / "clean", n_train=4, n_val=2)
    dirty = Path(shutil.copytree(clean, tmp_path / "dirty"))
    bad = add_bad_files(dirty / "train" / "red", 2) + add_bad_files(dirty / "val" / "green", 3)
    results = {}
    for name, data in (("clean", clean), ("dirty", dirty)):
        code, err = cli(["finetune", "--data", data, "--out", tmp_path / f"ft_{name}", *TINY_FT])
        assert code == 0 and "Traceback" not in err, err
        results[name] = err
        counts = re.search(r"fine-tuning on (\d+) images, \d+ classes \(val: (\d+)\)", err)
        assert counts, err
        results[name] = (counts.groups(), [json.loads(r) for r in (tmp_path / f"ft_{name}" / "metrics.jsonl")
                                          .read_text().splitlines() if "val_top1" in r])
    assert results["dirty"][0] == results["clean"][0] == ("12", "6")
    assert results["dirty"][1][-1]["val_top1"] == results["clean"][1][-1]["val_top1"]
    assert results["dirty"][1][-1]["val_loss"] == pytest.approx(results["clean"][1][-1]["val_loss"], rel=1e-5)
    listed = (tmp_path / "ft_dirty" / "skipped_files.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in listed) == sorted(map(str, bad))


def test_one_warning_counts_the_skipped_files(tmp_path, cli):
    data = make_colour_dataset(tmp_path / "d", n_train=4, n_val=1)
    add_bad_files(data / "train" / "red", 5)
    code, err = cli([*pretrain(data / "train", tmp_path / "r", 2)])
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if "unreadable" in ln or "left out" in ln]
    assert len(lines) == 1, lines  # once, with the count and where the list goes
    assert "5 of 17 files are left out" in lines[0] and "RUN/skipped_files.txt" in lines[0]
    assert len((tmp_path / "r" / "skipped_files.txt").read_text().splitlines()) == 5


# --------------------------------------------------------------------------------------------- cases 6, 8, 9


@pytest.mark.parametrize("kind", ["bomb", "fifo", "socket", "dangling-link", "device"])
def test_special_and_huge_files_are_skipped_before_opening(tmp_path, cli, kind):
    """A PNG claiming 50,000 x 50,000 pixels, a FIFO (opening it would block forever), a socket, a dangling
    link and a device, each named like an image: skipped with the one warning, in pretraining (decode cache
    on, whose size estimate opens files) and in the pixel probe (whose input size comes from a file)."""
    data = make_colour_dataset(tmp_path / "d", n_train=4, n_val=2)
    first_class = sorted(p.name for p in (data / "train").iterdir())[0]
    name = "0-bad.png"  # sorts first ("-" < "."): the file the pixel probe would size its input from
    short = Path("/tmp") / f"beit-sock-{os.getpid()}"  # AF_UNIX paths must be short
    for folder in (data / "train" / first_class, data / "val" / first_class):
        target = folder / name
        if kind == "bomb":
            png_claiming(target, 50_000, 50_000)
        elif kind == "fifo":
            os.mkfifo(target)
        elif kind == "socket":
            short.mkdir(exist_ok=True)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.bind(str(short / folder.parent.name))
            os.symlink(short / folder.parent.name, target)
        elif kind == "dangling-link":
            os.symlink(tmp_path / "gone.png", target)
        else:
            os.symlink("/dev/zero", target)
    n_train = len(list((data / "train").rglob("*.png")))
    try:
        code, err = cli([*pretrain(data / "train", tmp_path / "r", 2), "data.decode_cache=on"])
        assert code == 0 and "Traceback" not in err, err
        assert f"1 of {n_train} files are left out ({first_class}/{name}: " in err, err
        listed = (tmp_path / "r" / "skipped_files.txt").read_text()
        assert listed.startswith(f"{data / 'train' / first_class / name}\t"), listed
        assert len((tmp_path / "r" / "decode_cache").glob("decoded-*.npy").__next__().read_bytes()) > 0
        res = knn_pixels(cli, data, tmp_path / "p.json")
        assert res["num_train"] == n_train - 1 and res["num_val"] == len(list((data / "val").rglob("*.png"))) - 1
    finally:
        shutil.rmtree(short, ignore_errors=True)


# --------------------------------------------------------------------------------------------- case 5


def test_control_characters_in_a_class_name_are_refused(tmp_path, cli):
    data = make_colour_dataset(tmp_path / "d", n_train=2, n_val=1)
    for split in ("train", "val"):
        os.rename(data / split / "red", data / split / "cat\ndog")
    code, err = cli(["finetune", "--data", data, "--out", tmp_path / "ft", *TINY_FT])
    assert_user_error(code, err, "control character", "'cat\\ndog'")
    assert not (tmp_path / "ft").exists()
    with pytest.raises(DataError, match="control character"):
        ImageFolder(data / "train", with_labels=True)


# --------------------------------------------------------------------------------------------- case 13


def test_one_class_is_an_error(tmp_path, cli):
    data = make_colour_dataset(tmp_path / "d", n_train=2, n_val=1)
    for split in ("train", "val"):
        for c in (data / split).iterdir():
            if c.name != "red":
                shutil.rmtree(c)
    code, err = cli(["finetune", "--data", data, "--out", tmp_path / "ft", *TINY_FT])
    assert_user_error(code, err, "only one class", "red")
    assert not (tmp_path / "ft").exists()
    code, err = cli(["probe", "linear", "--data", data, "--init", "pixels", "--workers", "0"])
    assert_user_error(code, err, "only one class")


def test_more_labels_per_class_than_exist_is_a_warning_with_the_numbers(tmp_path, cli):
    data = make_colour_dataset(tmp_path / "d", n_train=3, n_val=1)
    code, err = cli(["probe", "knn", "--data", data, "--init", "pixels", "--workers", "0",
                     "--labels-per-class", "500"])
    assert code == 0, err
    assert "--labels-per-class 500: the training data has fewer" in err and "3 to 3 images per class" in err, err


# --------------------------------------------------------------------------------------------- case 14


def test_resume_of_a_path_with_no_run_is_an_error(tmp_path, cli):
    data = make_colour_dataset(tmp_path / "d", n_train=4, n_val=1)
    typo = tmp_path / "rnu"
    code, err = cli([*pretrain(data / "train", typo, 2, "--resume")])
    assert_user_error(code, err, f"--resume {typo}", "--resume-or-start")
    assert not typo.exists()
    code, err = cli([*pretrain(data / "train", typo, 2, "--resume-or-start")])
    assert code == 0, err
    code, err = cli([*pretrain(data / "train", typo, 4, "--resume-or-start")])  # now it continues
    assert code == 0, err
    rows = [json.loads(r) for r in (typo / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # steps 1-2 kept: resumed, not restarted


def test_a_failed_start_leaves_nothing_behind(tmp_path, cli):
    """A start that fails after claiming the folder (here: the online probe's data is missing, found after the
    lock, run.json and the decode cache were made) removes what it created, never the user's files."""
    data = make_colour_dataset(tmp_path / "d", n_train=4, n_val=1)
    fresh = tmp_path / "fresh"
    failing = ["--probe-data", str(tmp_path / "no_such_folder"), "data.decode_cache=on"]
    code, err = cli([*pretrain(data / "train", fresh, 2, *failing)])
    assert_user_error(code, err, "no_such_folder")
    assert not fresh.exists(), sorted(p.name for p in fresh.iterdir())
    users = tmp_path / "empty_but_mine"
    users.mkdir()  # the user's (empty) folder: emptied of what the start made, but kept
    code, err = cli([*pretrain(data / "train", users, 2, *failing)])
    assert_user_error(code, err, "no_such_folder")
    assert users.is_dir() and list(users.iterdir()) == []


# --------------------------------------------------------------------------------------------- case 10


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]  # the notebook too: its commands still run


# a placeholder for the reader to fill in, not a value: train.seed=S, model.img_size=[h,w], train.precision=...
_PLACEHOLDER = re.compile(r"(?<![\w.])[A-Za-z](?![\w.])|\.\.\.|\|")
REFUSED_IN_DOCS = {"optim.lr=nan"}  # docs/runs.md: examples of values refused at parse time
_KV = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+)=(\S+)$")


def _pretrain_cfg(kv: list[str], method: str = "beit", preset: str | None = None):
    return pretrain_task.build_config(preset, None, [f"method={method}", *kv])


def _builders():
    """Every command's config builder (key=value list -> config); pretraining once per method."""
    from beit.methods import registry
    out = {f"pretrain --method {m}": (lambda kv, m=m: _pretrain_cfg(kv, m)) for m in registry.methods()}
    out.update({"finetune": lambda kv: finetune.build_config(None, None, kv),
                "segment": lambda kv: segment.build_config(None, None, kv),
                "probe": lambda kv: probe.build_config(None, kv),
                "tokenizer train": lambda kv: tok_train.build_config(None, None, kv),
                "tokenizer train --objective vqkd": lambda kv: tok_train.build_config("vqkd_32", None, kv)})
    # with each preset too: model.img_size=[120,160] needs the patch size of a preset that fits it
    out.update({f"pretrain --preset {p}": (lambda kv, p=p: pretrain_task.build_config(p, None, kv))
                for p in registry.presets()})
    out.update({f"segment --preset {p}": (lambda kv, p=p: segment.build_config(p, None, kv)) for p in segment.PRESETS})
    return out


def doc_commands() -> list[tuple[str, str]]:
    """``(file, beit command line)`` of every fenced code block of the README and docs/ holding a key=value."""
    found = []
    for f in _doc_files():
        for block in re.findall(r"```[^\n]*\n(.*?)```", f.read_text(), re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                m = re.search(r"\bbeit\s+(.*)", line.split(" #")[0])
                if m and any(_KV.match(t) for t in m.group(1).split()):
                    found.append((f.name, m.group(1).strip()))
    return found


def doc_inline_overrides() -> list[tuple[str, str]]:
    """``(file, key=value)`` written in the prose (inline code) of the README and docs/."""
    found = []
    for f in _doc_files():
        prose = re.sub(r"```.*?```", "", f.read_text(), flags=re.S)
        for span in re.findall(r"`([^`\n]+)`", prose):
            found += [(f.name, t) for t in span.split() if _KV.match(t)]
    return found


class _Built(Exception):
    def __init__(self, cfg):
        self.cfg = cfg


@pytest.fixture
def capture_configs(monkeypatch):
    """Every training command and the probe stop right after building their config, handing it back."""
    def stop(cfg, *a, **k):
        raise _Built(cfg)

    for task in (pretrain_task, finetune, segment, probe):
        monkeypatch.setattr(task, "run", stop)
    monkeypatch.setattr(beit.tokenizers, "train_tokenizer", lambda data, out, cfg=None, **k: stop(cfg))


def test_every_command_line_in_the_docs_parses_its_overrides(capture_configs):
    """Each ``beit ...`` line in a code block of README.md and docs/*.md, parsed by the real parser and built
    into its command's config (placeholders such as ``train.seed=S`` dropped): every key=value is taken."""
    commands = doc_commands()
    assert len(commands) >= 20
    checked = 0
    for source, line in commands:
        words = shlex.split(line)
        argv = [t for i, t in enumerate(words)
                if not (_KV.match(t) and _PLACEHOLDER.search(t.split("=", 1)[1]))  # train.seed=S
                and not (re.fullmatch(r"[A-Z_]+", t) and not words[i - 1].startswith("--"))]  # a trailing VARIANT
        with pytest.raises(_Built) as built:
            main(argv)
            pytest.fail(f"{source}: {line}")
        cfg = built.value.cfg
        for t in argv:
            m = _KV.match(t)
            if m:
                node = cfg
                for part in m.group(1).split("."):
                    node = getattr(node, part)
                checked += 1
                assert node is not None, (source, line, t)
    assert checked >= 40


def test_every_inline_override_in_the_docs_parses():
    """Each key=value in the prose of README.md and docs/*.md is accepted by some command's config, with the
    value as written: ``data.decode_cache=off`` stays the string ``off`` (YAML 1.1 read it as False)."""
    overrides = doc_inline_overrides()
    assert ("README.md", "data.decode_cache=off") in overrides
    builders = _builders()
    for source, kv in overrides:
        if _PLACEHOLDER.search(kv.split("=", 1)[1]):
            continue
        if kv in REFUSED_IN_DOCS:  # shown as a value that is refused: it must be
            with pytest.raises(ConfigError):
                _pretrain_cfg([kv])
            continue
        errors = []
        for name, build in builders.items():
            try:
                build([kv])
                break
            except ConfigError as e:
                errors.append(f"{name}: {e}")
        else:
            pytest.fail(f"{source}: {kv} is refused by every command: {errors}")
    assert _pretrain_cfg(["data.decode_cache=off"]).data.decode_cache == "off"
    assert _pretrain_cfg(["train.compile=off"]).train.compile in (False, "off")


def test_decode_cache_off_as_written_in_the_readme(tmp_path, cli):
    data = make_colour_dataset(tmp_path / "d", n_train=4, n_val=1)
    code, err = cli([*pretrain(data / "train", tmp_path / "r", 2), "data.decode_cache=off"])
    assert code == 0, err
    assert not (tmp_path / "r" / "decode_cache").exists()


def test_segmentation_folder_leaves_unreadable_images_out(tmp_path):
    """The segmentation folder follows the same rule: an unreadable image (with its mask) is left out, not
    replaced by the next image and mask; one that fails only when drawn gives None, never another sample."""
    from beit.data.segmentation import SegmentationFolder
    from tests.tasks.test_segment import make_shapes_dataset

    root = make_shapes_dataset(tmp_path / "seg", n_train=4, n_val=2)
    (root / "images" / "val" / "0.png").write_bytes(b"")
    shutil.copy(root / "masks" / "val" / "0.png", root / "masks" / "val" / "9.png")
    Image.new("RGB", (16, 16)).save(root / "images" / "val" / "9.png")
    ds = SegmentationFolder(root, "val")
    assert [p.name for p, _ in ds.samples] == ["1.png", "9.png"]
    assert [(p.name, r) for p, r in ds.skipped] == [("0.png", "an empty file")]
    (root / "images" / "val" / "9.png").write_bytes(b"\x89PNG\r\n\x1a\n" + (root / "images" / "val" / "9.png")
                                                   .read_bytes()[8:40])  # truncated after the header check
    assert ds[1] is None and ds[0] is not None
