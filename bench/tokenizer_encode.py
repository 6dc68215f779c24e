"""The frozen tokenizer's encode in reduced precision: id agreement with fp32 and images/s, in one process.

BEiT encodes every batch with its frozen tokenizer before the student's step (``beit.tokenizer_precision``,
:mod:`beit.methods.token_targets`). For each tokenizer this prints:

- **id agreement**: the fraction of token ids of a reduced-precision encode equal to the fp32 encode, on real
  images (``--data``, a folder; resized to the tokenizer's input size), for ``encode`` as BEiT runs it
  (encoder body under autocast, code head and argmax in fp32) and, for comparison, for the whole encode under
  autocast (code head and argmax in the reduced precision too: what the fp32 head buys);
- **images/s** of fp32 and of each reduced precision, interleaved batch by batch (``--rounds`` rounds of one
  batch per precision; medians), so that machine noise hits all alike; and the speed-up over fp32.

``--tokenizer`` names trained tokenizer files; ``--preset`` builds random-weight ones (speed only: the
agreement of an untrained tokenizer says nothing about a trained one). ``--step MODEL`` also times the BEiT
step (forward + backward, first tokenizer) of that model preset: the student alone, the fp32 encode serial,
on a side stream (``beit.tokenizer_overlap``, CUDA only) and the reduced encode on the side stream; it prints
the tokenizer's share of the student's step and checks that the overlapped run gives the serial loss.

    python bench/tokenizer_encode.py --data cifar/train --tokenizer runs/tok_vq32s --preset dalle_112
    python bench/tokenizer_encode.py --device cuda --preset dalle_112 --batch 64 --dtypes bf16,fp16 \\
        --step beit_base_patch16_224
    python bench/tokenizer_encode.py --dry-run            # seconds: tiny sizes, for the CI test
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit import machine  # noqa: E402
from beit.config import replace  # noqa: E402
from beit.data.folder import list_images  # noqa: E402
from beit.loading import load_tokenizer  # noqa: E402
from beit.methods.beit import BEiTConfig, BEiTMethod  # noqa: E402
from beit.methods.token_targets import PRECISIONS, agreement, encode_ids  # noqa: E402
from beit.models.presets import get_preset  # noqa: E402
from beit.models.tokenizer import Tokenizer, get_tokenizer_preset  # noqa: E402


def load_images(root: str, n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` images drawn (seeded) from the folder, RGB, resized to ``size`` (bicubic): (n, 3, size, size) in [0, 1]."""
    paths = list_images(root)
    paths = random.Random(seed).sample(paths, min(n, len(paths)))
    out = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            out.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3))
    return torch.stack(out).permute(0, 3, 1, 2).float().div(255)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def agreement_row(tok, images: torch.Tensor, dtype: torch.dtype, batch: int) -> dict:
    """Agreement with fp32 of ``encode`` in ``dtype`` (fp32 head) and of the whole encode under autocast."""
    exact = torch.cat([encode_ids(tok.encode, b, None) for b in images.split(batch)])
    fast = torch.cat([encode_ids(tok.encode, b, dtype) for b in images.split(batch)])
    row = {"ids": exact.numel(), "agreement": agreement(fast, exact)}
    if isinstance(tok, Tokenizer):  # the old way: logits and argmax under the autocast too
        with torch.no_grad(), torch.autocast(images.device.type, dtype=dtype):
            whole = torch.cat([tok.encode_logits(b.contiguous(memory_format=torch.channels_last)).argmax(1)
                               for b in images.split(batch)])
        row["agreement_reduced_head"] = agreement(whole, exact)
    return row


def speed_rows(tok, x: torch.Tensor, dtypes: list[str], rounds: int) -> dict[str, float]:
    """images/s per precision: one batch each in turn, ``rounds`` times (after one untimed warm-up each)."""
    device = x.device
    times: dict[str, list[float]] = {d: [] for d in ["fp32", *dtypes]}
    for r in range(rounds + 1):
        for name in times:
            sync(device)
            t = time.perf_counter()
            encode_ids(tok.encode, x, PRECISIONS[name])
            sync(device)
            if r:  # round 0 warms up (oneDNN / cuDNN kernel choice)
                times[name].append(time.perf_counter() - t)
    return {name: len(x) / statistics.median(ts) for name, ts in times.items()}


class FixedIds(torch.nn.Module):
    """A tokenizer that costs nothing: the student's step alone, for the tokenizer's share of the step."""

    def __init__(self, ids: torch.Tensor, vocab_size: int) -> None:
        super().__init__()
        self.ids, self.vocab_size = ids, vocab_size

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.ids


def step_variants(tok, images: torch.Tensor, model: str, batch: int, rounds: int, device: torch.device) -> dict:
    """BEiT steps (forward + backward under the step's autocast) interleaved: the student alone (fixed ids), the
    fp32 encode serial (before this bench existed), on the side stream, and the reduced encode (fp16 on CUDA,
    bf16 on CPU) on the side stream. Returns images/s, the tokenizer's share of the student's step, and whether
    the overlapped fp32 run gave the serial run's loss."""
    mcfg = replace(get_preset(model), drop_path_rate=0.0)  # no random draws: the losses are comparable
    n = mcfg.grid_size[0] * mcfg.grid_size[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, mcfg.img_size, mcfg.img_size, generator=g).to(device)
    mask = (torch.rand(batch, n, generator=g) < 0.4).to(device)
    tok_x = images[:batch].to(device)
    reduced = "fp16" if device.type == "cuda" else "bf16"
    ids = encode_ids(tok.encode, tok_x, None)
    variants = {"student_alone": (FixedIds(ids, tok.vocab_size), "fp32", False), "fp32_serial": (tok, "fp32", False),
                "fp32_overlap": (tok, "fp32", True), f"{reduced}_overlap": (tok, reduced, True)}
    methods = {}
    for name, (t, prec, overlap) in variants.items():
        torch.manual_seed(0)
        cfg = BEiTConfig(tokenizer_precision=prec, tokenizer_overlap=overlap)
        methods[name] = BEiTMethod.build(mcfg, t, cfg).to(device)
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    times: dict[str, list[float]] = {k: [] for k in methods}
    losses: dict[str, float] = {}
    for r in range(rounds + 2):  # two warm-up rounds: the first batch resolves the precision serially
        for name, m in methods.items():
            sync(device)
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype):
                loss, _ = m({"images": x, "tok_images": tok_x, "mask": mask})
            loss.backward()
            sync(device)
            m.zero_grad(set_to_none=True)
            losses[name] = float(loss.detach())
            if r >= 2:
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    alone = med["student_alone"]
    return {"model": model, "batch": batch, "side_stream": methods["fp32_overlap"]._side.active(device),
            "images_per_s": {k: batch / v for k, v in med.items()},
            "tokenizer_share": {k: v / alone - 1 for k, v in med.items() if k != "student_alone"},
            "overlap_same_loss": losses["fp32_overlap"] == losses["fp32_serial"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="image folder for the agreement (and the speed's batch); random pixels without")
    ap.add_argument("--tokenizer", action="append", default=[], help="a trained tokenizer (repeatable)")
    ap.add_argument("--preset", action="append", default=[], help="a random-weight tokenizer preset (repeatable)")
    ap.add_argument("--images", type=int, default=2000, help="images for the agreement")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", default="bf16", help="reduced precisions to compare with fp32 (bf16, fp16)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--step", help="also time the BEiT step of this model preset (see above)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes (seconds), for the CI test")
    a = ap.parse_args(argv)
    if a.dry_run:
        a.preset, a.images, a.batch, a.rounds = a.preset or ["vq_32_small"], min(a.images, 16), min(a.batch, 8), 1
        a.step = a.step or "beit_tiny_patch4_32"
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    print(f"machine: {machine.describe(device)}", flush=True)
    toks = [(p, load_tokenizer(p)) for p in a.tokenizer]
    for name in a.preset:
        torch.manual_seed(0)
        toks.append((f"{name} (random weights)", Tokenizer(get_tokenizer_preset(name))))
    if not toks:
        ap.error("name a --tokenizer or a --preset")
    rows = []
    for label, tok in toks:
        tok = tok.to(device).eval()
        size = tok.cfg.img_size
        if a.data:
            images = load_images(a.data, max(a.images, a.batch), size)
        else:
            images = torch.rand(max(a.images, a.batch), 3, size, size, generator=torch.Generator().manual_seed(0))
        images = images.to(device)
        row = {"tokenizer": label, "img_size": size, "batch": a.batch, "data": a.data or "random pixels"}
        row["images_per_s"] = speed_rows(tok, images[:a.batch], dtypes, a.rounds)
        row["speedup"] = {d: row["images_per_s"][d] / row["images_per_s"]["fp32"] for d in dtypes}
        row["agreement"] = {d: agreement_row(tok, images[:a.images], PRECISIONS[d], a.batch) for d in dtypes}
        rows.append(row)
        print(f"{label} @{size}px, batch {a.batch}, {a.images} images of {row['data']}:", flush=True)
        print(f"  fp32: {row['images_per_s']['fp32']:.1f} img/s", flush=True)
        for d in dtypes:
            ag = row["agreement"][d]
            extra = (f", whole encode in {d}: {ag['agreement_reduced_head']:.2%}"
                     if "agreement_reduced_head" in ag else "")
            print(f"  {d}: {row['images_per_s'][d]:.1f} img/s ({row['speedup'][d]:.2f}x fp32); id agreement with "
                  f"fp32 (fp32 head): {ag['agreement']:.2%} of {ag['ids']} ids{extra}", flush=True)
    doc = {"machine": machine.info(device), "rows": rows}
    if a.step:
        label, tok = toks[0]
        model = a.step
        grid_tok = tok.cfg.grid_size
        if get_preset(model).grid_size != grid_tok:
            print(f"step: {model} does not fit the {grid_tok} grid of {label}: skipped", flush=True)
        else:
            s = step_variants(tok, images, model, a.batch, a.rounds, device)
            doc["step"] = s
            print(f"step {model} batch {s['batch']} (side stream {'on' if s['side_stream'] else 'off: not CUDA'}), "
                  f"overlapped fp32 loss equal to serial: {s['overlap_same_loss']}", flush=True)
            for k, v in s["images_per_s"].items():
                share = s["tokenizer_share"].get(k)
                print(f"  {k}: {v:.1f} img/s" + (f", tokenizer {share:.0%} of the student's step" if share is not None
                                                 else ""), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
