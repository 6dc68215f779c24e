"""BEiT's visual-token targets off the critical path: the frozen tokenizer's precision and a side-stream encode.

Precision (``beit.tokenizer_precision``). The tokenizer's encoder body may run under a bf16 / fp16 autocast;
its code head (logits conv or codebook distances) and the argmax always run in fp32 (the tokenizers'
``encode``), so an id changes only where the encoder's features change. ``fp32`` is today's exact encode.
``auto`` resolves on the first batch (:func:`resolve_precision`):

- CPU: fp32. bf16 kept 97.5% of a trained ``vq_32_small``'s ids on 2,000 CIFAR-10 test images (73.5% with
  the code head in bf16 too) for 1.96x the encode speed (bench/tokenizer_encode.py, docs/methods.md): below
  the 99% the issue accepts, with an unmeasured effect on fine-tuning, and the documented CPU results were
  made with the fp32 targets. ``bf16`` is there for whoever wants the speed.
- CUDA: fp16 if at least ``beit.tokenizer_agreement`` of the first batch's ids equal the fp32 encode, else
  fp32 (logged either way). fp16 is what the official BEiT code computes: its ``dall_e`` encoder runs every
  conv but the output conv in fp16 on CUDA. fp16 rather than the step's bf16: 3 more mantissa bits, and a
  frozen encoder in eval mode has bounded activations (an overflow would show as disagreement in the probe).
  Note that the CUDA "fp32" encode of a dVAE is not exact fp32 either: torch runs fp32 convolutions in TF32 by
  default (``torch.backends.cudnn.conv.fp32_precision == "tf32"``), 10 mantissa bits in the products, as fp16.

Overlap (``beit.tokenizer_overlap``, CUDA only): :class:`SideStream` encodes a batch's targets on a second
CUDA stream while the student's forward runs on the current one; the loss waits for the ids. The encode and
the student's forward depend on nothing of each other's, so this changes no number, only the order in
which the GPU may run the kernels (tested in tests/gpu/test_cuda.py against the serial run).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ConfigError

__all__ = ["PRECISIONS", "PrecisionChoice", "SideStream", "agreement", "choose_by_agreement", "encode_ids",
           "resolve_precision"]

log = logging.getLogger("beit")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

Encode = Callable[[torch.Tensor], torch.Tensor]  # images in [0, 1] -> ids, in the autocast set around it


@dataclass(frozen=True)
class PrecisionChoice:
    """The tokenizer precision a run uses: ``dtype`` (None: fp32), its name, why, and the measured agreement
    with fp32 on the first batch (``auto`` on CUDA only; None where nothing was measured)."""

    dtype: torch.dtype | None
    name: str
    reason: str
    agreement: float | None = None


def encode_ids(encode: Encode, images: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``encode(images)`` with the encoder body under ``dtype`` autocast (None: fp32, any outer autocast off)."""
    # (the dtype of a disabled autocast is a placeholder: float32 is not one CPU autocast accepts)
    with torch.autocast(images.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        return encode(images.float())


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of equal ids of two encodes of the same images."""
    return float((a == b).float().mean()) if a.numel() else 1.0


def resolve_precision(setting: str, threshold: float, encode: Encode, images: torch.Tensor
                      ) -> tuple[PrecisionChoice, torch.Tensor]:
    """``beit.tokenizer_precision`` on the first batch: (the choice, that batch's ids in the chosen precision)."""
    device = images.device.type
    if setting not in ("auto", *PRECISIONS):
        raise ConfigError(f"beit.tokenizer_precision must be auto, fp32, bf16 or fp16, got {setting!r}")
    if setting == "fp16" and device != "cuda":
        raise ConfigError("beit.tokenizer_precision=fp16 needs CUDA; use fp32 or bf16 on CPU")
    if setting != "auto":
        choice = PrecisionChoice(PRECISIONS[setting], setting, "beit.tokenizer_precision")
        return choice, encode_ids(encode, images, choice.dtype)
    if device != "cuda":
        return PrecisionChoice(None, "fp32", f"auto on {device}: exact ids"), encode_ids(encode, images, None)
    return choose_by_agreement(encode, images, torch.float16, threshold)


def choose_by_agreement(encode: Encode, images: torch.Tensor, dtype: torch.dtype, threshold: float
                        ) -> tuple[PrecisionChoice, torch.Tensor]:
    """``auto``'s probe: ``dtype`` if at least ``threshold`` of the batch's ids (over all processes) equal the fp32
    encode's, else fp32; with the batch's ids in the chosen precision."""
    exact = encode_ids(encode, images, None)
    fast = encode_ids(encode, images, dtype)
    agree = _mean_over_ranks(agreement(fast, exact), images.device)
    name = next(k for k, v in PRECISIONS.items() if v == dtype)
    if agree >= threshold:
        return PrecisionChoice(dtype, name, f"auto: {agree:.2%} of the first batch's ids equal fp32's "
                               f"(>= beit.tokenizer_agreement={threshold})", agree), fast
    return PrecisionChoice(None, "fp32", f"auto: {name} gave only {agree:.2%} of fp32's ids on the first batch "
                           f"(< beit.tokenizer_agreement={threshold})", agree), exact


def _mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean over the processes of a distributed run (every rank must pick the same precision)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


class SideStream:
    """Encode on a second CUDA stream of the batch's device: :meth:`start` returns a function that, called on
    the current stream when the ids are needed, makes that stream wait for them. Off CUDA (or not ``enabled``)
    the encode runs inline and nothing else changes."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def active(self, device: torch.device) -> bool:
        return self.enabled and device.type == "cuda"

    @torch.compiler.disable  # stream switching stays eager when the method is compiled
    def start(self, encode: Encode, images: torch.Tensor) -> Callable[[], torch.Tensor]:
        if not self.active(images.device):
            ids = encode(images)
            return lambda: ids
        main = torch.cuda.current_stream(images.device)
        side = self._streams.get(images.device)
        if side is None:
            side = self._streams[images.device] = torch.cuda.Stream(images.device)
        side.wait_stream(main)  # the batch's copy / on-device finishing was enqueued on the main stream
        with torch.cuda.stream(side):
            ids = encode(images)
        images.record_stream(side)  # main's allocator must not reuse the images while the side stream reads them

        @torch.compiler.disable
        def wait() -> torch.Tensor:
            main.wait_stream(side)
            ids.record_stream(main)  # allocated on the side stream, read on the main one
            return ids

        return wait
