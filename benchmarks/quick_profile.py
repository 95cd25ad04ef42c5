"""Run the checked-in quick profile with Set5 and Set14 as extra test sets; print each set's
PSNR-Y and NIQE (validation and test sets; the test sets are reported, never tuned on).

The stages run as `srgan <stage>` processes in a scratch workspace (no DVC, a scratch SQLite
MLflow store), timed one by one, so the figures are the main job's minus Prefect and DVC:

    python benchmarks/quick_profile.py [--shared ../shared/datasets] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("download", "prepare", "pretrain", "finetune", "evaluate")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path,
                        default=Path(os.environ.get("SRGAN_SHARED_DATASETS",
                                                    REPO.parent / "shared" / "datasets")))
    parser.add_argument("--keep", type=Path, help="workspace to keep instead of a temp dir")
    args = parser.parse_args()
    shared = args.shared.resolve()
    for name in ("Set5", "Set14"):
        if not (shared / name / "HR").is_dir():
            print(f"error: {shared / name / 'HR'} not found; pass --shared", file=sys.stderr)
            return 2
    work = args.keep or Path(tempfile.mkdtemp(prefix="srgan-quick-"))
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    overlay = yaml.safe_load((REPO / "configs" / "shared-benchmarks.yaml").read_text())
    for spec in overlay["data"]["test"]:
        if isinstance(spec, dict):
            spec["url"] = str(shared / Path(spec["url"]).relative_to("../shared/datasets"))
    params["data"]["test"] = overlay["data"]["test"]
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    srgan = [sys.executable, "-m", "srcore.cli", "--params", str(work / "params.yaml"),
             "--root", str(work)]
    timings = {}
    for stage in STAGES:
        extra = ["--no-dvc"] if stage == "download" else []
        start = time.perf_counter()
        subprocess.run([*srgan, stage, *extra], env=env, cwd=work, check=True,
                       stdout=subprocess.DEVNULL if stage != "evaluate" else None)
        timings[stage] = time.perf_counter() - start
    summary = json.loads((work / "metrics" / "evaluate.json").read_text())
    print("\nstage timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())
          + f"; total {sum(timings.values()):.0f}")
    for set_name, rows in summary.items():
        cells = [f"{m} {rows[m]['psnr_y']:.2f} dB / NIQE {rows[m].get('niqe', float('nan')):.2f}"
                 for m in ("bicubic", "srresnet", "srgan")]
        print(f"{set_name}: " + ", ".join(cells))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
