"""Which patches to mask: blockwise masking (BEiT, arXiv 2106.08254, Sec. 2.5, Algorithm 1) and uniform masking.

Masks are ``bool`` tensors of shape ``(h, w)``, **True = masked**, row-major like the patch sequence.
Every function here is pure: all randomness comes from the ``torch.Generator`` passed in (or torch's global
RNG when none is given), so a seeded generator gives the same mask on every machine and on resume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ConfigError

__all__ = ["MaskGenerator", "MaskingConfig", "block_mask", "random_mask"]


class _Uniforms:
    """Uniform floats in [0, 1) drawn from ``generator`` in chunks.

    The block-masking algorithm is a small scalar loop (a handful of draws per block); one torch call per
    draw would cost more than the algorithm itself, so draws are made 64 at a time and handed out as Python
    floats. The sequence is a pure function of the generator's state.
    """

    __slots__ = ("_buf", "_generator", "_i")

    def __init__(self, generator: torch.Generator | None) -> None:
        self._generator = generator
        self._buf: list[float] = []
        self._i = 0

    def __call__(self) -> float:
        if self._i == len(self._buf):
            self._buf = torch.rand(64, generator=self._generator, dtype=torch.float64).tolist()
            self._i = 0
        u = self._buf[self._i]
        self._i += 1
        return u

    def randint(self, low: int, high: int) -> int:
        """Integer uniform in [low, high], both ends included."""
        return low + min(int(self() * (high - low + 1)), high - low)


def _grid(grid: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(grid, int):
        return grid, grid
    h, w = grid
    return int(h), int(w)


def _check_budget(num_masked: int, n: int) -> None:
    if not 0 <= num_masked <= n:
        raise ValueError(f"num_masked={num_masked} must lie in [0, {n}] for a grid of {n} patches")


def _block_mask_rects(
    grid: int | tuple[int, int],
    num_masked: int,
    *,
    min_block: int = 16,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[list[bool]], list[tuple[int, int, int, int]]]:
    """The algorithm behind :func:`block_mask`; also returns the kept blocks as ``(top, left, h, w)``."""
    H, W = _grid(grid)
    _check_budget(num_masked, H * W)
    if min_aspect <= 0:
        raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
    log_lo = math.log(min_aspect)
    log_hi = math.log(max_aspect if max_aspect is not None else 1.0 / min_aspect)
    rand = _Uniforms(generator)
    mask = [[False] * W for _ in range(H)]  # tiny grids: Python lists beat tensor indexing here
    rects: list[tuple[int, int, int, int]] = []
    count = 0
    while count < num_masked:
        budget = num_masked - count
        if max_block is not None:
            budget = min(budget, max_block)
        added = 0
        for _attempt in range(10):
            # uniform in [min_block, budget]; as in the official code the ends may come in either order
            # (budget < min_block near the end), which just draws from [budget, min_block]
            area = min_block + (budget - min_block) * rand()
            aspect = math.exp(log_lo + (log_hi - log_lo) * rand())
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h < H and w < W:
                top = rand.randint(0, H - h)
                left = rand.randint(0, W - w)
                new = sum(1 for i in range(top, top + h) for j in range(left, left + w) if not mask[i][j])
                # a block must add something and stay within the remaining budget (overlap allowed)
                if 0 < new <= budget:
                    for i in range(top, top + h):
                        row = mask[i]
                        for j in range(left, left + w):
                            row[j] = True
                    rects.append((top, left, h, w))
                    added = new
            if added > 0:
                break
        if added == 0:  # no block fits any more: stop below the budget rather than loop forever
            break
        count += added
    return mask, rects


def block_mask(
    grid: int | tuple[int, int],
    num_masked: int,
    *,
    min_block: int = 16,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Blockwise mask (BEiT Algorithm 1), ``(h, w)`` bool, True = masked, at most ``num_masked`` True.

    Repeat until ``num_masked`` patches are masked: draw a block area uniformly in
    ``[min_block, remaining]`` (``remaining`` capped by ``max_block``), an aspect ratio log-uniformly in
    ``[min_aspect, max_aspect]`` (default ``1 / min_aspect``), ``h = round(sqrt(area * r))``,
    ``w = round(sqrt(area / r))``, a uniform position; keep the block if it masks between 1 and
    ``remaining`` new patches; up to 10 attempts per block. If no attempt adds a patch the mask is returned
    as is, so the count can end below ``num_masked`` (rarely for 14x14 / 75; more often on tiny grids).

    >>> g = torch.Generator().manual_seed(0)
    >>> block_mask((14, 14), 75, generator=g).sum() <= 75
    tensor(True)
    """
    mask, _ = _block_mask_rects(
        grid, num_masked, min_block=min_block, max_block=max_block, min_aspect=min_aspect,
        max_aspect=max_aspect, generator=generator,
    )
    return torch.tensor(mask, dtype=torch.bool).reshape(_grid(grid))


def random_mask(
    grid: int | tuple[int, int], num_masked: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Exactly ``num_masked`` patches chosen uniformly at random: ``(h, w)`` bool, True = masked."""
    H, W = _grid(grid)
    _check_budget(num_masked, H * W)
    mask = torch.zeros(H * W, dtype=torch.bool)
    mask[torch.randperm(H * W, generator=generator)[:num_masked]] = True
    return mask.view(H, W)


@dataclass
class MaskingConfig:
    """How many patches to mask and how (BEiT Sec. 2.5 and Appendix: 40% of 14x14, blocks of >= 16)."""

    kind: str = "block"  # block | random
    ratio: float = 0.4  # masked fraction: num_masked = round(ratio * num_patches)
    num_masked: int | None = None  # overrides ratio when set (the official 224px default is 75 of 196)
    min_block: int = 16  # smallest block area, in patches
    max_block: int | None = None  # largest block area; None: the remaining budget (official default)
    min_aspect: float = 0.3  # aspect ratios drawn log-uniformly in [min_aspect, 1 / min_aspect]

    def __post_init__(self) -> None:
        if self.kind not in ("block", "random"):
            raise ConfigError(f"masking kind must be 'block' or 'random', got {self.kind!r}")
        if not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"mask ratio must lie in [0, 1], got {self.ratio}")
        if self.num_masked is not None and self.num_masked < 0:
            raise ConfigError(f"num_masked must be >= 0, got {self.num_masked}")
        if self.min_block < 1:
            raise ConfigError(f"min_block must be >= 1, got {self.min_block}")
        if self.max_block is not None and self.max_block < 1:
            raise ConfigError(f"max_block must be >= 1, got {self.max_block}")
        if not 0.0 < self.min_aspect <= 1.0:
            raise ConfigError(f"min_aspect must lie in (0, 1], got {self.min_aspect}")

    def budget(self, num_patches: int) -> int:
        n = self.num_masked if self.num_masked is not None else int(round(self.ratio * num_patches))
        if n > num_patches:
            raise ConfigError(f"num_masked={n} exceeds the {num_patches} patches of the grid")
        return n


class MaskGenerator:
    """A :class:`MaskingConfig` bound to a patch grid: ``MaskGenerator((14, 14), cfg)(generator) -> (14, 14)``."""

    def __init__(self, grid: int | tuple[int, int], cfg: MaskingConfig | None = None) -> None:
        self.grid = _grid(grid)
        self.cfg = cfg if cfg is not None else MaskingConfig()
        self.num_masked = self.cfg.budget(self.grid[0] * self.grid[1])

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.cfg.kind == "random":
            return random_mask(self.grid, self.num_masked, generator=generator)
        return block_mask(
            self.grid, self.num_masked, min_block=self.cfg.min_block, max_block=self.cfg.max_block,
            min_aspect=self.cfg.min_aspect, generator=generator,
        )

    def __repr__(self) -> str:
        return f"MaskGenerator(grid={self.grid}, num_masked={self.num_masked}, cfg={self.cfg})"
