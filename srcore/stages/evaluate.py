"""`srgan evaluate`: bicubic, SRResNet, their blends and SRGAN on every validation and test set.

Writes metrics/evaluate.json (PSNR-Y, Wang and daala SSIM-Y and NIQE per set and method, NIQE
of HR), plots/evaluate.csv (per image), plots/perception_distortion.csv and
reports/{grid,perception_distortion}_<set>.png, tags the registered versions that made
models/*.pt with their numbers and runs the @champion/@challenger gate on data.val: SRResNet
by PSNR-Y, SRGAN by tracking.gate_metric_srgan (NIQE by default) within
tracking.gate_psnr_budget_db of the SRResNet champion, both above bicubic.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from srcore import evaluate, tracking
from srcore.config import Params
from srcore.layout import Layout
from srcore.training.checkpoints import load_generator_file


def run(params: Params, layout: Layout) -> None:
    """Benchmark both generators, log the numbers, then gate the registered versions."""
    # 1. params: data.val/test, evaluate, tracking.gate_set (a bad one fails before any work)
    gate_set = evaluate.gate_set(params)
    # 2. inputs: models/{srresnet,srgan}.pt, prepared/<val and test sets>,
    #    metrics/{pretrain,finetune}.json (the registered versions, read by the gate)
    generators = {name: load_generator_file(layout.model(name))
                  for name in ("srresnet", "srgan")}
    with tracking.stage_run(params.tracking.experiment, "evaluate") as tracker:
        # 3. work + 4. outputs: metrics/evaluate.json, plots/evaluate.csv, reports/grid_*.png
        summary, grids = evaluate.evaluate(
            params, layout.prepared, generators, layout.metrics / "evaluate.json",
            layout.plots / "evaluate.csv", layout.reports)
        # 4. outputs: the numbers, grids and CSV in MLflow; the registry's tags and aliases
        flat = {f"{s}/{m}/{k}": v for s, ms in summary.items()
                for m, vals in ms.items() for k, v in vals.items()}
        tracker.log_metrics(flat)
        for grid in grids:
            tracker.log_artifact(grid, "grids")
        tracker.log_artifact(layout.plots / "evaluate.csv")
        tracker.log_artifact(layout.plots / "perception_distortion.csv")
        decisions = registry_gate(params, layout, summary, gate_set)
        tracker.set_tags({f"gate.{d.name}": f"v{d.version} {d.decision}" for d in decisions})
    print(evaluate.table(summary))
    for decision in decisions:
        print(decision)


def registry_gate(params: Params, layout: Layout, summary: dict[str, Any],
                  gate_set: str) -> list[Any]:
    """Tag the versions that made models/*.pt with their numbers, then run the promotion gate.

    The version numbers come from metrics/{pretrain,finetune}.json, written with the weights.
    A version this registry does not know (another MLFLOW_TRACKING_URI, a deleted mlflow.db)
    is reported and skipped: the benchmark itself stands and the stage does not fail.
    """
    decisions = []
    for stage, name in (("pretrain", "srresnet"), ("finetune", "srgan")):
        path = layout.metrics / f"{stage}.json"
        version = json.loads(path.read_text()).get("registered_version") if path.is_file() \
            else None
        if version is None:
            continue
        metric = "psnr_y" if name == "srresnet" else params.tracking.gate_metric_srgan
        budget = params.tracking.gate_psnr_budget_db if name == "srgan" else None
        bicubic = summary.get(gate_set, {}).get("bicubic", {}).get("psnr_y")
        try:
            tracking.tag_metrics(name, str(version), {
                s: methods[name] for s, methods in summary.items() if name in methods})
            decisions.append(tracking.gate(name, str(version), gate_set, metric,
                                           bicubic_psnr=bicubic, psnr_budget_db=budget))
        except tracking.RegistryError as err:
            print(f"registry gate: skipped {name}: {err}", file=sys.stderr)
    return decisions
