"""The embedded Fashion-MNIST folders and ``beit demo`` end to end (smoke budget: tiny subsets, 2 steps a stage)."""

from __future__ import annotations

import html
import json
import shlex

import numpy as np
import pytest
import yaml
from PIL import Image

from beit.data import embedded
from beit.data.folder import DataError, ImageFolder, list_images


def test_embedded_arrays_and_split():
    images, labels = embedded.load_arrays()
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10
    split = embedded.split_indices(labels)
    assert {k: len(v) for k, v in split.items()} == {"unlabelled": 7000, "train": 2000, "val": 1000}
    allidx = np.concatenate(list(split.values()))
    assert len(np.unique(allidx)) == 10000  # disjoint and complete
    for part, n in embedded.PER_CLASS.items():
        assert np.bincount(labels[split[part]]).tolist() == [n] * 10  # stratified
    assert (embedded.split_indices(labels)["val"] == split["val"]).all()  # deterministic


def test_materialize_layout(tmp_path):
    d = embedded.materialize(tmp_path / "fm", unlabelled_per_class=3, labels_per_class=2, val_per_class=1,
                             seg_train=5, seg_val=2)
    assert d.counts() == {"unlabelled": 30, "train": 20, "val": 10, "seg_train": 5, "seg_val": 2}
    tr = ImageFolder(d.train, with_labels=True)
    assert tr.classes == list(embedded.CLASSES) and len(tr) == 20
    img, label = tr[0]
    assert img.mode == "RGB" and img.size == (32, 32)
    a = np.asarray(img)
    assert (a[:2] == 0).all() and (a[..., 0] == a[..., 2]).all()  # black padding, gray stored as RGB
    val_ids = {p.stem for p in list_images(d.val)}
    assert not val_ids & {p.stem for p in list_images(d.train)}
    assert not val_ids & {p.stem for p in list_images(d.unlabelled)}
    masks = list_images(d.seg / "masks" / "train")
    assert len(masks) == 5 and len(list_images(d.seg / "images" / "val")) == 2
    m = np.asarray(Image.open(masks[0]))
    assert m.shape == (64, 64) and set(np.unique(m)) <= set(range(11)) | {255}
    assert len(set(np.unique(m)) - {0, 255}) >= 1
    assert (tmp_path / "fm" / "COPYRIGHT-fashion-mnist").read_text().startswith("Format:")
    # same arguments: reused; other arguments: rewritten; a folder we did not write: refused
    before = masks[0].stat().st_mtime_ns
    embedded.materialize(tmp_path / "fm", unlabelled_per_class=3, labels_per_class=2, val_per_class=1,
                         seg_train=5, seg_val=2)
    assert masks[0].stat().st_mtime_ns == before
    d2 = embedded.materialize(tmp_path / "fm", unlabelled_per_class=1, labels_per_class=1, val_per_class=1,
                              seg_train=0, seg_val=0)
    assert d2.counts()["unlabelled"] == 10 and not (tmp_path / "fm" / "seg").exists()
    (tmp_path / "mine" / "unlabelled").mkdir(parents=True)
    with pytest.raises(DataError, match="not written by"):
        embedded.materialize(tmp_path / "mine")


def test_compose_canvas_masks_follow_pixels():
    images, labels = embedded.load_arrays()
    rng = np.random.default_rng(0)
    img, mask = embedded.compose_canvas(images[:3], labels[:3], 64, rng)
    assert ((mask == 0) == (img == 0)).mean() > 0.97  # background is where the canvas is black
    assert (img[(mask > 0) & (mask < 255)] > 16).all()  # labelled pixels are solid garment pixels


def html_text(page: str) -> str:
    return html.unescape(page)


def test_demo_smoke_end_to_end(tmp_path, capsys):
    from beit import cli, demo

    out = tmp_path / "demo"
    rc = cli.main(["demo", "--method", "beit", "--out", str(out), "--minutes", "0.3"])
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert [s["error"] for s in summary["stages"]] == [""] * len(summary["stages"]), summary["stages"]
    assert rc == 0
    assert "fine-tune from BEiT" in printed and "report:" in printed
    for key in ("psnr", "codebook_usage"):
        assert isinstance(summary["tokenizer"][key], float)
    assert isinstance(summary["pretrain"]["mlm_acc"], float)  # the pretraining command's --json line
    for w in ("pretrained", "scratch"):
        assert 0 <= summary["finetune"][w]["top1"] <= 100
    assert summary["probe"]["knn"]["top1"] is not None and summary["segment"]["mIoU"] is not None
    # the backbone's probes try every pooling and name the best one in the summary table
    assert {summary["probe"][p]["pool"] for p in ("linear", "knn")} <= {"mean", "cls", "grid", "tokens"}
    tried = json.loads((out / "runs" / "probe-knn.json").read_text())["per_layer"]
    assert {r["pool"] for r in tried} == {"mean", "cls", "grid", "tokens"}  # every token in place is one of them
    assert f"k-NN probe ({summary['probe']['knn']['pool']} pooling)" in printed
    # the verdict first, in one sentence: what beat what and by how much (a smoke test says it means nothing)
    first = printed.splitlines()[0]
    f = summary["finetune"]
    margin = f["pretrained"]["top1"] - f["scratch"]["top1"]
    assert first.startswith("Smoke test") and first.count(". ") == 0 and first.endswith(").")
    assert f"{abs(margin):.1f} points {'above' if margin >= 0 else 'below'} the same recipe from scratch" in first
    # segmentation with its baselines: the same schedule from scratch and the constant prediction
    sb = summary["segment_baselines"]
    assert sb["scratch"]["mIoU"] is not None and 0 < sb["constant"]["pixel_acc"] <= 100
    assert "segmentation from scratch" in printed and "constant prediction (background)" in printed

    report = (out / "report.html").read_text(encoding="utf-8")
    from beit.viz.report import external_references

    assert external_references(report) == []
    assert summary["precision"]["pretrain"] in ("fp32", "bf16")  # what train.precision=auto chose
    assert f"Precision: {summary['precision']['pretrain']}" in report and summary["machine"] in report
    assert report.count("<img") >= 10 and "picture not available" not in report
    from beit.demo import verdict

    assert -1 < html_text(report).find(verdict(summary)) < html_text(report).find("Fine-tuning with few labels")
    assert "Ankle boot" in report and "#000000" in report  # the class legend, background black

    # every reproduce command parses with the real parser
    import re

    parser = cli.build_parser()
    blocks = re.findall(r"<pre><code>(.*?)</code></pre>", report, re.S)
    commands = [c for b in blocks for c in html.unescape(b).replace("\\\n", " ").splitlines()
                if c.startswith("beit ")]
    assert len(commands) >= 9
    for c in commands:
        parser.parse_args(shlex.split(c)[1:])
    assert any("--init none" in c for c in commands)
    # the pretrained and the scratch rows are fine-tuned with the same recipe
    finetunes = [c for c in commands if c.startswith("beit finetune")]
    assert len(finetunes) == 2 and all(o in c.split() for c in finetunes for o in demo.FINETUNE_RECIPE)

    # and the page renders with every picture in a real browser, if there is one
    try:
        from tests.viz.test_report_browser import browser_check, find_chromium
    except ImportError:  # pragma: no cover - run from another root
        return
    binary = find_chromium()
    if binary is not None:
        found = browser_check(binary, out / "report.html", tmp_path)
        assert found["images"] and all(im["w"] > 0 for im in found["images"]), found["images"]
        assert all(t["numbers"] > 0 for t in found["tables"]), found["tables"]


def test_demo_mae_runs_without_a_tokenizer(tmp_path, capsys):
    """`beit demo` (MAE, the default): no tokenizer stage (its share goes to pretraining and fine-tuning), MAE's
    rows and pictures."""
    from beit import cli
    from beit.demo import SHARES, Demo

    out = tmp_path / "demo"
    rc = cli.main(["demo", "--out", str(out), "--minutes", "0.3"])
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0 and summary["method"] == "mae"
    assert isinstance(summary["pretrain"]["loss"], float) and summary["pretrain"]["step"] >= 1  # read from --json
    assert [s["name"] for s in summary["stages"]] == ["data", "pretrain", "finetune_pretrained", "finetune_scratch",
                                                      "probe", "baselines", "segment", "pictures"]
    assert "fine-tune from MAE" in printed and "tokenizer" not in printed
    assert not (out / "runs" / "tokenizer").exists()
    report = (out / "report.html").read_text(encoding="utf-8")
    assert "Visual tokenizer" not in report and "MAE pretraining" in report
    assert "reconstruction + visible patches" in report and "picture not available" not in report
    assert len(list((out / "runs" / "pictures").glob("masked-*.png"))) == 3
    # the small model's MAE recipe: a one-block decoder, shown in the reproduce command and in the checkpoint
    assert "mae.decoder_depth=1" in html_text(report)
    assert yaml.safe_load((out / "runs" / "pretrain" / "config.yaml").read_text())["mae"]["decoder_depth"] == 1

    shares = Demo(tmp_path / "x", minutes=10, method="mae").clock.shares
    assert "tokenizer" not in shares and abs(sum(shares.values()) - 1.0) < 1e-9
    assert shares["pretrain"] > SHARES["pretrain"] and shares["finetune_pretrained"] > SHARES["finetune_pretrained"]


def test_hidden_flags_keep_the_command_parsable():
    from beit import cli, demo

    argv = ["tokenizer", "train", "--data", "d", "--out", "o", "--steps", "5", "model.n_hid=32"]
    full = demo.with_hidden(argv, ["--max-minutes", "2.50", "train.log_every=1"])
    args = cli.build_parser().parse_args(full)
    assert args.max_minutes == 2.5 and args.overrides == ["model.n_hid=32", "train.log_every=1"]
    with pytest.raises(RuntimeError, match="not a valid command line"):
        cli.run_command(["tokenizer", "train", "--no-such-flag"])
    # the demo runs nothing without the runner the CLI hands it (it never imports the CLI)
    with pytest.raises(RuntimeError, match="command runner"):
        demo.Demo("unused", minutes=0.3).run_command(["presets"])


def test_demo_baselines_are_the_raw_pixel_probes(tmp_path):
    """The demo's no-learning rows are `beit probe --init pixels` on the same labels and validation images."""
    from beit.cli import run_command
    from beit.demo import Demo, summary_rows
    from beit.tasks import probe

    demo = Demo(tmp_path / "demo", minutes=0.3, run_command=run_command)
    demo.prepare_data()
    demo.baselines()
    demo.total_seconds = 0.0  # set by Demo.run, which this test does not call
    summary = demo.summary()
    px = summary["pixels"]
    assert set(px) == {"linear", "knn", "knn_ft"} and all(px[k]["top1"] is not None for k in px)
    ref = probe.run(probe.build_config(overrides={
        "protocol": "knn", "init": "pixels", "data.path": str(demo.embedded.root / "labelled"),
        "data.labels_per_class": demo.labels_per_class, "k": min(20, 10 * demo.labels_per_class),
        "num_workers": 0}))
    assert px["knn_ft"]["top1"] == ref["best"]["top1"]
    labels = [r[0] for r in summary_rows(summary)]
    assert labels.count("k-NN on raw pixels, same labels") == 2 and "linear on raw pixels, same labels" in labels


def _metrics(run, seconds_per_step, batch=32):
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "metrics.jsonl", "w") as f:
        for i, s in enumerate(seconds_per_step, 1):
            f.write(json.dumps({"step": i, "images_per_s": batch / s}) + "\n")


def test_step_seconds_skips_a_slow_start(tmp_path):
    """A timing run whose first steps are slow (the cause of the demo's 50-step tokenizer) is read from the
    steps after the warm-up, and the run's own pace is compared with the plan in the report notes."""
    from beit.demo import CALIBRATION_STEPS, Demo, StageResult
    from beit.demo.clock import _step_seconds

    _metrics(tmp_path / "calib", [4.0, 3.0, 0.2, 0.25, 0.2, 0.3][:CALIBRATION_STEPS])
    assert _step_seconds(tmp_path / "calib", 32, wall=9.0) == pytest.approx(0.25)
    assert _step_seconds(tmp_path / "none", 32, wall=6.0) == pytest.approx(6.0 / CALIBRATION_STEPS)

    demo = Demo(tmp_path / "demo", minutes=10)
    _metrics(tmp_path / "run", [1.0] + [0.2] * 10)
    st = StageResult("tokenizer", "t", planned_step_s=2.0)
    demo.clock.check_plan(st, tmp_path / "run", 32)
    assert len(st.notes) == 1 and "10.0x fewer steps" in st.notes[0]
    ok = StageResult("tokenizer", "t", planned_step_s=0.22)
    demo.clock.check_plan(ok, tmp_path / "run", 32)
    assert ok.notes == []


def test_planner_raises_a_learning_stage_to_the_steps_it_needs_up_to_its_cap(tmp_path, monkeypatch):
    """On a slow machine the shares alone would leave pretraining and fine-tuning short of what pays: the
    planner gives a stage the time for its wanted steps at the measured pace, never more than its cap, and
    says so in the report's notes; a stage whose share already fits them keeps its share."""
    from beit.demo import clock, plan
    from beit.demo import run as demo_run

    monkeypatch.setattr(clock, "_step_seconds", lambda *a, **k: 0.05)  # the timing run's measured pace
    d = demo_run.Demo(tmp_path / "d", minutes=5, method="mae", run_command=lambda argv: {}).clock
    st = plan.StageResult("pretrain", "t")
    # (the no-op timing run's own microseconds come off the budget: a step less at most)
    assert d.steps_for(st, 10.0, lambda p: [], 32, wanted=(600, 100.0, 0.3)) in (599, 600)  # raised to 30 s
    assert "600 are wanted" in st.notes[0] and "given 30 s" in st.notes[0]
    assert d.steps_for(plan.StageResult("x", "t"), 10.0, lambda p: [], 32, wanted=(600, 20.0, 0.3)) in (399, 400)  # capped
    kept = plan.StageResult("y", "t")
    assert d.steps_for(kept, 60.0, lambda p: [], 32, wanted=(600, 100.0, 0.3)) in (1199, 1200)  # share fits more
    assert not any("wanted" in n for n in kept.notes)
    assert d.wanted(plan.PRETRAIN_STEPS_WANTED, 0.5)[0] == plan.PRETRAIN_STEPS_WANTED["mae"]
    assert demo_run.Demo(tmp_path / "b", minutes=5, method="beit").clock.wanted(plan.PRETRAIN_STEPS_WANTED, 0.5) is None
    assert demo_run.Demo(tmp_path / "f", minutes=5, full_model=True).clock.wanted(plan.FINETUNE_STEPS_WANTED, 0.3) is None
