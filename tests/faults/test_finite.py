"""The fault catalogue, issue 26 (finite weights, file integrity): nothing non-finite is saved, loaded, resumed
from or exported; every file the tool writes and reads back is verified.

Each case failed before the issue: a diverging run kept a NaN checkpoint as "the last good" one; load,
export, ``--init`` and ``--resume`` took NaN weights silently; garbage in ``tokenizer.safetensors`` loaded
as NaN; deleting ``manifest.json`` turned corruption detection off. Damaged files are made the way a user
would meet them: a NaN written by hand into a checkpoint whose hashes are then recomputed (so that only
the finiteness check can see it), garbage in the middle of a file, a deleted manifest.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import beit
from beit.checkpoint import (
    MANIFEST,
    CheckpointError,
    NonFiniteCheckpointError,
    _write_manifest,
    checkpoint_problem,
    save_checkpoint,
)
from beit.checkpoint_io import NonFiniteError, save_weights, write_safetensors
from tests.faults import test_catalogue as test_faults
from tests.faults.test_catalogue import assert_user_error, damage, pretrain, rows, step_dir
from tests.helpers.checkpoints import as_written_before_manifests
from tests.helpers.synthetic import make_colour_dataset

ENC = "encoder.blocks.1.mlp.fc2.weight"  # a weight of the tiny MAE's backbone
base, cli = test_faults.base, test_faults.cli  # the catalogue's fixtures: its data, MAE and tokenizer runs


@pytest.fixture
def run(base, tmp_path) -> Path:
    """A private copy of the base run (checkpoints at steps 2 and 4), free to damage."""
    return Path(shutil.copytree(base["run"], tmp_path / "run"))


def all_finite(folder: Path) -> bool:
    """Every floating tensor of every safetensors file under ``folder``, read raw (no checks of ours)."""
    files = sorted(folder.rglob("*.safetensors"))
    return all(torch.isfinite(t).all() for f in files for t in load_file(f).values() if t.is_floating_point())


def inject_nan(file: Path, key: str) -> None:
    """Write NaN into tensor ``key`` of ``file`` and record the file's new hashes (its own SHA-256 and, in a
    checkpoint folder, the manifest): a file that is intact as far as hashes go, only not finite."""
    with safe_open(str(file), framework="pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "beit.sha256"}
    tensors = load_file(file)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    write_safetensors(tensors, file, meta, finite=False)
    if (file.parent / MANIFEST).is_file():
        (file.parent / MANIFEST).unlink()
        _write_manifest(file.parent)


# --------------------------------------------------------------------------------------------- case 1: diverging


def test_diverging_run_never_leaves_a_nonfinite_checkpoint(base, tmp_path, cli):
    """The issue's command shape: lr 1e3 makes the gradient norm NaN at step 2 (a finite loss of ~1e14);
    the run stops naming the loss, the gradient norm and the learning rate, and writes nothing non-finite
    (before: step_00000002 held 104 NaN tensors and was called "the last good checkpoint")."""
    out = tmp_path / "dv1"
    code, err = cli(["pretrain", "--data", base["data"], "--method", "mae", "--preset", "mae_tiny_patch4_32",
                     "--batch-size", "8", "--steps", "12", "--out", out, "--precision", "fp32",
                     "optim.lr=1e3", "train.ckpt_every=2", "train.num_workers=0", "train.log_every=1"])
    line = assert_user_error(code, err, "stopping without saving", "optim.lr=", "Lower optim.lr")
    assert "gradient norm is nan" in line or "loss is nan" in line, line
    assert "non-finite gradients in" in line or "weights themselves" in line, line
    assert all_finite(out)
    for ck in sorted((out / "checkpoints").glob("step_*")):
        assert checkpoint_problem(ck) is None
    named = line.split("the last good checkpoint is kept (")[1].split(")")[0]
    assert named == "none yet" or all_finite(Path(named))


def test_nonfinite_skip_skips_then_stops_after_the_bound(base, tmp_path, cli):
    """``train.nonfinite=skip``: the NaN steps are skipped (logged, weights unchanged), at most
    ``train.max_nonfinite_skips`` in a row; the checkpoints written meanwhile hold the last finite weights."""
    out = tmp_path / "skip"
    code, err = cli(["pretrain", "--data", base["data"], "--method", "mae", "--preset", "mae_tiny_patch4_32",
                     "--batch-size", "8", "--steps", "12", "--out", out, "--precision", "fp32", "optim.lr=1e3",
                     "train.ckpt_every=2", "train.num_workers=0", "train.log_every=1", "train.nonfinite=skip",
                     "train.max_nonfinite_skips=3"])
    line = assert_user_error(code, err, "4 non-finite steps in a row (train.max_nonfinite_skips=3) at step 5",
                             "the last good checkpoint is kept (")
    assert err.count("update skipped") == 3
    logged = rows(out)
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert "loss" in logged[0] and all(r.get("nonfinite_skipped") == 1.0 and "loss" not in r for r in logged[1:])
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000004"]
    assert all_finite(out) and "step_00000004" in line
    w2, w4 = (load_file(step_dir(out, s) / "model.safetensors") for s in (2, 4))
    assert all(torch.equal(w2[k], w4[k]) for k in w2)  # skipped steps do not move the weights


def test_nonfinite_policy_is_checked_at_parse_time(base, tmp_path, cli):
    code, err = cli(pretrain(base["data"], tmp_path / "r", 2, "train.nonfinite=ignore"))
    assert_user_error(code, err, "train.nonfinite must be stop or skip")
    assert not (tmp_path / "r").exists()


def test_a_nonfinite_model_is_never_written(tmp_path):
    sd = {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")]), "c": torch.tensor([float("nan")])}
    with pytest.raises(NonFiniteCheckpointError, match=r"2 tensors \(b, c\) hold NaN or inf"):
        save_checkpoint(tmp_path, 2, sd)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    with pytest.raises(NonFiniteError, match=r"2 tensors \(b, c\)"):
        save_weights(sd, tmp_path / "w.safetensors")
    assert list(tmp_path.glob("*w.safetensors*")) == []


# --------------------------------------------------------------------------------------------- case 1: reading


def test_load_export_and_init_refuse_nonfinite_weights_written_by_hand(base, run, tmp_path, cli):
    """A checkpoint whose hashes are all right but which holds a NaN: named directly, it is refused with one
    line naming the tensor by ``beit.load``, ``export`` and ``--init``."""
    ck = step_dir(run, 4)
    inject_nan(ck / "model.safetensors", ENC)
    assert "SHA-256" not in (checkpoint_problem(ck) or "")  # only finiteness catches it
    with pytest.raises(CheckpointError, match=f"1 tensor \\({ENC}\\) holds NaN or inf"):
        beit.load(ck)
    code, err = cli(["export", ck, "--format", "timm", "--out", tmp_path / "exp"])
    assert_user_error(code, err, ENC, "NaN or inf")
    assert not (tmp_path / "exp").exists() or not any((tmp_path / "exp").iterdir())
    labelled = make_colour_dataset(tmp_path / "cls", n_train=2, n_val=1, size=32)
    code, err = cli(["finetune", "--data", labelled, "--init", ck, "--out", tmp_path / "ft", "--steps", "1",
                     "--batch-size", "3", "--precision", "fp32", "--workers", "0"])
    assert_user_error(code, err, ENC, "NaN or inf")
    # a lone weights file (not a run) with a NaN, as another tool might write it
    sd = load_file(ck / "model.safetensors")
    sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    save_file(sd, tmp_path / "lone.safetensors")
    with pytest.raises(CheckpointError, match=r"blocks\.1\.mlp\.fc2\.weight"):
        beit.load(tmp_path / "lone.safetensors")


def test_run_falls_back_past_a_nonfinite_checkpoint_and_refuses_when_none_is_finite(base, run, tmp_path, cli):
    inject_nan(step_dir(run, 4) / "model.safetensors", ENC)
    older = load_file(step_dir(run, 2) / "model.safetensors")[ENC]
    code, err = cli(["export", run, "--format", "hf", "--out", tmp_path / "exp"])
    assert code == 0 and "skipping checkpoint" in err and ENC in err and "Traceback" not in err, err
    model = beit.load(run)  # the newest finite checkpoint (the warning was said once, above)
    assert torch.equal(model.state_dict()["blocks.1.mlp.fc2.weight"], older)
    inject_nan(step_dir(run, 2) / "state.safetensors", next(k for k in load_file(step_dir(run, 2) / "state.safetensors")
                                                             if k.startswith("optim.")))
    with pytest.raises(CheckpointError, match="no intact checkpoint .*NaN or inf"):
        beit.load(run)
    code, err = cli(["export", run, "--format", "hf", "--out", tmp_path / "exp2"])
    assert_user_error(code, err, "no intact checkpoint", "step_00000004", ENC)


def test_resume_falls_back_past_a_nonfinite_checkpoint(base, run, cli):
    inject_nan(step_dir(run, 4) / "model.safetensors", ENC)
    code, err = cli(pretrain(base["data"], run, 6, "--resume"))
    assert code == 0, err
    assert "skipping checkpoint" in err and "step_00000004" in err and "NaN or inf" in err
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4, 5, 6]
    assert all_finite(run) and checkpoint_problem(step_dir(run, 4)) is None  # written again, finite


# --------------------------------------------------------------------------------------------- case 3: tokenizer


def test_garbled_tokenizer_file_is_detected(base, tmp_path, cli):
    """4 KB of garbage in the middle of ``tokenizer.safetensors`` (finite floats: only a hash sees it)."""
    tok = Path(shutil.copytree(base["tok"], tmp_path / "tok"))
    damage(tok / "tokenizer.safetensors", "garbage")
    with pytest.raises(CheckpointError, match="does not match the SHA-256 recorded in it"):
        beit.load(tok)
    code, err = cli(["pretrain", "--data", base["data"], "--tokenizer", tok, "--out", tmp_path / "b", "--steps", "2",
                     "--batch-size", "4", "--precision", "fp32", "model.depth=1", "model.embed_dim=32",
                     "model.num_heads=2", "beit.min_block=4", "train.num_workers=0"])
    assert_user_error(code, err, "tokenizer.safetensors", "SHA-256")
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_nonfinite_tokenizer_is_refused(base, tmp_path, cli):
    tok = Path(shutil.copytree(base["tok"], tmp_path / "tok"))
    key = next(iter(load_file(tok / "tokenizer.safetensors")))
    inject_nan(tok / "tokenizer.safetensors", key)
    with pytest.raises(CheckpointError, match=f"1 tensor \\({key}\\) holds NaN or inf"):
        beit.load(tok)
    code, err = cli(["tokenizer", "eval", "--tokenizer", tok, "--data", base["data"]])
    assert_user_error(code, err, key, "NaN or inf")


# --------------------------------------------------------------------------------------------- case 4: manifest


def test_missing_manifest_on_a_new_checkpoint_is_an_error_and_resume_falls_back(base, run, tmp_path, cli):
    """Deleting manifest.json no longer turns detection off: garbage in that checkpoint is not loaded, a
    resume takes the older intact checkpoint (before: it took the damaged one and failed at the lr)."""
    ck = step_dir(run, 4)
    (ck / MANIFEST).unlink()
    damage(ck / "model.safetensors", "garbage")
    assert "manifest.json is missing" in checkpoint_problem(ck)
    code, err = cli(["export", ck, "--format", "hf", "--out", tmp_path / "exp"])
    assert_user_error(code, err, "manifest.json is missing")
    code, err = cli(pretrain(base["data"], run, 6, "--resume"))
    assert code == 0, err
    assert "skipping checkpoint" in err and "manifest.json is missing" in err
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4, 5, 6]
    assert checkpoint_problem(step_dir(run, 4)) is None and (step_dir(run, 4) / MANIFEST).is_file()


def test_missing_manifest_alone_is_an_error(run):
    (step_dir(run, 4) / MANIFEST).unlink()  # no other damage: still unverifiable, so not trusted
    assert "manifest.json is missing" in checkpoint_problem(step_dir(run, 4))
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        beit.load(step_dir(run, 4))


def test_checkpoint_older_than_manifests_loads_with_one_warning(run, caplog):
    """Written before manifests (no manifest, no ``format`` in state.json, no SHA-256 in the weights):
    loaded, with one warning; NaN in such a checkpoint is still refused."""
    ck = step_dir(run, 4)
    as_written_before_manifests(ck)
    want = load_file(ck / "model.safetensors")[ENC]
    assert torch.equal(beit.load(ck).state_dict()["blocks.1.mlp.fc2.weight"], want)
    beit.load(ck)
    assert sum("predates manifests" in r.getMessage() for r in caplog.records) == 1
    sd = load_file(ck / "model.safetensors")
    sd[ENC].view(-1)[0] = float("nan")
    save_file(sd, ck / "model.safetensors")
    with pytest.raises(CheckpointError, match="NaN or inf"):
        beit.load(ck)


def test_every_safetensors_file_written_carries_its_digest(base, run, tmp_path, cli):
    """Checkpoints, tokenizers and exports record their own SHA-256, so a copy taken out of its folder is
    still verified; transformers and timm ignore the extra header key."""
    assert cli(["export", run, "--format", "timm", "--out", tmp_path / "timm"])[0] == 0
    assert cli(["export", run, "--format", "hf", "--out", tmp_path / "hf"])[0] == 0
    files = [step_dir(run, 4) / "model.safetensors", step_dir(run, 4) / "state.safetensors",
             base["tok"] / "tokenizer.safetensors", tmp_path / "timm" / "model.safetensors",
             tmp_path / "hf" / "model.safetensors"]
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            assert len((h.metadata() or {}).get("beit.sha256", "")) == 64, f
    damage(tmp_path / "hf" / "model.safetensors", "garbage")
    with pytest.raises(CheckpointError, match="SHA-256"):
        beit.load(tmp_path / "hf")


def test_files_at_the_top_of_a_run_are_hashed_and_checked(tmp_path, cli):
    """``config.yaml`` and ``classes.txt`` carry their SHA-256 in ``run.json``; a ``config.yaml`` changed
    since the run wrote it is refused when read back (here: by ``--resume``, which rebuilds the model
    from it)."""
    from beit.checkpoint_io import file_digest

    data = make_colour_dataset(tmp_path / "cls", n_train=2, n_val=1, size=16)
    out = tmp_path / "ft"
    args = ["finetune", "--data", data, "--init", "none", "--out", out, "--batch-size", "3", "--precision", "fp32",
            "--workers", "0", "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.img_size=16",
            "model.patch_size=4", "train.ckpt_every=1"]
    code, err = cli([*args, "--steps", "1"])
    assert code == 0, err
    files = json.loads((out / "run.json").read_text())["files"]
    assert files == {n: file_digest(out / n) for n in ("config.yaml", "classes.txt")}
    text = (out / "config.yaml").read_text()
    (out / "config.yaml").write_text(text.replace("depth: 1", "depth: 2"))
    code, err = cli([*args, "--steps", "2", "--resume"])
    assert_user_error(code, err, "config.yaml does not match the SHA-256 recorded in")
    (out / "config.yaml").write_text(text)
    code, err = cli([*args, "--steps", "2", "--resume"])
    assert code == 0, err


def test_export_folder_is_checked_against_its_manifest(run, tmp_path, cli):
    assert cli(["export", run, "--format", "timm", "--out", tmp_path / "timm"])[0] == 0
    manifest = json.loads((tmp_path / "timm" / "manifest.json").read_text())
    assert manifest["format"] == "beit-export/1" and set(manifest["files"]) == {"config.json", "model.safetensors"}
    cfg = tmp_path / "timm" / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_heads": 2', '"num_heads": 1'))
    with pytest.raises(CheckpointError, match="config.json does not match the SHA-256"):
        beit.load(tmp_path / "timm")


# --------------------------------------------------------------------------------------------- the guard itself


def _guard(policy: str, max_skips: int = 2, loss_scaling: bool = False):
    from beit.nonfinite import NonFiniteGuard

    net = torch.nn.Linear(2, 2)
    net.weight.grad = torch.zeros(2, 2)
    net.bias.grad = torch.tensor([0.0, float("nan")])
    return net, NonFiniteGuard(net, policy, max_skips, loss_scaling)


def test_guard_policies_and_the_fp16_overflow_case():
    from beit.nonfinite import NonFiniteStepError, Seen

    def last():
        return "step_00000004"

    nan, ok = Seen(3, 1.5, float("nan"), 1e-3), Seen(3, 1.5, 2.0, 1e-3)
    _, g = _guard("stop")
    with pytest.raises(NonFiniteStepError, match=r"gradient norm is nan .* at step 3: .*kept \(step_00000004\). "
                                                 r"Seen: non-finite gradients in 1 tensor \(bias\)"):
        g.judge(nan, last)
    _, g = _guard("skip", max_skips=2)
    assert g.judge(nan, last) is False and g.judge(nan, last) is False
    assert g.judge(ok, last) is True and g.in_a_row == 0  # a finite step resets the count
    assert g.judge(nan, last) is False and g.judge(nan, last) is False
    with pytest.raises(NonFiniteStepError, match=r"3 non-finite steps in a row \(train.max_nonfinite_skips=2\)"):
        g.judge(nan, last)
    _, g = _guard("stop", loss_scaling=True)  # fp16: an overflow (finite loss) is the scaler's to skip
    assert g.judge(nan, last) is False and g.judge(nan, last) is False
    with pytest.raises(NonFiniteStepError):
        g.judge(nan, last)
    _, g = _guard("stop", loss_scaling=True)
    with pytest.raises(NonFiniteStepError, match="the loss is nan"):  # a NaN loss is not an overflow
        g.judge(Seen(3, float("nan"), float("nan"), 1e-3), last)
    net, g = _guard("stop")
    net.weight.grad[0, 0] = float("inf")
    with pytest.raises(NonFiniteStepError, match=r"in 2 tensors \(weight, bias\), of which 1 tensor \(weight\) "
                                                 r"overflowed to inf"):
        g.judge(nan, last)
    net, g = _guard("skip")
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteStepError, match=r"weights themselves are not finite: 1 tensor \(weight\)"):
        g.judge(nan, last)  # skipping cannot help weights that are already gone


def test_grad_norm_and_clipping_match_torch():
    from beit.nonfinite import clip_grads, grad_norm

    torch.manual_seed(0)
    a, b = (torch.nn.Linear(8, 8) for _ in range(2))
    b.load_state_dict(a.state_dict())
    a(torch.randn(4, 8)).pow(2).sum().backward()
    for pb, pa in zip(b.parameters(), a.parameters()):
        pb.grad = pa.grad.clone()
    want = torch.nn.utils.clip_grad_norm_(list(a.parameters()), 0.5)
    norm = grad_norm(list(b.parameters()))
    clip_grads(list(b.parameters()), 0.5, norm)
    assert torch.allclose(norm, want)
    assert all(torch.equal(pa.grad, pb.grad) for pa, pb in zip(a.parameters(), b.parameters()))
