"""Position tables at another patch grid: the geometry of loading a model at a new resolution.

A checkpoint's absolute position embedding and relative position tables are made for the patch grid it
was trained at; a model used at another image size (or another aspect) needs them resampled. These are
pure tensor functions on state dicts in our names; the loading layer (:mod:`beit.loading`) applies them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..checkpoint_io import CheckpointError
from .vit import num_relative_distance

REL_TABLE = "relative_position_bias_table"


def grid_of_rel_table(rows: int) -> int:
    side = math.isqrt(rows - 3)  # (2h - 1)^2 = rows - 3 for a square grid
    if side * side != rows - 3 or side % 2 == 0:
        raise CheckpointError(f"relative position table with {rows} rows is not (2h-1)^2 + 3 for a square grid")
    return (side + 1) // 2


def _source_grid(n: int, new_grid: tuple[int, int], old_grid: tuple[int, int] | None,
                 of_rows: bool) -> tuple[int, int]:
    """The grid a table of ``n`` rows (relative) or patches (absolute) was made for: ``old_grid`` if given,
    the new grid if the size matches it (nothing to resize), else a square one."""
    if old_grid is not None:
        return tuple(old_grid)  # type: ignore[return-value]
    fits_new = (num_relative_distance(new_grid) if of_rows else new_grid[0] * new_grid[1]) == n
    if fits_new:
        return tuple(new_grid)  # type: ignore[return-value]
    if of_rows:
        side = grid_of_rel_table(n)
    else:
        side = math.isqrt(n)
        if side * side != n:
            raise CheckpointError(f"position embedding with {n} patches is not a square grid")
    return (side, side)


def resize_rel_table(table: torch.Tensor, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None,
                     mode: str = "bicubic") -> torch.Tensor:
    """``(num_rel, heads)`` table for another grid ``(h', w')``, square or not: the ``(2h-1, 2w-1)`` grid of
    offsets resampled (``mode``: bicubic, or bilinear as HF transformers' ``interpolate_pos_encoding``) to
    ``(2h'-1, 2w'-1)``, the 3 [CLS] rows kept as they are (the official code uses scipy's
    geometric-progression interpolation; a bicubic resample is its torch-only equivalent for the smooth
    tables BEiT learns). ``old_grid``: the table's grid when it is not square."""
    old_h, old_w = _source_grid(table.shape[0], tuple(new_grid), old_grid, of_rows=True)
    new_h, new_w = new_grid
    if (old_h, old_w) == (new_h, new_w):
        return table
    heads = table.shape[1]
    grid = table[:-3].T.reshape(1, heads, 2 * old_h - 1, 2 * old_w - 1).float()  # (1, H, 2h-1, 2w-1)
    grid = F.interpolate(grid, size=(2 * new_h - 1, 2 * new_w - 1), mode=mode, align_corners=False)
    rows = grid.reshape(heads, -1).T.to(table.dtype)  # ((2h'-1)(2w'-1), H)
    return torch.cat([rows, table[-3:]], dim=0)


def resize_pos_embed(pos: torch.Tensor, new_grid: tuple[int, int],
                     old_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """``(1, 1+N, D)`` absolute embedding for another grid ``(h', w')``: bicubic on the patch grid (as HF
    transformers' ``interpolate_pos_encoding``), [CLS] row kept. ``old_grid``: when it is not square."""
    old_h, old_w = _source_grid(pos.shape[1] - 1, tuple(new_grid), old_grid, of_rows=False)
    if (old_h, old_w) == tuple(new_grid):
        return pos
    D = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, old_h, old_w, D).permute(0, 3, 1, 2).float()  # (1, D, h, w)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos.dtype)  # (1, h'w', D)
    return torch.cat([pos[:, :1], grid], dim=1)


def resize_pos_and_rel_tables(state_dict: dict[str, torch.Tensor], new_grid: tuple[int, int],
                              old_grid: tuple[int, int] | None = None,
                              rel_mode: str = "bicubic") -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` (our names) with ``pos_embed`` and every relative position table resized to
    ``new_grid`` patches (rows, columns); sizes that already match are returned unchanged (resizing to the
    same size is the identity). Tables are taken as square unless ``old_grid`` says otherwise;
    ``rel_mode`` resamples the relative tables (bilinear: as HF transformers)."""
    out = dict(state_dict)
    for k, v in state_dict.items():
        if k == "pos_embed":
            out[k] = resize_pos_embed(v, new_grid, old_grid)
        elif k.endswith(REL_TABLE):
            out[k] = resize_rel_table(v, new_grid, old_grid, rel_mode)
    return out


__all__ = ["REL_TABLE", "grid_of_rel_table", "resize_pos_and_rel_tables", "resize_pos_embed", "resize_rel_table"]
