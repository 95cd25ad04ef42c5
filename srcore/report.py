"""Our benchmark numbers beside the paper's Table 2, from metrics/evaluate.json.

Kept free of torch so `srgan report` answers instantly. The paper's SSIM is daala's
(srcore.metrics.ssim_daala_y), so the deltas compare like with like: PSNR-Y with PSNR-Y, daala
SSIM with daala SSIM; Wang SSIM is shown for comparison with later work, never against Table 2.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

#: Table 2 of the paper, PSNR (dB) / SSIM (daala), 4x, keyed by lower-case set name.
PAPER_TABLE2: dict[str, dict[str, tuple[float, float]]] = {
    "set5": {"bicubic": (28.43, 0.8211), "srresnet": (32.05, 0.9019), "srgan": (29.40, 0.8472)},
    "set14": {"bicubic": (25.99, 0.7486), "srresnet": (28.49, 0.8184), "srgan": (26.02, 0.7397)},
    "bsd100": {"bicubic": (25.94, 0.6935), "srresnet": (27.58, 0.7620), "srgan": (25.16, 0.6688)},
}

Summary = dict[str, dict[str, dict[str, float]]]

#: Column heading of each metric key; each SSIM says which SSIM it is.
HEADINGS = {
    "psnr_y": "PSNR-Y (dB)",
    "ssim_y": "SSIM-Y (Wang)",
    "ssim_daala_y": "SSIM-Y (daala)",
    "lpips": "LPIPS (alex)",
}


def paper_row(set_name: str, method: str) -> tuple[float, float] | None:
    """Table 2's (PSNR, daala SSIM) for a set and method; set names match case-insensitively."""
    return PAPER_TABLE2.get(set_name.lower(), {}).get(method)


def comparison_frame(summary: Summary) -> pd.DataFrame:
    """One row per (set, method): our metrics, the paper's, and ours minus the paper's."""
    metrics = [k for k in HEADINGS if any(k in m for ms in summary.values() for m in ms.values())]
    rows = []
    for set_name, methods in summary.items():
        for method, values in methods.items():
            paper = paper_row(set_name, method)
            row: dict[str, object] = {"set": set_name, "method": method}
            row.update({HEADINGS[k]: values.get(k, math.nan) for k in metrics})
            row["paper PSNR"] = paper[0] if paper else math.nan
            row["paper SSIM (daala)"] = paper[1] if paper else math.nan
            row["Δ PSNR"] = values.get("psnr_y", math.nan) - row["paper PSNR"]
            row["Δ SSIM (daala)"] = values.get("ssim_daala_y", math.nan) - row["paper SSIM (daala)"]
            rows.append(row)
    return pd.DataFrame(rows)


def _cell(column: str, value: object) -> str:
    if not isinstance(value, float):
        return str(value)
    if math.isnan(value):
        return "-"
    digits = 2 if "PSNR" in column else 4
    sign = "+" if column.startswith("Δ") else ""
    return f"{value:{sign}.{digits}f}"


def table(summary: Summary) -> str:
    """Markdown table of `comparison_frame`, '-' where the paper has no number."""
    frame = comparison_frame(summary)
    lines = ["| " + " | ".join(frame.columns) + " |",
             "|" + "---|" * len(frame.columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_cell(c, row[c]) for c in frame.columns) + " |")
    return "\n".join(lines)


def load_summary(path: Path) -> Summary:
    """Read metrics/evaluate.json; a missing file says which command makes it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run `srgan evaluate` (or `dvc repro`) first")
    return json.loads(path.read_text())


def report(metrics_path: Path) -> str:
    """What `srgan report` prints: the table plus a note on which SSIM the paper used."""
    return (table(load_summary(metrics_path)) + "\n\n"
            "PSNR and SSIM on Y (BT.601) after a border crop. The paper's SSIM is daala's "
            "(σ = 1.5·H/256); compare it with the SSIM-Y (daala) column, not with Wang's.")
