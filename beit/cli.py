"""``beit`` command line: parse, build configs, call the library. No training logic lives here.

Every training command accepts ``--preset``, ``--config FILE.yaml`` and trailing ``key=value`` overrides
(``optim.lr=1e-3 model.drop_path_rate=0.2``); common flags (``--steps``, ``--batch-size``...) are
shorthands for overrides. User mistakes end with one line ``beit: error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

log = logging.getLogger("beit")

# flag -> config key, shared by every training command
TRAIN_FLAGS = {
    "steps": "train.steps",
    "epochs": "train.epochs",
    "batch_size": "train.batch_size",
    "accum": "train.accum_steps",
    "lr": "optim.lr",
    "precision": "train.precision",
    "workers": "train.num_workers",
    "seed": "train.seed",
    "device": "train.device",
}


def _add_train_flags(p: argparse.ArgumentParser, presets: list[str] | None = None) -> None:
    g = p.add_argument_group("training (shorthands for config overrides)")
    g.add_argument("--preset", choices=presets, metavar="NAME",
                   help=f"recipe preset ({', '.join(presets)})" if presets else "recipe preset")
    g.add_argument("--config", metavar="YAML", help="config file applied after the preset")
    g.add_argument("--steps", type=int, help="total optimizer steps (train.steps)")
    g.add_argument("--epochs", type=float, help="epochs, if --steps is not given (train.epochs)")
    g.add_argument("--batch-size", type=int, help="global batch per optimizer step (train.batch_size)")
    g.add_argument("--accum", type=int, help="gradient accumulation steps (train.accum_steps)")
    g.add_argument("--lr", type=float, help="peak learning rate (optim.lr)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="train.precision")
    g.add_argument("--workers", type=int, help="data loading processes (train.num_workers)")
    g.add_argument("--seed", type=int, help="train.seed")
    g.add_argument("--device", help="auto | cpu | cuda (train.device)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    g.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop (with a checkpoint) after this many minutes of training; 0 = no limit")
    g.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-3")


def _overrides(args: argparse.Namespace, extra: dict[str, str] | None = None) -> list[str]:
    out = []
    for flag, key in {**TRAIN_FLAGS, **(extra or {})}.items():
        val = getattr(args, flag, None)
        if val is not None:
            out.append(f"{key}={val}")
    for item in args.overrides or []:
        if "=" not in item:
            raise SystemExit(f"beit: error: unexpected argument {item!r} (overrides are key=value)")
        out.append(item)
    return out


# --------------------------------------------------------------------------------------------- commands


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .tasks import pretrain

    ov = _overrides(args, {"method": "method", "data": "data.path", "tokenizer": "tokenizer", "limit": "data.limit"})
    cfg = pretrain.build_config(args.preset or _default_preset(args), args.config, ov)
    res = pretrain.run(cfg, args.out, resume=args.resume, max_minutes=args.max_minutes)
    _print_result(res)
    return 0


def _default_preset(args: argparse.Namespace) -> str | None:
    """Without --preset or --config: the CPU-sized recipe of the chosen method."""
    if args.config:
        return None
    return {"mae": "mae_tiny_patch4_32", "ibot": "ibot_tiny_patch4_32"}.get(args.method or "beit", "beit_tiny_patch4_32")


def _print_result(res) -> None:
    summary = {"run": str(res.run_dir), "step": res.step, "status": res.status}
    for k in ("loss", "mlm_acc", "acc"):
        if k in res.last_metrics:
            summary[k] = round(res.last_metrics[k], 4)
    if res.best_eval:
        summary["best"] = res.best_eval
    print(json.dumps(summary))


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .tokenizers import train_tokenizer

    ov = _overrides(args, {"limit": "data.limit", "val_data": "data.val_path"})
    preset = args.preset or (None if args.config else "vq_32")
    res = train_tokenizer(args.data, args.out, preset=preset, config=args.config, overrides=ov,
                          resume=args.resume, max_minutes=args.max_minutes)
    print(json.dumps(res if isinstance(res, dict) else {"run": str(res)}))
    return 0


def cmd_tokenizer_eval(args: argparse.Namespace) -> int:
    from .tokenizers import evaluate_cmd

    res = evaluate_cmd(args.tokenizer, args.data, limit=args.limit or 0, grid=args.grid, batch_size=args.batch_size)
    print(json.dumps(res))
    return 0


def cmd_tokenizer_convert(args: argparse.Namespace) -> int:
    from .tokenizers import convert_dalle

    out = convert_dalle(args.encoder, args.decoder, args.out)
    print(json.dumps({"tokenizer": str(out)}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from . import api, interop

    model = api.load(args.checkpoint, which=args.which)
    out = interop.export(model, args.out, args.format)
    print(json.dumps({"format": args.format, "out": str(out)}))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:  # noqa: ARG001
    from .models.dvae import TOKENIZER_PRESETS
    from .models.presets import PRESETS
    from .tasks.pretrain import PRESETS as PRETRAIN

    print("backbones:          " + ", ".join(PRESETS))
    print("tokenizers:         " + ", ".join(TOKENIZER_PRESETS))
    print("pretraining recipes: " + ", ".join(PRETRAIN))
    for name, extra in COMMAND_PRESETS.items():
        print(f"{name + ':':20s}" + ", ".join(extra()))
    return 0


# Other commands register their preset lists here (name -> callable returning names).
COMMAND_PRESETS: dict[str, Callable[[], list[str]]] = {}


# --------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .tasks.pretrain import PRESETS as PRETRAIN
    from .tokenizers.dvae_train import RUN_PRESETS as TOKENIZER_PRESETS

    parser = argparse.ArgumentParser(
        prog="beit", description="BERT-style pretraining of vision transformers (BEiT, MAE, iBOT).")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("pretrain", help="self-supervised pretraining on a folder of images",
                       description="Pretrain a backbone with BEiT (visual tokens), MAE (pixels) or iBOT "
                                   "(online tokenizer). Example: beit pretrain --data imgs/ --tokenizer tok/ "
                                   "--out run/ --preset beit_tiny_patch4_32 --steps 2000")
    p.add_argument("--data", required=True, help="folder of images (any tree; labels ignored)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics.jsonl, loss.png)")
    p.add_argument("--tokenizer", help="tokenizer run or directory (BEiT)")
    p.add_argument("--method", choices=["beit", "mae", "ibot"], help="pretraining method (default: beit)")
    p.add_argument("--limit", type=int, help="use only the first N images (data.limit)")
    _add_train_flags(p, sorted(PRETRAIN))
    p.set_defaults(func=cmd_pretrain)

    tok = sub.add_parser("tokenizer", help="train, evaluate or convert a visual tokenizer (dVAE)")
    tsub = tok.add_subparsers(dest="tokenizer_command", metavar="ACTION", required=True)
    t = tsub.add_parser("train", help="train a discrete VAE on a folder of images")
    t.add_argument("--data", required=True, help="folder of images")
    t.add_argument("--out", required=True, help="run directory: tokenizer.safetensors, metrics, reconstructions.png")
    t.add_argument("--limit", type=int, help="use only the first N images (data.limit)")
    t.add_argument("--val-data", help="held-out folder evaluated each epoch and at the end (data.val_path)")
    _add_train_flags(t, sorted(TOKENIZER_PRESETS))
    t.set_defaults(func=cmd_tokenizer_train)
    t = tsub.add_parser("eval", help="PSNR and codebook usage on a held-out folder (JSON)")
    t.add_argument("--tokenizer", required=True, help="tokenizer run or directory")
    t.add_argument("--data", required=True, help="folder of images")
    t.add_argument("--limit", type=int, help="use only the first N images")
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--grid", help="also write a PNG of originals above reconstructions here")
    t.set_defaults(func=cmd_tokenizer_eval)
    t = tsub.add_parser("convert-dalle", help="convert OpenAI's encoder.pkl/decoder.pkl (needs `pip install dall-e`)")
    t.add_argument("encoder")
    t.add_argument("decoder")
    t.add_argument("--out", required=True)
    t.set_defaults(func=cmd_tokenizer_convert)

    p = sub.add_parser("export", help="write a checkpoint in HF transformers or timm format")
    p.add_argument("checkpoint", help="anything `beit.load` reads (run dir, HF dir, timm/official file)")
    p.add_argument("--format", required=True, choices=["hf", "timm"])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--which", choices=["student", "teacher"], help="iBOT runs: which weights (default teacher)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("presets", help="list the named presets")
    p.set_defaults(func=cmd_presets)

    for add in EXTRA_COMMANDS:
        add(sub)
    return parser


# Downstream commands (finetune, probe, segment, show, demo) add their parsers through this list so that
# each lives next to the library code it calls. Each entry: fn(subparsers) -> None.
EXTRA_COMMANDS: list[Callable] = []


def _load_extra_commands() -> None:
    import importlib

    for mod in ("beit.tasks.cli_downstream", "beit.demo"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        add = getattr(m, "add_commands", None)
        if add is not None and add not in EXTRA_COMMANDS:
            EXTRA_COMMANDS.append(add)


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data.folder import DataError
    from .engine import TrainingError

    errs: list[type[BaseException]] = [ConfigError, DataError, TrainingError, CheckpointError, FileNotFoundError]
    try:
        from .tokenizers.dalle import ConversionError

        errs.append(ConversionError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errs)


def main(argv: list[str] | None = None) -> int:
    _load_extra_commands()
    parser = build_parser()
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    level = logging.WARNING if (args.quiet or rank != 0) else logging.INFO
    logging.basicConfig(level=level, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except _user_errors() as e:
        print(f"beit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
