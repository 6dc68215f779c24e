"""``beit presets``: every named preset, by kind."""

from __future__ import annotations

import argparse


def preset_lists() -> dict[str, list[str]]:
    """Kind -> preset names, for every command that takes ``--preset``."""
    from ..methods import registry
    from ..models.presets import PRESETS
    from ..models.tokenizer import TOKENIZER_PRESETS
    from ..tasks import finetune, segment

    return {"backbones": list(PRESETS), "tokenizers": list(TOKENIZER_PRESETS),
            "pretraining recipes": list(registry.presets()), "fine-tuning": list(finetune.PRESETS),
            "segmentation": list(segment.PRESETS)}


def cmd_presets(args: argparse.Namespace) -> int:  # noqa: ARG001
    for kind, names in preset_lists().items():
        print(f"{kind + ':':21s}" + ", ".join(names))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("presets", help="list the named presets")
    p.set_defaults(func=cmd_presets)
