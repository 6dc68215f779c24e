"""The fault catalogue (issue 13): every way a careful new user can go wrong, driven through the real CLI.

Each case asserts what the user sees (exit status 2 and exactly one ``beit: error:`` line, no traceback)
and that nothing of theirs changed (a hash of every file before and after). The cases that already held
before the issue are here too, so they keep holding. Runs are tiny MAE models in fp32 (no tokenizer
needed); one base run is trained per module and copied for each case that changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import beit
from beit.checkpoint import CheckpointError, checkpoint_problem
from beit.checkpoint_io import load_weights
from beit.cli import main
from tests.helpers.paths import ROOT
from tests.helpers.synthetic import make_colour_dataset

TINY_MAE = ["--method", "mae", "--batch-size", "4", "--precision", "fp32", "model.depth=2", "model.embed_dim=32",
            "model.num_heads=2", "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2",
            "train.num_workers=0", "train.ckpt_every=2", "train.log_every=1"]
TINY_TOK = ["--preset", "vq_32", "--steps", "2", "--batch-size", "4", "--precision", "fp32", "model.n_hid=16",
            "model.vocab_size=16", "model.embed_dim=8", "model.n_init=16", "train.num_workers=0"]


# --------------------------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``root`` (the user's files, to compare before/after)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def cli(capsys, caplog):
    """``cli(ARGS)``: ``beit ARGS`` in this process -> (exit status, stderr + log records); argparse's own
    exits count as statuses."""
    return cli_runner(capsys, caplog)


def cli_runner(capsys, caplog):
    """The function behind the :func:`cli` fixture (other fault modules build their own fixture on it)."""

    def call(args: list) -> tuple[int, str]:
        caplog.clear()
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        logs = "".join(f"{r.getMessage()}\n" for r in caplog.records)
        return code, logs + capsys.readouterr().err

    return call


def assert_user_error(code: int, err: str, *needles: str) -> str:
    """Exit 2, no traceback, exactly one ``beit: error:`` line, last, holding every needle."""
    assert code == 2, err
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith("beit: error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def pretrain(data: Path, out: Path, steps: int, *extra: str) -> list:
    """``beit pretrain`` of the tiny MAE; ``extra`` flags go before the ``key=value`` overrides (argparse
    takes the overrides as one trailing group)."""
    pairs = [a for a in extra if "=" in a and not a.startswith("-")]
    flags = [a for a in extra if a not in pairs]
    tiny_flags = [a for a in TINY_MAE if "=" not in a]
    return ["pretrain", "--data", data, "--out", out, "--steps", str(steps), *flags, *tiny_flags,
            *[a for a in TINY_MAE if "=" in a], *pairs]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """One data folder, a 4-step MAE run (checkpoints at steps 2 and 4) and a 2-step tokenizer run."""
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(8):
        a = (torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(a).save(data / f"{i}.png")
    run, tok = root / "run", root / "tok"
    assert main([str(a) for a in pretrain(data, run, 4)]) == 0
    assert main(["tokenizer", "train", "--data", str(data), "--out", str(tok), *TINY_TOK]) == 0
    return {"data": data, "run": run, "tok": tok, "root": root}


@pytest.fixture
def run(base, tmp_path) -> Path:
    """A private copy of the base run, free to damage."""
    return Path(shutil.copytree(base["run"], tmp_path / "run"))


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 3]))
    elif how == "garbage":  # 4 KB in the middle, bytes of finite floats: nothing but the hash can see it
        mid = len(data) // 2
        data[mid:mid + 4096] = torch.full((1024,), 0.5).numpy().tobytes()
        path.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("name,how", [("model.safetensors", "truncate"), ("model.safetensors", "garbage"),
                                      ("state.json", "truncate"), ("state.safetensors", "garbage")])
def test_damaged_latest_checkpoint_falls_back_to_older(run, tmp_path, name, how, cli):
    older = load_weights(step_dir(run, 2) / "model.safetensors")[0]
    damage(step_dir(run, 4) / name, how)
    code, err = cli(["export", run, "--format", "timm", "--out", tmp_path / "exp"])
    assert code == 0, err
    assert "skipping checkpoint" in err and "step_00000004" in err and "Traceback" not in err
    exported = beit.load(tmp_path / "exp")
    assert torch.equal(exported.state_dict()["blocks.1.mlp.fc2.weight"], older["encoder.blocks.1.mlp.fc2.weight"])
    model = beit.load(run)  # the library call takes the same fallback
    assert torch.equal(model.state_dict()["blocks.1.mlp.fc2.weight"], older["encoder.blocks.1.mlp.fc2.weight"])


def test_resume_from_older_checkpoint_rewrites_the_damaged_one(base, run, cli):
    damage(step_dir(run, 4) / "model.safetensors", "garbage")
    (run / "checkpoints" / ".tmp-step_00000006-999999999").mkdir()  # a dead writer's leftover
    code, err = cli(pretrain(base["data"], run, 6, "--resume"))
    assert code == 0, err
    steps = [r["step"] for r in rows(run)]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000004", "step_00000006"]
    assert checkpoint_problem(step_dir(run, 4)) is None


def rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_no_intact_checkpoint_is_one_line(base, run, tmp_path, cli):
    damage(step_dir(run, 4) / "model.safetensors", "truncate")
    damage(step_dir(run, 2) / "state.json", "truncate")
    before = snapshot(run)
    code, err = cli(["export", run, "--format", "hf", "--out", tmp_path / "exp"])
    assert_user_error(code, err, "no intact checkpoint", "step_00000004", "step_00000002")
    code, err = cli(pretrain(base["data"], run, 6, "--resume"))
    assert_user_error(code, err, "no intact checkpoint")
    assert snapshot(run) == before
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        beit.load(run)


def test_damaged_checkpoint_named_directly_is_one_line(run, tmp_path, cli):
    damage(step_dir(run, 4) / "model.safetensors", "garbage")
    code, err = cli(["export", step_dir(run, 4), "--format", "hf", "--out", tmp_path / "exp"])
    assert_user_error(code, err, "damaged", "SHA-256")


def _limit_file_size() -> None:  # runs in the child: writes past 150 KB fail like a full disk
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))


def test_disk_full_during_save_keeps_previous_checkpoint(base, run):
    before = snapshot(step_dir(run, 4))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "beit", *map(str, pretrain(base["data"], run, 6, "--resume"))],
                       env=env, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert_user_error(p.returncode, p.stderr, "could not write checkpoint", "partial files were removed")
    assert snapshot(step_dir(run, 4)) == before
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not [p for p in run.rglob(".tmp-*")]


# --------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("override,needle", [
    ("optim.lr=nan", "optim.lr must be a finite number > 0"),
    ("optim.lr=-1", "optim.lr must be a finite number > 0"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("model.drop_path_rate=1.5", "model.drop_path_rate must be in [0, 1)"),
    ("mae.hflip=2", "mae.hflip must be in [0, 1]"),
    ("train.num_workers=-1", "train.num_workers must be >= 0"),
    ("optim.lrr=1", "did you mean 'lr'"),  # held before the issue
    ("train.steps=abc", "train.steps: expected an integer"),  # held before the issue
])
def test_bad_values_are_refused_at_parse_time(base, tmp_path, override, needle, cli):
    out = tmp_path / "r"
    code, err = cli(pretrain(base["data"], out, 4, override))
    assert_user_error(code, err, needle)
    assert not out.exists()


def test_tokenizer_eval_batch_size_zero(base, cli):
    code, err = cli(["tokenizer", "eval", "--tokenizer", base["tok"], "--data", base["data"],
                         "--batch-size", "0"])
    assert_user_error(code, err, "--batch-size must be >= 1")


# --------------------------------------------------------------------------------------------- identities


def test_tokenizer_given_as_backbone(base, tmp_path, cli):
    data = make_colour_dataset(tmp_path / "cls", n_train=2, n_val=1)
    code, err = cli(["finetune", "--data", data, "--init", base["tok"], "--out", tmp_path / "ft", "--steps", "1"])
    assert_user_error(code, err, "is a tokenizer", "not a backbone")
    assert not (tmp_path / "ft").exists()


def test_backbone_given_as_tokenizer(base, tmp_path, cli):
    code, err = cli(["pretrain", "--data", base["data"], "--tokenizer", base["run"], "--out", tmp_path / "r"])
    assert_user_error(code, err, "is a pretraining run (mae), not a tokenizer")


def test_random_bytes_are_not_a_checkpoint(tmp_path, cli):
    junk = tmp_path / "weights.bin"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="not a checkpoint") as e:
        beit.load(junk)
    assert "weights_only=False" not in str(e.value)
    code, err = cli(["export", junk, "--format", "hf", "--out", tmp_path / "x"])
    assert_user_error(code, err, "not a checkpoint")
    assert "weights_only" not in err


def test_code_running_pickle_is_refused_without_unsafe_advice(tmp_path, cli):  # held before the issue
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "payload": _Evil(str(tmp_path / "pwned"))}, path)
    code, err = cli(["export", path, "--format", "hf", "--out", tmp_path / "x"])
    assert_user_error(code, err, "refuses to unpickle arbitrary objects", "system")
    assert "weights_only=False" not in err and not (tmp_path / "pwned").exists()


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


# --------------------------------------------------------------------------------------------- data


def test_every_image_unreadable_with_workers(tmp_path, cli):
    data = tmp_path / "junk"
    data.mkdir()
    for i in range(8):
        (data / f"{i}.png").write_bytes(b"not an image")
    code, err = cli([*pretrain(data, tmp_path / "r", 2), "train.num_workers=2"])
    assert_user_error(code, err, "none of the 8 image files", str(data))
    assert "DataLoader worker" not in err


def test_bad_image_is_skipped_with_a_warning(base, tmp_path, cli):  # held before the issue
    data = Path(shutil.copytree(base["data"], tmp_path / "data"))
    (data / "3.png").write_bytes(b"\x89PNG broken")
    code, err = cli(pretrain(data, tmp_path / "r", 2))
    assert code == 0 and "skipping unreadable image" in err and "3.png" in err


def test_huge_image_is_skipped_or_downscaled(base, tmp_path, monkeypatch, cli):
    data = Path(shutil.copytree(base["data"], tmp_path / "data"))
    (data / "0.png").unlink()
    (data / "1.png").unlink()  # 8 images: 2 steps of 4 draw each once
    Image.new("RGB", (200, 150), (10, 200, 30)).save(data / "big.png")
    Image.new("RGB", (400, 300), (200, 10, 30)).save(data / "big.jpg")
    monkeypatch.setenv("BEIT_MAX_PIXELS", "20000")
    code, err = cli(pretrain(data, tmp_path / "r", 2))
    assert code == 0, err
    assert f"skipping huge image {data / 'big.png'}: 200x150" in err
    assert f"downscaled huge image {data / 'big.jpg'} from 400x300 to" in err


# --------------------------------------------------------------------------------------------- run folders


def mine(root: Path) -> dict[str, str]:
    """:func:`snapshot` without the lock file (a refused command may open it; it holds no data)."""
    return {k: v for k, v in snapshot(root).items() if k != ".lock"}


def users_folder(path: Path, **files: str) -> tuple[Path, dict[str, str]]:
    """A folder of the user's own files (name -> text), and its :func:`snapshot` before a command runs."""
    path.mkdir()
    for name, text in files.items():
        (path / name.replace("_", ".")).write_text(text)
    return path, snapshot(path)


def test_out_holding_the_users_files_is_refused(base, tmp_path, cli):
    out, before = users_folder(tmp_path / "mine", config_yaml="my: own\n", metrics_jsonl='{"mine": 1}\n')
    code, err = cli(pretrain(base["data"], out, 2))
    assert_user_error(code, err, "is not empty and is not a beit run", "config.yaml, metrics.jsonl")
    assert snapshot(out) == before  # not even a lock file added


def test_out_of_another_kind_is_refused(base, tmp_path, cli):
    data = make_colour_dataset(tmp_path / "cls", n_train=2, n_val=1)
    tok = Path(shutil.copytree(base["tok"], tmp_path / "tok"))
    before = mine(tok)
    code, err = cli(["finetune", "--data", data, "--init", "none", "--out", tok, "--steps", "1", "--batch-size", "3",
                     "--precision", "fp32", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
                     "model.img_size=16", "train.num_workers=0"])
    assert_user_error(code, err, f"--out {tok} is a tokenizer run; this command writes a fine-tuning run")
    assert mine(tok) == before


def test_out_that_is_a_file_or_cannot_be_made(base, tmp_path, cli):
    f = tmp_path / "file"
    f.write_text("x")
    assert_user_error(*cli(pretrain(base["data"], f, 2)), "is a file, not a folder")
    assert f.read_text() == "x"
    code, err = cli(pretrain(base["data"], Path("/sys/beit-faults/run"), 2))  # not writable, even for root
    assert_user_error(code, err, "cannot create --out /sys/beit-faults/run")


def test_export_refuses_a_non_empty_target_unless_overwrite(run, tmp_path, cli):
    out, before = users_folder(tmp_path / "exp", config_json="{}", notes_txt="mine")
    assert_user_error(*cli(["export", run, "--format", "hf", "--out", out]), "is not empty", "--overwrite")
    assert snapshot(out) == before
    code, err = cli(["export", run, "--format", "hf", "--out", out, "--overwrite"])
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "mine" and beit.load(out).cfg.embed_dim == 32
    assert_user_error(*cli(["export", run, "--format", "hf", "--out", out / "notes.txt"]), "is a file")


def test_stray_positional_argument_and_debug(base, tmp_path, cli):
    assert_user_error(*cli([*pretrain(base["data"], tmp_path / "r", 2), "oops"]), "unexpected argument 'oops'")
    from beit.config import ConfigError

    with pytest.raises(ConfigError, match="optim.lr"):  # --debug: the exception itself, with its traceback
        main(["--debug", *map(str, pretrain(base["data"], tmp_path / "r", 2, "optim.lr=nan"))])


@pytest.mark.parametrize("change,needle", [
    ("model.drop_path_rate=0.2", "model.drop_path_rate 0.0 -> 0.2"),
    ("model.embed_dim=64", "model.embed_dim 32 -> 64"),  # another width: before, a size-mismatch traceback
    ("mae.mask_ratio=0.5", "mae.mask_ratio 0.75 -> 0.5"),
    ("train.batch_size=8", "train.batch_size 4 -> 8"),
    ("train.seed=3", "train.seed 0 -> 3"),
    ("train.steps=3", "train.steps 4 -> 3"),  # the schedule may grow, not shrink
])
def test_resume_refuses_changes_to_what_is_trained(base, run, cli, change, needle):
    before = mine(run)
    code, err = cli(pretrain(base["data"], run, 4, "--resume", change))
    assert_user_error(code, err, f"--resume {run} with changes to what is trained", needle, "--resume-anyway")
    assert mine(run) == before


def test_resume_may_extend_and_anyway_accepts_changes(base, run, tmp_path, cli):
    data = Path(shutil.copytree(base["data"], tmp_path / "moved"))
    assert_user_error(*cli(pretrain(data, run, 6, "--resume")), f"data.path {base['data']} -> {data}")
    code, err = cli(pretrain(base["data"], run, 6, "--resume", "train.num_workers=1", "train.log_every=2"))
    assert code == 0, err
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4, 6]
    code, err = cli(pretrain(data, run, 8, "--resume", "--resume-anyway", "optim.lr=0.01"))
    assert code == 0 and "resuming anyway with changes" in err and "optim.lr 0.0015 -> 0.01" in err
    assert "lr: 0.01" in (run / "config.yaml").read_text()
    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4, 6, 7, 8]


def test_resume_compares_the_tokenizer_by_content(base, tmp_path, cli):
    from beit.loading import load_tokenizer
    from beit.models.tokenizer import save_tokenizer

    tok, same, other = (Path(shutil.copytree(base["tok"], tmp_path / n)) for n in ("tok", "same", "other"))
    t = load_tokenizer(other)
    with torch.no_grad():
        next(t.parameters()).add_(0.01)
    save_tokenizer(t, other)
    beit_args = ["--batch-size", "4", "--precision", "fp32", "model.depth=2", "model.embed_dim=32",
                 "model.num_heads=2", "beit.min_block=4", "train.num_workers=0", "train.ckpt_every=2"]
    out = tmp_path / "beit"

    def go(tokenizer: Path, steps: int, *extra: str) -> tuple[int, str]:
        return cli(["pretrain", "--data", base["data"], "--tokenizer", tokenizer, "--out", out, "--steps", steps,
                    *beit_args, *extra])

    assert go(tok, 2)[0] == 0
    code, err = go(same, 4, "--resume")  # another path, same content: the same run
    assert code == 0, err
    before = mine(out)
    code, err = go(other, 6, "--resume")
    assert_user_error(code, err, "tokenizer: a file with other content (sha256")
    assert mine(out) == before


def _beit(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "beit", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=300)


def test_second_writer_is_refused_naming_the_holder(base, run):
    import socket

    from beit.runs import RunDir

    RunDir(run).lock()  # this process plays the running writer
    try:
        before = mine(run)
        p = _beit(*pretrain(base["data"], run, 8, "--resume"))
        assert_user_error(p.returncode, p.stderr, f"is in use by pid {os.getpid()} on host {socket.gethostname()}")
        assert mine(run) == before
    finally:
        RunDir(run).release()


@pytest.mark.parametrize("resume", [False, True], ids=["two-writers", "two-resumes"])
def test_concurrent_commands_on_one_folder(base, run, tmp_path, resume):
    """Started together: one trains, the other is refused (or, if it came after, finds nothing to do);
    either way every step is logged once."""
    out = run if resume else tmp_path / "fresh"
    args = pretrain(base["data"], out, 16, *(["--resume"] if resume else []))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "beit", *map(str, args)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes[0] == 0, results
    for code, err in results:
        if code:
            assert_user_error(code, err)
            assert "is in use by pid" in err or "already holds checkpoints" in err
    assert [r["step"] for r in rows(out)] == list(range(1, 17))


@pytest.mark.parametrize("command", ["tokenizer", "finetune", "segment"])
def test_every_training_command_takes_the_lock(base, tmp_path, cli, command):
    import fcntl

    from tests.tasks.test_segment import make_shapes_dataset

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)  # another writer: its own open file, its own lock
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"pid 4242 on host elsewhere\n")
    tiny = ["--steps", "1", "--batch-size", "3", "--precision", "fp32", "--workers", "0"]
    model = ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "model.img_size=16", "model.patch_size=4"]
    args = {
        "tokenizer": ["tokenizer", "train", "--data", base["data"], "--out", out, *TINY_TOK],
        "finetune": ["finetune", "--data", make_colour_dataset(tmp_path / "cls", n_train=2, n_val=1), "--init",
                     "none", "--out", out, *tiny, *model],
        "segment": ["segment", "--data", make_shapes_dataset(tmp_path / "seg"), "--init", "none", "--out", out,
                    *tiny, *model, "head.channels=16", "head.aux_channels=8"],
    }[command]
    try:
        code, err = cli(args)
        assert_user_error(code, err, f"--out {out} is in use by pid 4242 on host elsewhere")
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        os.close(fd)


def test_sigkill_at_random_points_then_resume():
    """Killed three times (mid-line, mid-checkpoint, after a random step: seed 13), then resumed
    to the end: each step logged once, nothing left behind (``scripts/sigkill_resume.py --kills 10`` is the
    long version, which also compares the losses with a run never killed)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "sigkill_resume.py"), "--kills", "3", "--steps", "12",
                        "--seed", "13", "--no-reference"], env=env, capture_output=True, text=True, timeout=600)
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert p.returncode == 0 and result["ok"], result
