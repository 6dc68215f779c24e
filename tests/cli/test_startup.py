"""The CLI answers without torch: ``beit --help``, ``beit CMD --help``, ``beit presets`` and ``beit --version`` leave
``torch`` out of ``sys.modules`` (checked in a fresh interpreter); ``beit presets`` reads the presets from
:mod:`beit.recipes` and its parameter counts equal the built models'; ``--print-config`` prints the resolved config
and trains nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

import beit
from beit import recipes
from beit.cli import build_parser, main
from tests.helpers.paths import ROOT

_PROBE = """
import contextlib, io, json, sys
from beit.cli import build_parser, main
argvs = json.loads(sys.argv[1])
out = {}
for argv in argvs:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    out[" ".join(argv)] = {"rc": rc, "torch": "torch" in sys.modules, "chars": len(buf.getvalue())}
print(json.dumps(out))
"""


def _commands() -> list[list[str]]:
    """Every command and subcommand of the parser, as argv prefixes."""
    parser = build_parser()
    found = []

    def walk(p, prefix):
        subs = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs:
            found.append(prefix)
        for s in subs:
            for name, child in s.choices.items():
                walk(child, [*prefix, name])

    walk(parser, [])
    return found


def test_parsing_every_command_imports_no_torch():
    commands = _commands()
    assert {"pretrain", "finetune", "probe", "presets", "demo"} <= {c[0] for c in commands} and len(commands) >= 13
    argvs = [["--help"], ["--version"], ["presets"], ["presets", "--json"], *([*c, "--help"] for c in commands)]
    p = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(argvs)], capture_output=True, text=True,
                       timeout=300, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(res) == len(argvs)
    for argv, r in res.items():
        assert r["rc"] == 0 and r["chars"] > 8, (argv, r)  # it printed (help, version, presets)
        assert not r["torch"], f"`beit {argv}` imported torch"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"beit {beit.__version__}"
    assert beit.__version__.count(".") == 2


def test_parameter_count_formula_matches_the_models():
    """The torch-free count of every built-in recipe's model (and of heads, tables and options the recipes leave
    out) equals the parameters of the model built from it."""
    from beit.config import ModelConfig, from_dict
    from beit.models.vit import VisionTransformer

    sections = [*recipes.MODELS.values(), *(r["model"] for rs in recipes.PRETRAIN.values() for r in rs.values()),
                *(r["model"] for r in recipes.FINETUNE.values()), *(r["model"] for r in recipes.SEGMENT.values())]
    sections = [s for s in sections if s["embed_dim"] <= 384]  # the base/large ones only cost time to build
    sections += [{**recipes.MODELS["beit_tiny_patch4_32"], **extra} for extra in (
        {"num_classes": 10, "head_grid": 2}, {"vocab_size": 512, "use_abs_pos_emb": True},
        {"qkv_bias": False, "layer_scale_init": 0.0, "use_fc_norm": True, "num_classes": 3},
        {"use_sincos_pos_emb": True, "use_shared_rel_pos_bias": False, "use_mask_token": True, "img_size": [16, 24]},
        {"mlp_ratio": 2.5, "in_chans": 1, "use_rel_pos_bias": True})]
    for section in sections:
        model = VisionTransformer(from_dict(ModelConfig, dict(section)))
        assert recipes.parameter_count(section) == sum(p.numel() for p in model.parameters()), section
    assert round(recipes.parameter_count(recipes.MODELS["beit_base_patch16_224"]) / 1e6, 1) == 85.7  # BEiT-B: 86M


def test_presets_lists_sizes_lengths_and_batches(capsys):
    assert main(["presets", "--json"]) == 0
    rows = {(r["kind"], r["name"]): r for r in json.loads(capsys.readouterr().out)["presets"]}
    seg = rows[("segmentation", "beit_tiny_patch4_32")]
    assert seg["length"] == "2000 steps" and seg["batch"] == 16
    assert seg["params"] == recipes.parameter_count(recipes.SEGMENT["beit_tiny_patch4_32"]["model"])
    assert rows[("fine-tuning", "beit_tiny_patch4_32")]["length"] == "160 epochs"
    assert {k for k, _ in rows} >= {"backbone", "tokenizer", "pretraining (mae)", "fine-tuning", "segmentation"}
    from beit.methods import registry
    from beit.tasks import finetune

    assert set(registry.presets()) == {n for k, n in rows if k.startswith("pretraining")}
    assert finetune.PRESETS is recipes.FINETUNE
    assert main(["presets"]) == 0
    human = capsys.readouterr().out
    assert "2.68M params, 2000 steps, batch 16" in human and "--time" in human


def test_presets_time_measures_steps(capsys):
    assert main(["presets", "--json", "--time", "--time-presets", "beit_tiny_patch4_32"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out)["presets"] if "seconds_per_step" in r]
    assert {r["kind"] for r in rows} == {"fine-tuning", "segmentation", "pretraining (beit)"}
    seg = next(r for r in rows if r["kind"] == "segmentation")
    assert seg["seconds_per_step"] > 0 and seg["estimated_minutes"] == pytest.approx(
        seg["seconds_per_step"] * 2000 / 60, abs=0.06)


@pytest.mark.parametrize("argv", [
    ["finetune", "--data", "d", "--init", "none", "--preset", "beit_tiny_patch4_32"],
    ["segment", "--data", "d", "--init", "none", "--preset", "camvid_tiny_patch8_120x160"],
    ["pretrain", "--data", "d", "--method", "mae"],
    ["tokenizer", "train", "--data", "d", "--preset", "vq_32_small"],
])
def test_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path, capsys, argv):
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out), "--print-config", "--steps", "7", "--log", "mlflow", "optim.lr=0.002"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["train"]["steps"] == 7 and cfg["optim"]["lr"] == 0.002 and cfg["train"]["log"] == ["mlflow"]
    assert cfg["data"]["path"] == "d" and not out.exists()
