"""Low-level weight I/O that never executes code: safetensors in and out, guarded ``.pth`` reading.

Run checkpoints (optimizer state, resume) are built on top of these in :mod:`beit.checkpoint`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class CheckpointError(RuntimeError):
    """A weight file that cannot be read or written safely; the message names the file."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, no permission); partial files were removed."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def write_error(what: str | Path, e: OSError) -> CheckpointWriteError:
    """One-line error for a failed write of ``what`` (the disk-full case says so)."""
    reason = "no space left on the device" if e.errno in _NO_SPACE else (e.strerror or str(e))
    return CheckpointWriteError(f"could not write {what}: {reason}; partial files were removed")


def _as_os_error(e: BaseException) -> OSError | None:
    """The OS error behind ``e``: itself, or the one safetensors reports as text ("... (os error 28)")."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"os error (\d+)", str(e))
    return OSError(int(m.group(1)), os.strerror(int(m.group(1)))) if m else None


@contextlib.contextmanager
def removed_on_failure(what: str | Path, *partial: Path):
    """Run the body; if it fails, delete ``partial`` (files or folders), and turn a failed write (disk full,
    no permission) into a one-line :class:`CheckpointWriteError` about ``what``."""
    try:
        yield
    except BaseException as e:
        for p in partial:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        err = _as_os_error(e)
        if err is not None and not isinstance(e, CheckpointWriteError):
            raise write_error(what, err) from None
        raise


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: str | Path) -> Any:
    """A JSON file, or :class:`CheckpointError` naming it (missing, unreadable, truncated)."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None


def _plain(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; tensors sharing storage are cloned (safetensors refuses aliases)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"state dict entry {k!r} is a {type(v).__name__}, not a tensor")
        t = v.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        if key in seen:
            t = t.clone()
        seen.add(key)
        out[k] = t
    return out


def save_weights(state_dict: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``state_dict`` as safetensors, atomically (temporary file in the same folder, then rename).

    ``metadata`` values may be any JSON-serialisable object; each is stored as its JSON string.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): json.dumps(v) for k, v in (metadata or {}).items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    with removed_on_failure(path, Path(tmp)):
        save_file(_plain(state_dict), tmp, metadata=meta)
        os.replace(tmp, path)
    return path


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file -> ``(state_dict, metadata)``; metadata values are JSON-decoded when they
    parse (files written by other tools keep their plain strings)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            meta[k] = v
    return sd, meta


def _looks_like_torch_file(path: Path) -> bool:
    """``torch.save`` writes a zip archive (or, before PyTorch 1.6, a pickle starting with PROTO)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as fh:
        head = fh.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _refused_global(message: str) -> str:
    """The line of PyTorch's refusal that names what the pickle wanted to import, without its advice."""
    for line in message.splitlines():
        if "GLOBAL" in line or "Unsupported global" in line:
            return line.strip().rstrip(".")
    return "an object that is not a tensor or plain container"


def read_torch_file(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``) on the CPU.

    ``argparse.Namespace`` is allowed too: official BEiT training checkpoints store their ``args`` in one,
    and it is a plain attribute bag. Anything else that needs code to unpickle is refused. Errors never
    repeat PyTorch's advice to retry with ``weights_only=False``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{path}: not a checkpoint (neither safetensors nor a PyTorch file)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: this loader refuses to unpickle arbitrary objects ({_refused_global(str(e))}): "
            "only tensors and plain containers are read. Convert a file you trust to safetensors "
            "elsewhere, or export its state dict only."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch file ({first})") from None


__all__ = ["CheckpointError", "CheckpointWriteError", "file_digest", "load_weights", "read_json", "read_torch_file",
           "removed_on_failure", "save_weights", "write_error"]
