"""The HTML report in a real browser: headless Chromium renders it, every picture loads, every table has numbers.

Needs Debian's ``chromium`` (``apt-get install chromium``; ``.ci/run`` installs it). Without it the browser
checks are skipped with a message; the static checks (self-contained, tables) always run.
The report is built from small synthetic results, so the test takes a few seconds plus the browser start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beit.viz.curves import plot_metrics
from beit.viz.report import Figure, Section, Table, external_references, render_html, write_report

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
    "--no-first-run", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
    "--disable-dev-shm-usage", "--mute-audio",
]

# Appended to a copy of the page (the report itself has no script): after load, record each image's
# naturalWidth and each table's numeric cells in an element that --dump-dom prints.
PROBE = """
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.map.call(document.images, function (im) {
    return {alt: im.alt, complete: im.complete, w: im.naturalWidth, h: im.naturalHeight};
  });
  var tables = Array.prototype.map.call(document.querySelectorAll("table"), function (t) {
    var nums = Array.prototype.filter.call(t.querySelectorAll("td"), function (td) {
      return /^-?[0-9][0-9,]*(\\.[0-9]+)?(e[-+][0-9]+)?%?$/.test(td.textContent.trim());
    });
    return {rows: t.querySelectorAll("tbody tr").length, numbers: nums.length};
  });
  var out = document.createElement("pre");
  out.id = "probe-result";
  out.textContent = JSON.stringify({images: imgs, tables: tables, width: document.body.scrollWidth});
  document.body.appendChild(out);
});
</script>
"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def run_chromium(binary: str, args: list[str], profile: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    env = {**os.environ, "HOME": str(profile)}  # chromium writes caches under $HOME
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def browser_check(binary: str, report: Path, work: Path, screenshot: Path | None = None,
                  width: int = 1280, height: int = 2400) -> dict:
    """Render ``report``: optional screenshot, then the probe's findings (images and tables) as a dict."""
    if screenshot is not None:
        r = run_chromium(binary, [f"--screenshot={screenshot}", f"--window-size={width},{height}",
                                  report.as_uri()], work / "profile-shot")
        assert screenshot.is_file(), f"no screenshot: {r.stderr[-2000:]}"
    probed = work / "probed.html"
    probed.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    r = run_chromium(binary, ["--dump-dom", "--virtual-time-budget=10000", f"--window-size={width},{height}",
                              probed.as_uri()], work / "profile-dom")
    m = re.search(r'<pre id="probe-result">(.*?)</pre>', r.stdout, re.S)
    assert m, f"the probe did not run: rc={r.returncode} stderr={r.stderr[-2000:]}"
    import html

    return json.loads(html.unescape(m.group(1)))


def assert_rendered_ok(found: dict, expect_images: int, expect_tables: int) -> None:
    assert len(found["images"]) == expect_images, found["images"]
    broken = [im for im in found["images"] if not (im["complete"] and im["w"] > 0 and im["h"] > 0)]
    assert not broken, f"images that did not load: {broken}"
    assert len(found["tables"]) == expect_tables
    for t in found["tables"]:
        assert t["rows"] > 0 and t["numbers"] > 0, f"a table without numbers: {found['tables']}"


@pytest.fixture
def synthetic_report(tmp_path: Path) -> tuple[Path, int, int]:
    """A report like the demo's, from made-up results: (path, number of images, number of tables)."""
    rows = [{"step": s, "loss": 6.0 * np.exp(-s / 40) + 0.5, "mlm_acc": 1 - np.exp(-s / 60), "lr": 1e-3}
            for s in range(0, 200, 10)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    curve = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png", keys=("loss", "mlm_acc"))
    rng = np.random.default_rng(0)
    grid = (rng.random((34, 8 * 34, 3)) * 255).astype(np.uint8)
    Image.fromarray(grid).save(tmp_path / "grid.png")
    Image.fromarray(grid[:, :64]).save(tmp_path / "photo.jpg")
    sections = [
        Section("Tokenizer", text="A dVAE turns each 4x4 patch into one of `512` visual words.",
                tables=[Table(["psnr", "codebook usage"], [[24.31, 0.62]])],
                figures=[Figure(curve, "training curves"), Figure(tmp_path / "grid.png", "reconstructions",
                                                                   pixelated=True, width=544)],
                commands=["beit tokenizer train --data MY_IMAGES --out runs/tok --preset dvae_32 --steps 2000"]),
        Section("Fine-tuning", tables=[Table(["init", "labels/class", "top-1"],
                                             [["BEiT", 10, 0.7412], ["scratch", 10, 0.5523]],
                                             caption="val accuracy")],
                figures=[Figure(tmp_path / "photo.jpg", "a JPEG")],
                commands=["beit finetune --train MY/train --val MY/val --init runs/pre --out runs/ft"],
                notes=["budget: 30 s"]),
        Section("Missing picture", figures=[Figure(tmp_path / "absent.png", "never written")],
                tables=[Table(["k", "top-1"], [[20, 0.7]])]),
    ]
    summary = Table(["step", "metric", "value"], [["tokenizer", "psnr", 24.31], ["fine-tune", "top-1", 0.7412]])
    path = write_report(tmp_path / "report.html", "beit demo", sections, subtitle="synthetic results",
                        summary=summary, footer=["Fashion-MNIST (c) Zalando SE, MIT licence."])
    return path, 3, 4


def test_report_is_self_contained(synthetic_report):
    path, n_images, n_tables = synthetic_report
    page = path.read_text(encoding="utf-8")
    assert external_references(page) == []
    assert page.count("<img") == n_images and page.count("<table>") == n_tables
    assert page.count('src="data:image/png;base64,') == n_images - 1
    assert 'src="data:image/jpeg;base64,' in page
    assert "picture not available" in page  # the missing file is a note, not a broken image
    assert "<script" not in page
    assert "beit tokenizer train --data MY_IMAGES" in page


def test_report_escapes_text():
    page = render_html("<t>", [Section("a<b", text="x & `<y>`", tables=[Table(["<c>"], [["<d>"]])])])
    assert "<t>" not in page.split("<body>")[1] and "&lt;t&gt;" in page
    assert "<code>&lt;y&gt;</code>" in page and "&lt;d&gt;" in page


def test_report_in_headless_chromium(synthetic_report, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium not installed (apt-get install chromium): browser rendering not checked")
    path, n_images, n_tables = synthetic_report
    shot = tmp_path / "report.png"
    found = browser_check(binary, path, tmp_path, screenshot=shot)
    assert_rendered_ok(found, n_images, n_tables)
    assert found["width"] <= 1280, "the page overflows horizontally"
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        a = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert a.std() > 10, "the screenshot is blank"
    keep = os.environ.get("BEIT_KEEP_SCREENSHOT")
    if keep:  # look at it: BEIT_KEEP_SCREENSHOT=/tmp/report.png pytest tests/viz/test_report_browser.py
        shutil.copy(shot, keep)
