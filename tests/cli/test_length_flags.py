"""A length flag typed on the command line wins over the preset's length, whichever unit the preset used.

``beit segment --epochs 1`` used to run the preset's 2,000 steps (``train.steps`` took precedence over
``train.epochs``); giving both flags is a one-line error.
"""

from __future__ import annotations

import json
import math

import pytest

from beit.cli import build_parser
from beit.cli.common import overrides
from beit.engine import resolve_steps
from beit.tasks import finetune, segment
from tests.tasks.test_segment import make_shapes_dataset

TINY_SEG = ["model.depth=2", "model.embed_dim=32", "model.num_heads=2", "model.img_size=16",
            "head.channels=16", "head.aux_channels=8"]


def _config(task, argv: list[str]):
    args = build_parser().parse_args(argv)
    return task.build_config(args.preset, args.config, overrides(args))


@pytest.mark.parametrize("n_samples", [10, 64])
def test_epochs_flag_overrides_a_preset_counted_in_steps(n_samples):
    assert segment.PRESETS["beit_tiny_patch4_32"]["train"]["steps"] == 2000  # the preset counts steps
    cfg = _config(segment, ["segment", "--data", "d", "--init", "none", "--out", "o",
                            "--preset", "beit_tiny_patch4_32", "--epochs", "1", "--batch-size", "4"])
    total, per_epoch = resolve_steps(cfg.train, n_samples)
    assert per_epoch == n_samples // 4 and total == math.ceil(1 * per_epoch)


def test_steps_flag_overrides_a_preset_counted_in_epochs():
    assert finetune.PRESETS["beit_tiny_patch4_32"]["train"]["epochs"] == 160  # the preset counts epochs
    cfg = _config(finetune, ["finetune", "--data", "d", "--init", "none", "--out", "o",
                             "--preset", "beit_tiny_patch4_32", "--steps", "7"])
    assert resolve_steps(cfg.train, 1000) == (7, 1000 // cfg.train.batch_size)
    assert cfg.train.epochs == 0


def test_without_flags_the_preset_length_stands():
    cfg = _config(segment, ["segment", "--data", "d", "--init", "none", "--out", "o", "--preset", "beit_tiny_patch4_32"])
    assert resolve_steps(cfg.train, 64)[0] == 2000


def test_segment_epochs_runs_one_epoch(tmp_path, capsys):
    from beit.cli import main

    data = make_shapes_dataset(tmp_path / "data", n_train=6, n_val=2)
    rc = main(["-q", "segment", "--data", str(data), "--init", "none", "--out", str(tmp_path / "run"),
               "--preset", "beit_tiny_patch4_32", "--epochs", "1", "--batch-size", "3", "--workers", "0",
               "--device", "cpu", "--json", *TINY_SEG])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 6 // 3


def test_both_length_flags_are_a_one_line_error(tmp_path, capsys):
    from beit.cli import main

    rc = main(["-q", "segment", "--data", str(tmp_path), "--init", "none", "--out", str(tmp_path / "run"),
               "--steps", "5", "--epochs", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith("beit: error:") and "--steps" in err and "--epochs" in err
