"""Low-level weight I/O that never executes code: safetensors in and out, guarded ``.pth`` reading.

Run checkpoints (optimizer state, resume) are built on top of these in :mod:`beit.checkpoint`.

Two guarantees live here so that every reader and writer gets them (issue 26):

* **Finite or nothing.** :func:`nonfinite_tensors` names the floating-point tensors that hold NaN or inf;
  :func:`check_finite` turns them into one :class:`NonFiniteError`. Weights are checked when written and
  when read, so a diverged model is never saved, loaded, resumed from or exported.
* **Every safetensors file written here carries its own SHA-256.** A checkpoint folder has a manifest, but
  a tokenizer or an export travels as a lone file. :func:`write_safetensors` stores, in the file's own
  header metadata (:data:`DIGEST_KEY`), the SHA-256 of the whole file as written with that value zeroed;
  the value has a fixed length, so it is patched in place after the write. :func:`digest_problem`
  recomputes it: garbage anywhere in the file (header or data) is detected, instead of loading as NaN or
  as quietly wrong finite numbers. Files written by other tools (HF, timm) have no such key.
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

DIGEST_KEY = "beit.sha256"  # header metadata: SHA-256 of the file with this value zeroed
_ZEROS = "0" * 64
_SHOWN = 4  # tensor names a message lists before "and N more"


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


class NonFiniteError(CheckpointError, ValueError):
    """Weights with NaN or inf values; ``names`` lists the tensors, ``where`` says whose they are."""

    def __init__(self, where: str, names: list[str]) -> None:
        self.where, self.names = where, names
        super().__init__(f"{where}: {holding_nonfinite(names)}: the weights are unusable "
                         "(the training that wrote them diverged); nothing was read or written")


def describe_tensors(names: list[str]) -> str:
    """``3 tensors (a, b, c)`` or ``104 tensors (a, b, c, d, and 100 more)``."""
    shown = ", ".join(names[:_SHOWN]) + (f", and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''} ({shown})"


def holding_nonfinite(names: list[str]) -> str:
    """``1 tensor (a) holds NaN or inf values`` / ``3 tensors (a, b, c) hold NaN or inf values``."""
    return f"{describe_tensors(names)} {'holds' if len(names) == 1 else 'hold'} NaN or inf values"


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding any NaN or inf, in the dict's order. One device sync for
    all of them (the per-tensor answers are gathered into one vector first)."""
    floats = [(k, v) for k, v in tensors.items() if torch.is_tensor(v) and (v.is_floating_point() or v.is_complex())]
    if not floats:
        return []
    with torch.no_grad():
        bad = torch.stack([~torch.isfinite(v.detach()).all() for _, v in floats]).cpu().tolist()
    return [k for (k, _), b in zip(floats, bad) if b]


def check_finite(tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """Raise :class:`NonFiniteError` naming the tensors of ``tensors`` that are not finite."""
    names = nonfinite_tensors(tensors)
    if names:
        raise NonFiniteError(str(where), names)


# --------------------------------------------------------------------------------------------- digests


def _header(fh) -> tuple[bytes, bytes]:
    """(the 8-byte length prefix, the JSON header) of an open safetensors file."""
    prefix = fh.read(8)
    if len(prefix) < 8:
        raise CheckpointError("shorter than a safetensors header")
    n = int.from_bytes(prefix, "little")
    if n > 100_000_000:
        raise CheckpointError("not a safetensors file (header length out of range)")
    header = fh.read(n)
    if len(header) < n:
        raise CheckpointError("truncated inside its header")
    return prefix, header


def _digest_rest(h, fh) -> str:
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        h.update(chunk)
    return h.hexdigest()


def sealable(metadata: dict[str, str] | None = None) -> dict[str, str]:
    """``metadata`` with room for the file's SHA-256 (a zeroed placeholder that :func:`seal` fills in)."""
    return {**(metadata or {}), DIGEST_KEY: _ZEROS}


def seal(path: str | Path) -> None:
    """Record in the header of ``path`` (written with :func:`sealable` metadata) the SHA-256 of the file as
    it is, placeholder included; the digest has the placeholder's length, so it is written in place."""
    with open(path, "r+b") as fh:
        prefix, header = _header(fh)
        h = hashlib.sha256(prefix)
        h.update(header)
        digest = _digest_rest(h, fh)
        at = header.find(f'"{DIGEST_KEY}":"{_ZEROS}"'.encode())
        if at < 0:  # pragma: no cover - safetensors writes compact JSON
            raise CheckpointError(f"{path}: could not record its SHA-256 in the header")
        fh.seek(8 + at + len(f'"{DIGEST_KEY}":"'))
        fh.write(digest.encode())
        fh.flush()
        os.fsync(fh.fileno())


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None,
                      *, finite: bool = True) -> Path:
    """Write ``tensors`` (contiguous CPU tensors) to ``path`` with ``metadata`` (strings) and the file's own
    SHA-256 (:func:`seal`); refuse non-finite weights first (``finite``) with :class:`NonFiniteError`.
    Not atomic by itself: callers write to a temporary name and rename."""
    path = Path(path)
    if finite:
        check_finite(tensors, f"refusing to write {path.name}")
    save_file(tensors, str(path), metadata=sealable(metadata))
    seal(path)
    return path


def recorded_digest(path: str | Path) -> str | None:
    """The SHA-256 a file written by :func:`write_safetensors` carries, or None (another tool's file)."""
    with open(path, "rb") as fh:
        _, header = _header(fh)
    try:
        meta = json.loads(header).get("__metadata__") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    value = meta.get(DIGEST_KEY)
    return value if isinstance(value, str) else None


def digest_problem(path: str | Path) -> str | None:
    """Why the safetensors file ``path`` does not hold what was written (its recorded SHA-256 differs), or
    None when it matches or records none. The header must parse for the digest to be found: a header
    that does not parse is reported by the reader that parses it."""
    try:
        want = recorded_digest(path)
    except CheckpointError:  # no header to hold a digest: safetensors says what is wrong when it parses
        return None
    if want is None:
        return None
    with open(path, "rb") as fh:
        prefix, header = _header(fh)
        at = header.find(f'"{DIGEST_KEY}":"{want}"'.encode())
        if at < 0:
            return "its header is damaged"
        header = header.replace(f'"{DIGEST_KEY}":"{want}"'.encode(), f'"{DIGEST_KEY}":"{_ZEROS}"'.encode(), 1)
        h = hashlib.sha256(prefix)
        h.update(header)
        got = _digest_rest(h, fh)
    if got != want:
        return "its content does not match the SHA-256 recorded in it (damaged on disk)"
    return None


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
    """Write ``state_dict`` as safetensors, atomically (temporary file in the same folder, then rename), with
    its own SHA-256 (:func:`write_safetensors`); non-finite weights are refused (:class:`NonFiniteError`).

    ``metadata`` values may be any JSON-serialisable object; each is stored as its JSON string.
    """
    path = Path(path)
    tensors = _plain(state_dict)
    check_finite(tensors, f"refusing to write {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {str(k): json.dumps(v) for k, v in (metadata or {}).items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    with removed_on_failure(path, Path(tmp)):
        write_safetensors(tensors, tmp, meta, finite=False)
        os.replace(tmp, path)
    return path


def read_safetensors(path: str | Path, *, verified: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file -> ``(tensors, raw string metadata)``, checked: a file that records its SHA-256
    must match it, and every floating-point tensor must be finite (one-line :class:`CheckpointError` /
    :class:`NonFiniteError` naming the file otherwise). Every safetensors read of the package comes here.
    ``verified``: the caller has just checked this very file (a checkpoint folder, by its manifest and
    :func:`beit.checkpoint.checkpoint_problem`), so neither check is repeated."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        problem = None if verified else digest_problem(path)
    except OSError as e:
        raise CheckpointError(f"{path}: not readable ({e.strerror or e})") from None
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if not verified:
        check_finite(sd, path)
    raw.pop(DIGEST_KEY, None)
    return sd, raw


def load_weights(path: str | Path, *, verified: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file -> ``(state_dict, metadata)``, checked by :func:`read_safetensors` (unless
    ``verified``: see there); metadata values are JSON-decoded when they parse (files written by other
    tools keep their plain strings)."""
    sd, raw = read_safetensors(path, verified=verified)
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            meta[k] = v
    return sd, meta


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The raw string metadata of a safetensors file's header, no tensor read (a format probe); a one-line
    :class:`CheckpointError` when the file does not parse as safetensors."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(_first_line(e)) from None


def nonfinite_in_file(path: str | Path) -> list[str]:
    """Names of the floating-point tensors of a safetensors file holding NaN or inf, reading one tensor at a
    time (a checkpoint check: nothing is kept); a one-line :class:`CheckpointError` when it does not parse."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return [k for k in f.keys() if nonfinite_tensors({k: f.get_tensor(k)})]
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(_first_line(e)) from None


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


class UnpicklingRefused(CheckpointError):
    """A pickle that asks for an object outside the allowed ones; ``refused`` names it (nothing was run)."""

    def __init__(self, message: str, refused: str) -> None:
        super().__init__(message)
        self.refused = refused


def read_torch_file(path: str | Path, *, allowed: list | tuple = ()) -> Any:
    """``torch.load`` restricted to tensors and plain containers (``weights_only=True``) on the CPU.

    ``argparse.Namespace`` is allowed too: official BEiT training checkpoints store their ``args`` in one,
    and it is a plain attribute bag; ``allowed``: more globals for ``torch.serialization.safe_globals``
    (classes, or ``(class, "module.name")`` pairs binding a pickled name to an inert stand-in). Anything else
    that needs code to unpickle is refused (:class:`UnpicklingRefused`). Errors never repeat PyTorch's advice
    to retry with ``weights_only=False``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{path}: not a checkpoint (neither safetensors nor a PyTorch file)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace, *allowed]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_global(str(e))
        raise UnpicklingRefused(
            f"{path}: this loader refuses to unpickle arbitrary objects ({refused}): "
            "only tensors and plain containers are read. Convert a file you trust to safetensors "
            "elsewhere, or export its state dict only.", refused
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError) as e:
        # the restricted unpickler raises these on malformed data
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch file ({first})") from None
    check_finite(dict(_nested_tensors(obj)), path)
    return obj


def _nested_tensors(obj: Any, prefix: str = "", depth: int = 0):
    """(dotted name, tensor) of every tensor in nested dicts / lists / tuples (a ``.pth`` file's content)."""
    if torch.is_tensor(obj):
        yield prefix or "tensor", obj
    elif depth < 8 and isinstance(obj, dict):
        for k, v in obj.items():
            yield from _nested_tensors(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)
    elif depth < 8 and isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _nested_tensors(v, f"{prefix}.{i}" if prefix else str(i), depth + 1)


__all__ = ["DIGEST_KEY", "CheckpointError", "CheckpointWriteError", "NonFiniteError", "check_finite", "describe_tensors",
           "digest_problem", "file_digest", "holding_nonfinite", "load_weights", "nonfinite_in_file", "nonfinite_tensors", "read_json",
           "read_safetensors", "read_torch_file", "safetensors_metadata", "UnpicklingRefused", "recorded_digest", "removed_on_failure", "save_weights", "seal", "sealable",
           "write_error", "write_safetensors"]
