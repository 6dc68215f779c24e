"""Run checkpoints: weights and training state as safetensors + JSON, written atomically.

Layout of a run directory::

    RUN/config.yaml                      the fully resolved config of the run
    RUN/metrics.jsonl                    one JSON object per logged step / evaluation
    RUN/checkpoints/latest               name of the newest complete checkpoint (replaced atomically)
    RUN/checkpoints/step_00001000/       model.safetensors, state.safetensors, state.json, config.yaml
    RUN/checkpoints/best/                (tasks) weights of the best evaluation so far

A checkpoint directory is written under a temporary name and renamed into place; only then does
``latest`` move to it. A crash at any point leaves the previous checkpoint intact and ``latest`` pointing
at it. Nothing here unpickles: tensors are safetensors, everything else is JSON.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from .checkpoint_io import (
    CheckpointError,
    file_digest,
    holding_nonfinite,
    nonfinite_in_file,
    nonfinite_tensors,
    read_json,
    recorded_digest,
    removed_on_failure,
    seal,
    sealable,
)

log = logging.getLogger("beit")

CKPT_DIR = "checkpoints"
MANIFEST = "manifest.json"  # in every checkpoint folder: size + SHA-256 of each file, written last
MANIFEST_FORMAT = "beit-checkpoint/1"
# state.json of every checkpoint written since issue 26 says so: such a checkpoint without its manifest is
# damaged, not old (checkpoints written before manifests existed have no "format" and load with a warning)
CHECKPOINT_FORMAT = "beit-checkpoint/2"
TMP_PREFIX = ".tmp-"  # interrupted writes; removed at the start of the next run (under its lock)
OLD_PREFIX = ".old-"
__all__ = ["CHECKPOINT_FORMAT", "CKPT_DIR", "CheckpointError", "NonFiniteCheckpointError", "checkpoint_problem",
           "find_checkpoints", "latest_checkpoint", "refuse_nonfinite", "remove_stale",
           "require_checkpoint", "save_checkpoint", "verify_checkpoint"]


# --------------------------------------------------------------------------------------------- flattening


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and a JSON skeleton."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton: dict[str, Any] = {"state": {}, "param_groups": []}
    for idx, st in opt_state["state"].items():
        entry = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                key = f"optim.{idx}.{k}"
                tensors[key] = v.detach().contiguous().cpu()
                entry[k] = {"tensor": key}
            else:
                entry[k] = v
        skeleton["state"][str(idx)] = entry
    for g in opt_state["param_groups"]:
        skeleton["param_groups"].append({k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()})
    return tensors, skeleton


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], skeleton: dict) -> dict:
    state = {}
    for idx, entry in skeleton["state"].items():
        state[int(idx)] = {
            k: (tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v) for k, v in entry.items()
        }
    groups = []
    for g in skeleton["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), n[2], n[3], n[4]))


# --------------------------------------------------------------------------------------------- write


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(folder: Path) -> None:
    """``manifest.json``: size and SHA-256 of every other file; written last, so it marks completeness."""
    files = {}
    for f in sorted(folder.iterdir()):
        if f.name != MANIFEST:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
            files[f.name] = {"size": f.stat().st_size, "sha256": file_digest(f)}
    with open(folder / MANIFEST, "w") as fh:
        fh.write(json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1))
        fh.flush()
        os.fsync(fh.fileno())


def _write_dir_atomically(final: Path, write) -> None:
    """Call ``write(tmp_dir)``, add the manifest, then rename ``tmp_dir`` to ``final`` (replacing an older
    one). Any failure removes the temporary folder; a failed write (disk full) is a one-line
    :class:`CheckpointWriteError` and leaves ``final`` as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    with removed_on_failure(f"checkpoint {final}", tmp):
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write(tmp)
        _write_manifest(tmp)
        _fsync_dir(tmp)
        if final.exists():
            old = final.parent / f"{OLD_PREFIX}{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file of a checkpoint, carrying its own SHA-256 (it may be copied out of the folder)."""
    save_file(tensors, str(path), metadata=sealable())
    seal(path)


def write_text_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` in one step (temporary file + rename); a failure leaves it as it was."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}")
    with removed_on_failure(path, tmp):
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: torch.amp.GradScaler | None = None,
    state: dict | None = None,
    config_yaml: str | None = None,
    keep: int = 2,
) -> Path:
    """Write ``RUN/checkpoints/step_XXXXXXXX`` atomically, point ``latest`` at it, prune older ones."""
    ckdir = Path(run_dir) / CKPT_DIR
    name = f"step_{step:08d}"
    state = dict(state or {})
    state["step"] = step

    state["format"] = CHECKPOINT_FORMAT
    model_tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    refuse_nonfinite(model_tensors, ckdir / name)

    def write(tmp: Path) -> None:
        _write_tensors(model_tensors, tmp / "model.safetensors")
        tensors, rng_meta = rng_state()
        state["rng"] = rng_meta
        if optimizer is not None:
            opt_tensors, skeleton = _flatten_optimizer(optimizer.state_dict())
            tensors.update(opt_tensors)
            state["optimizer"] = skeleton
        if scaler is not None and scaler.is_enabled():
            state["scaler"] = {k: (float(v) if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}
        _write_tensors(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(state))
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)

    _write_dir_atomically(ckdir / name, write)
    write_text_atomically(ckdir / "latest", name + "\n")
    olds = sorted(p for p in ckdir.glob("step_*") if p.is_dir() and p.name < name)
    for p in olds[: max(0, len(olds) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return ckdir / name


class NonFiniteCheckpointError(CheckpointError, ValueError):
    """A checkpoint was not written because its weights hold NaN or inf (``names``: which tensors)."""

    def __init__(self, where: Path, names: list[str]) -> None:
        self.names = names
        super().__init__(f"refusing to write checkpoint {where}: {holding_nonfinite(names)}")


def refuse_nonfinite(model_tensors: dict[str, torch.Tensor], where: Path) -> None:
    """A checkpoint of non-finite weights is never written: :class:`NonFiniteCheckpointError` naming them."""
    names = nonfinite_tensors(model_tensors)
    if names:
        raise NonFiniteCheckpointError(where, names)


def save_weights_dir(path: str | Path, model_state: dict[str, torch.Tensor], info: dict, config_yaml: str | None) -> None:
    """Weights-only checkpoint directory (``best``), written atomically; non-finite weights are refused."""
    model_tensors = {k: v.detach().contiguous().cpu() for k, v in model_state.items()}
    refuse_nonfinite(model_tensors, Path(path))

    def write(tmp: Path) -> None:
        _write_tensors(model_tensors, tmp / "model.safetensors")
        (tmp / "state.json").write_text(json.dumps({**info, "format": CHECKPOINT_FORMAT}))
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)

    _write_dir_atomically(Path(path), write)


# --------------------------------------------------------------------------------------------- verify / read

_verified: dict[str, tuple[tuple, str | None]] = {}  # folder -> (what its files looked like, problem)
_warned: set[str] = set()


def _fingerprint(ckpt: Path) -> tuple:
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in ckpt.iterdir() if f.is_file()))


def _weights_files(ckpt: Path) -> list[str]:
    return ["model.safetensors"] + (["state.safetensors"] if (ckpt / "state.safetensors").is_file() else [])


def _nonfinite_problem(ckpt: Path) -> str | None:
    """Which tensors of the checkpoint's safetensors files hold NaN or inf (a diverged run written before
    saves were checked, or a file edited by hand), or None."""
    for name in _weights_files(ckpt):
        try:
            bad = nonfinite_in_file(ckpt / name)
        except CheckpointError as e:
            return f"{name} is not readable ({e})"
        if bad:
            return f"{name}: {holding_nonfinite(bad)}"
    return None


def _written_with_manifest(ckpt: Path) -> bool:
    """Whether the checkpoint says it was written with a manifest (``format`` in state.json, or weights that
    record their own SHA-256): then a missing manifest is damage, not age."""
    try:
        if recorded_digest(ckpt / "model.safetensors") is not None:
            return True
    except (OSError, CheckpointError):
        return False  # an unreadable header: the parse check below reports it
    try:
        state = read_json(ckpt / "state.json") if (ckpt / "state.json").is_file() else {}
    except CheckpointError:
        return False
    return isinstance(state, dict) and "format" in state


def _legacy_problem(ckpt: Path) -> str | None:
    """Checkpoints written before manifests existed: every file must at least parse (weights parse and are
    finite: checked by the caller); they load with one warning. One written since, whose manifest is gone, is damaged."""
    if _written_with_manifest(ckpt):
        return f"{MANIFEST} is missing, so its files cannot be verified (this version writes one with every checkpoint)"
    # that every weights file parses is checked with their finiteness (_nonfinite_problem), right after this
    if (ckpt / "state.json").is_file():
        try:
            read_json(ckpt / "state.json")
        except CheckpointError:
            return "state.json is not readable JSON"
    return None


def _manifest_problem(ckpt: Path) -> str | None:
    try:
        manifest = read_json(ckpt / MANIFEST)
        files = manifest["files"]
    except (CheckpointError, KeyError, TypeError):
        return f"{MANIFEST} is damaged"
    for name, want in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want.get("size"):
            return f"{name} has {f.stat().st_size} bytes, {want.get('size')} were written"
        if file_digest(f) != want.get("sha256"):
            return f"{name} does not match its recorded SHA-256 (damaged on disk)"
    return None


def checkpoint_problem(ckpt: str | Path) -> str | None:
    """Why the checkpoint folder ``ckpt`` cannot be trusted (missing/damaged file, content hash mismatch,
    manifest missing from a checkpoint written with one, weights holding NaN or inf), or ``None`` if it is
    intact. A checkpoint older than manifests is checked as far as it can be and warned about once.
    Results are cached while the folder's files stay the same."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        return "no such folder"
    if not (ckpt / "model.safetensors").is_file():
        return "no model.safetensors (not a checkpoint folder)"
    key = _fingerprint(ckpt)
    hit = _verified.get(str(ckpt))
    if hit is not None and hit[0] == key:
        return hit[1]
    legacy = not (ckpt / MANIFEST).is_file()
    problem = _legacy_problem(ckpt) if legacy else _manifest_problem(ckpt)
    problem = problem or _nonfinite_problem(ckpt)
    if legacy and problem is None and str(ckpt) not in _warned:
        _warned.add(str(ckpt))
        log.warning("checkpoint %s predates manifests (written by an older version): its files parse and its "
                    "weights are finite, but their content cannot be verified", ckpt)
    _verified[str(ckpt)] = (key, problem)
    return problem


def verify_checkpoint(ckpt: str | Path) -> Path:
    """``ckpt`` if it is intact, else a one-line :class:`CheckpointError` saying what is wrong."""
    problem = checkpoint_problem(ckpt)
    if problem:
        raise CheckpointError(f"checkpoint {ckpt} is damaged or incomplete: {problem}")
    return Path(ckpt)


def find_checkpoints(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest intact ``step_*`` checkpoint or None, [(newer damaged checkpoint, problem), ...])."""
    ckdir = Path(run_dir) / CKPT_DIR
    damaged: list[tuple[Path, str]] = []
    for cand in sorted((p for p in ckdir.glob("step_*") if p.is_dir()), reverse=True):
        problem = checkpoint_problem(cand)
        if problem is None:
            return cand, damaged
        damaged.append((cand, problem))
    return None, damaged


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of a run; damaged or incomplete newer ones are skipped with a warning."""
    good, damaged = find_checkpoints(run_dir)
    for cand, problem in damaged:
        if str(cand) not in _warned:
            _warned.add(str(cand))
            log.warning("skipping checkpoint %s: %s%s", cand, problem,
                        f"; using {good.name}" if good is not None else "")
    return good


def require_checkpoint(run_dir: str | Path) -> Path:
    """:func:`latest_checkpoint`, or a one-line error when the run has none that is intact."""
    good = latest_checkpoint(run_dir)
    if good is not None:
        return good
    _, damaged = find_checkpoints(run_dir)
    if damaged:
        listed = "; ".join(f"{p.name}: {why}" for p, why in damaged[:3])
        raise CheckpointError(f"{run_dir}: no intact checkpoint ({listed})")
    raise CheckpointError(f"{run_dir}: the run has no complete checkpoint yet")


_CACHE_TMP = re.compile(r"\.tmp(\d+)(\.|$)")  # beit.data.cache writes NAME.tmpPID.npy, then renames


def _writer_alive(name: str) -> bool:
    """Whether the process whose pid ends a leftover's name (``.tmp-NAME-PID``) still runs (on this host)."""
    pid = name.rsplit("-", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale(run_dir: str | Path, *, keep_live: bool = True) -> list[Path]:
    """Remove what interrupted writers left in ``RUN``, ``RUN/checkpoints`` and ``RUN/decode_cache``
    (``.tmp-*`` files and folders, the cache's ``*.tmpPID.*``); an ``.old-*`` folder whose replacement never
    arrived is put back. ``keep_live``: leave those of writers that still run (pass False under the run's
    lock, where no other writer can exist)."""
    run_dir = Path(run_dir)
    removed = []
    for folder in (run_dir, run_dir / CKPT_DIR, run_dir / "decode_cache"):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            cache_tmp = _CACHE_TMP.search(p.name)
            if not (p.name.startswith((TMP_PREFIX, OLD_PREFIX)) or cache_tmp):
                continue
            if keep_live and _writer_alive(cache_tmp.group(1) if cache_tmp else p.name):
                continue
            target = folder / p.name[len(OLD_PREFIX):].rsplit("-", 1)[0]
            if p.name.startswith(OLD_PREFIX) and not target.exists():
                os.replace(p, target)
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
    if removed:
        log.info("removed %d leftover(s) of interrupted writes: %s", len(removed), ", ".join(p.name for p in removed))
    return removed


def discard_after(run_dir: str | Path, step: int) -> None:
    """Remove checkpoints newer than ``step`` (a resume from ``step`` replaces that future)."""
    for p in (Path(run_dir) / CKPT_DIR).glob("step_*"):
        if p.is_dir() and p.name > f"step_{step:08d}":
            log.warning("removing %s: the run resumes from step %d and will write it again", p, step)
            shutil.rmtree(p, ignore_errors=True)


def restore_training_state(
    state: dict,
    tensors: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    if optimizer is not None and "optimizer" in state:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    if scaler is not None and "scaler" in state and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    if "rng" in state:
        set_rng_state(tensors, state["rng"])
