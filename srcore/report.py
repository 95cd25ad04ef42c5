"""Our benchmark numbers as tables, and beside the paper's Table 2, from metrics/evaluate.json.

Kept free of torch so `srgan report` answers instantly. The paper's SSIM is daala's
(srcore.metrics.ssim_daala_y), so the deltas compare like with like: PSNR-Y with PSNR-Y, daala
SSIM with daala SSIM; Wang SSIM is shown for comparison with later work, never against Table 2.
The paper judged perception by mean opinion score (MOS), which no metric reproduces; NIQE is
the offline, no-reference stand-in we can compute, so the two stand side by side, not as a
difference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import pandas as pd


class PaperRow(NamedTuple):
    psnr: float
    ssim_daala: float
    mos: float


#: Table 2 of the paper, 4x: PSNR (dB) / SSIM (daala) / MOS, keyed by lower-case set name.
PAPER_TABLE2: dict[str, dict[str, PaperRow]] = {
    "set5": {"bicubic": PaperRow(28.43, 0.8211, 1.97), "srresnet": PaperRow(32.05, 0.9019, 3.37),
             "srgan": PaperRow(29.40, 0.8472, 3.58)},
    "set14": {"bicubic": PaperRow(25.99, 0.7486, 1.80),
              "srresnet": PaperRow(28.49, 0.8184, 2.98), "srgan": PaperRow(26.02, 0.7397, 3.72)},
    "bsd100": {"bicubic": PaperRow(25.94, 0.6935, 1.47),
               "srresnet": PaperRow(27.58, 0.7620, 2.29), "srgan": PaperRow(25.16, 0.6688, 3.56)},
}

#: Table 2's MOS of the two methods PAPER_TABLE2 leaves out, nearest neighbour and the
#: original HR (26 raters, as the rest of the MOS column).
PAPER_MOS_MORE: dict[str, dict[str, float]] = {
    "set5": {"nearest": 1.28, "hr": 4.32},
    "set14": {"nearest": 1.20, "hr": 4.32},
    "bsd100": {"nearest": 1.11, "hr": 4.46},
}


def paper_mos(set_name: str, method: str) -> float | None:
    """Table 2's MOS for a set and method (nearest, bicubic, srresnet, srgan, hr)."""
    row = paper_row(set_name, method)
    return row.mos if row else PAPER_MOS_MORE.get(set_name.lower(), {}).get(method)


#: Published no-reference figures for SRGAN-class models on the paper's sets, lower is better:
#: the perceptual index PI = ((10 - Ma) + NIQE) / 2 of the PIRM 2018 challenge (MATLAB, Y,
#: 4-pixel crop). PI is not NIQE (it adds Ma's score), so it stands beside our NIQE to place
#: the methods, never as a difference. Sources (README, "Perception"): SPSR's published table
#: (Ma et al., CVPR 2020, github.com/Maclory/SPSR; its SRGAN row is the tensorlayer
#: re-implementation) and EUSR-PCL's (Choi et al., Neurocomputing 2019, arXiv 1809.04789;
#: BSD100 only, SRGAN-VGG54 as Ledig et al. released it).
PUBLISHED_PI: dict[str, dict[str, tuple[float, str]]] = {
    "set5": {"bicubic": (7.3699, "SPSR"), "srgan": (3.9820, "SPSR")},
    "set14": {"bicubic": (7.0268, "SPSR"), "srgan": (3.0851, "SPSR")},
    "bsd100": {"bicubic": (6.995, "EUSR-PCL"), "srresnet": (5.217, "EUSR-PCL"),
               "srgan": (2.351, "EUSR-PCL")},
}

Summary = dict[str, dict[str, dict[str, float]]]

#: Column heading of each metric key; each SSIM says which SSIM it is, arrows give direction.
HEADINGS = {
    "psnr_y": "PSNR-Y (dB)",
    "ssim_y": "SSIM-Y (Wang)",
    "ssim_daala_y": "SSIM-Y (daala)",
    "niqe": "NIQE ↓",
    "lpips": "LPIPS (alex) ↓",
}
#: The rows of the benchmark table, in order; blends go to the perception-distortion table.
MAIN_METHODS = ("bicubic", "srresnet", "srgan", "hr")


def paper_row(set_name: str, method: str) -> PaperRow | None:
    """Table 2's row for a set and method; set names match case-insensitively."""
    return PAPER_TABLE2.get(set_name.lower(), {}).get(method)


def _cell(column: str, value: object) -> str:
    if not isinstance(value, float):
        return str(value)
    if math.isnan(value):
        return "-"
    digits = 2 if ("PSNR" in column or "NIQE" in column or "MOS" in column) else 4
    sign = "+" if column.startswith("Δ") else ""
    return f"{value:{sign}.{digits}f}"


def markdown(frame: pd.DataFrame) -> str:
    """A DataFrame as a Markdown table, '-' where there is no number."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(_cell(c, row[c]) for c in frame.columns) + " |")
    return "\n".join(lines)


def _metrics_present(summary: Summary) -> list[str]:
    return [k for k in HEADINGS if any(k in m for ms in summary.values() for m in ms.values())]


def benchmark_frame(summary: Summary) -> pd.DataFrame:
    """One row per (set, method) for bicubic, SRResNet, SRGAN and HR: every metric we have."""
    metrics = _metrics_present(summary)
    rows = []
    for set_name, methods in summary.items():
        for method in [m for m in MAIN_METHODS if m in methods]:
            row: dict[str, object] = {"set": set_name, "method": method}
            row.update({HEADINGS[k]: methods[method].get(k, math.nan) for k in metrics})
            rows.append(row)
    return pd.DataFrame(rows)


def plane_frame(summary: Summary) -> pd.DataFrame:
    """The perception-distortion curve per set: bicubic, SRResNet (alpha 0), the blends,
    SRGAN (alpha 1) and HR, each as 'PSNR-Y / NIQE'."""
    rows = []
    for set_name, methods in summary.items():
        blends = sorted((m for m in methods if m.startswith("alpha_")),
                        key=lambda m: float(m.removeprefix("alpha_")))
        order = ["bicubic", "srresnet", *blends, "srgan", "hr"]
        row: dict[str, object] = {"set": set_name}
        for method in order:
            if method not in methods:
                continue
            values = methods[method]
            psnr = f"{values['psnr_y']:.2f}" if "psnr_y" in values else "-"
            niqe = f"{values['niqe']:.2f}" if "niqe" in values else "-"
            label = {"srresnet": "SRResNet α=0", "srgan": "SRGAN α=1", "hr": "HR"}.get(
                method, method.replace("alpha_", "α="))
            row[label] = f"{psnr} / {niqe}"
        rows.append(row)
    return pd.DataFrame(rows).fillna("-")


def table(summary: Summary) -> str:
    """What `srgan evaluate` prints and the Prefect run page shows: the benchmark table, and
    the perception-distortion curve when NIQE was computed."""
    text = markdown(benchmark_frame(summary))
    if any("niqe" in v for ms in summary.values() for v in ms.values()):
        text += ("\n\nPerception-distortion curve (PSNR-Y dB / NIQE; higher PSNR = less "
                 "distortion, lower NIQE = more natural):\n\n" + markdown(plane_frame(summary)))
    return text


def comparison_frame(summary: Summary) -> pd.DataFrame:
    """Bicubic, SRResNet and SRGAN beside Table 2: ours and the paper's PSNR and daala SSIM with
    their differences, then our NIQE beside the paper's MOS (no difference: not one scale)."""
    rows = []
    for set_name, methods in summary.items():
        for method in [m for m in ("bicubic", "srresnet", "srgan") if m in methods]:
            values, paper = methods[method], paper_row(set_name, method)
            row: dict[str, object] = {"set": set_name, "method": method,
                                      "PSNR-Y (dB)": values.get("psnr_y", math.nan),
                                      "paper PSNR": paper.psnr if paper else math.nan}
            row["Δ PSNR"] = row["PSNR-Y (dB)"] - row["paper PSNR"]  # type: ignore[operator]
            row["SSIM-Y (daala)"] = values.get("ssim_daala_y", math.nan)
            row["paper SSIM (daala)"] = paper.ssim_daala if paper else math.nan
            row["Δ SSIM (daala)"] = row["SSIM-Y (daala)"] - row["paper SSIM (daala)"]  # type: ignore[operator]
            row["NIQE ↓"] = values.get("niqe", math.nan)
            row["paper MOS ↑"] = paper.mos if paper else math.nan
            published = PUBLISHED_PI.get(set_name.lower(), {}).get(method)
            row["published PI ↓"] = (f"{published[0]:.2f} ({published[1]})" if published
                                     else math.nan)
            rows.append(row)
    return pd.DataFrame(rows)


def load_summary(path: Path) -> Summary:
    """Read metrics/evaluate.json; a missing file says which command makes it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run `srgan evaluate` (or `dvc repro`) first")
    return json.loads(path.read_text())


def mos_report(ratings_root: Path) -> str | None:
    """Our mean opinion scores (ratings/, srcore.rating.mos) beside the paper's, per set and
    method; None when nobody has rated yet."""
    from srcore.rating import mos

    found = mos.compute(ratings_root)
    if found is None:
        return None
    summary, agreement, _ = found
    rows = []
    for row in summary.itertuples(index=False):
        paper = paper_mos(row.set, row.method)
        rows.append({"set": row.set, "method": row.method, "MOS ↑": row.mos,
                     "95% CI low": row.ci_low, "95% CI high": row.ci_high,
                     "raters": row.raters, "ratings": row.ratings,
                     "paper MOS ↑": math.nan if paper is None else paper})
    text = ("Mean opinion score (our raters, `srgan rate`; 95% interval clustered by rater, "
            "a t-interval, `srgan mos`) beside the paper's (26 raters):\n\n"
            + markdown(pd.DataFrame(rows)))
    if int(agreement["pairs"].iloc[-1]):
        last = agreement.iloc[-1]
        text += (f"\n\nTest-retest: {int(last['pairs'])} repeated showing(s), "
                 f"{last['exact']:.0%} scored identically, {last['within_one']:.0%} within "
                 f"one point, mean absolute difference {last['mean_abs_diff']:.2f}.")
    return text


def report(metrics_path: Path, ratings_root: Path | None = None) -> str:
    """What `srgan report` prints: ours beside Table 2, and what the columns mean; with
    `ratings_root`, our MOS beside the paper's when there are ratings."""
    mos_text = None if ratings_root is None else mos_report(ratings_root)
    summary = load_summary(metrics_path)
    text = markdown(comparison_frame(summary)) + "\n\n" + (
        "PSNR and SSIM on Y (BT.601) after a border crop. The paper's SSIM is daala's "
        "(σ = 1.5·H/256); compare it with the SSIM-Y (daala) column, not with Wang's. The "
        "paper's MOS (1-5, 26 raters) has no offline equivalent; NIQE (no-reference, lower is "
        "more natural) is our stand-in, shown beside it, not subtracted from it. 'published PI' "
        "is the PIRM perceptual index ((10 - Ma) + NIQE) / 2 that SPSR (Ma et al. 2020) and "
        "EUSR-PCL (Choi et al. 2019) report for these sets: a no-reference score on a "
        "related scale, to place the methods, not to subtract.")
    if not any(s.lower() in PAPER_TABLE2 for s in summary):
        text += ("\n\nThe paper columns are empty because none of its sets (Set5, Set14, "
                 "BSD100) was evaluated. Add them with `srgan params apply "
                 "configs/shared-benchmarks.yaml` (this workplace's copies) or "
                 "`configs/paper.yaml` (downloads them), then `dvc repro`.")
    if mos_text:
        text += "\n\n" + mos_text
    return text
