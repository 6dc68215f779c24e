"""Pretrain a tiny MAE / iBOT model through the real registry and engine, in its own process, optionally
killing itself with SIGKILL right after optimiser step N (to test exact resume). Usage:

    python -m tests.helpers.pretrain_driver RUN --data DIR --preset mae_tiny_patch4_32 --steps 8 [--resume]
        [--kill-at 5] [key=value ...]

It mirrors :func:`beit.tasks.pretrain.run` (config -> registry -> dataset -> engine.train) without the
pictures; the kill lives here, in a wrapper around the method's ``after_step``, never in library code.
"""

from __future__ import annotations

import argparse
import sys

from beit.config import dump_yaml
from beit.engine import seed_everything, setup_distributed, train
from beit.loading import load_tokenizer
from beit.methods.registry import build_method
from beit.tasks.pretrain import build_config, build_dataset
from tests.helpers.kill_driver import kill_after

# tiny sizes shared by the tests: a few seconds per run on a shared CPU
TINY = {
    "mae": ["model.embed_dim=48", "model.num_heads=3", "model.depth=2", "mae.decoder_dim=32", "mae.decoder_depth=1",
            "mae.decoder_heads=2"],
    "ibot": ["model.embed_dim=48", "model.num_heads=3", "model.depth=2", "ibot.out_dim=64", "ibot.hidden_dim=64",
             "ibot.bottleneck_dim=32"],
}


def pretrain(run: str, data: str, preset: str, overrides: list[str], resume: bool = False, kill_at: int = 0):
    cfg = build_config(preset, None, [f"data.path={data}", *overrides])
    env = setup_distributed(cfg.train.device)
    seed_everything(cfg.train.seed)
    method, transform, cfg = build_method(cfg, load_tokenizer=load_tokenizer)
    if kill_at:
        kill_after(method, kill_at)
    dataset = build_dataset(cfg.data, transform)
    res = train(method, dataset, train_cfg=cfg.train, optim_cfg=cfg.optim, run_dir=run, config_yaml=dump_yaml(cfg),
                resume=resume, env=env)
    return res, method


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--data", required=True)
    p.add_argument("--preset", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("overrides", nargs="*")
    a = p.parse_intermixed_args(argv)
    method = "mae" if a.preset.startswith("mae") else "ibot"
    ov = [*TINY[method], f"train.steps={a.steps}", "train.batch_size=4", "train.num_workers=0", "train.log_every=1",
          "train.ckpt_every=3", "train.precision=fp32", "train.device=cpu", *a.overrides]
    res, _ = pretrain(a.run, a.data, a.preset, ov, resume=a.resume, kill_at=a.kill_at)
    print(f"status={res.status} step={res.step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
