"""The quant report over three models: the trend over kept checkpoints and the named-fix rows."""
from __future__ import annotations

import json
from pathlib import Path


def test_trend_and_named_fix_rows_come_from_the_measured_files(tmp_path: Path) -> None:
    from deploykit.report.quant_study import render

    work = tmp_path / "work"
    (work / "eval").mkdir(parents=True)
    kept = work / "train" / "qarepvgg" / "checkpoints"
    kept.mkdir(parents=True)
    (kept / "epoch-005.safetensors").write_bytes(b"")
    for name, top1 in (("qarepvgg-epoch-005-torch-fp32", 0.9), ("qarepvgg-epoch-005-onnxruntime-int8-tensor", 0.85),
                       ("qarepvgg-torch-fp32", 0.93), ("qarepvgg-fix-onnxruntime", 0.925)):
        (work / "eval" / f"{name}.json").write_text(json.dumps({"top1": top1}))
    text = render(work, tmp_path / "report.md", None)
    assert "| QARepVGG-A0 (fused) | 5 | 90.00 | 85.00 (+5.00) | not measured (-) |" in text
    assert "| QARepVGG-A0 (fused) | onnxruntime | 92.50 | +0.50 |" in text
