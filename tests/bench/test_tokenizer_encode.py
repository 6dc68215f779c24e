"""bench/tokenizer_encode.py runs (``--dry-run``: a tiny tokenizer and BEiT step) and reports what the docs quote:
fp32 and bf16 images/s with the speed-up, the id agreement with fp32 (fp32 code head, and the whole encode in
bf16), and the step's variants with the tokenizer's share."""

from __future__ import annotations

import json

from bench import tokenizer_encode as te


def test_dry_run_reports_agreement_speed_and_the_step(tmp_path, make_image_folder, capsys):
    out = tmp_path / "tok.json"
    data = make_image_folder(classes=(), per_class=16)
    assert te.main(["--dry-run", "--threads", "1", "--data", str(data), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("machine: ") and "id agreement with fp32" in text
    doc = json.loads(out.read_text())
    (row,) = doc["rows"]
    assert row["images_per_s"]["fp32"] > 0 and row["images_per_s"]["bf16"] > 0 and row["speedup"]["bf16"] > 0
    ag = row["agreement"]["bf16"]
    assert ag["ids"] == 16 * 64 and 0 < ag["agreement"] <= 1 and 0 < ag["agreement_reduced_head"] <= 1
    step = doc["step"]
    assert set(step["images_per_s"]) == {"student_alone", "fp32_serial", "fp32_overlap", "bf16_overlap"}
    assert step["overlap_same_loss"] and not step["side_stream"]  # CPU: no side stream, the same loss
