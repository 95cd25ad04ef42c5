"""`srgan evaluate`: bicubic, SRResNet, their blends and SRGAN on every validation and test set.

Writes metrics/evaluate.json (PSNR-Y, Wang and daala SSIM-Y and NIQE per set and method, NIQE
of HR), plots/evaluate.csv (per image), plots/perception_distortion.csv and
reports/{grid,perception_distortion}_<set>.png, tags the registered versions that made
models/*.pt with their numbers and runs the @champion/@challenger gate on data.val: SRResNet
by PSNR-Y, SRGAN by tracking.gate_metric_srgan (NIQE by default) within
tracking.gate_psnr_budget_db of the SRResNet champion, both above bicubic.

When ratings/ holds scores of `srgan rate` (the blind MOS test), its end computes the mean
opinion scores (srcore.rating.mos), logs them to the run (<set>/<method>/mos, mos_ci_low,
mos_ci_high, mos_ratings, mos_raters) and tags the rated versions, so that SRGAN's gate judges
by MOS when every compared version has tracking.gate_min_ratings ratings on the gate set.
Ratings are no DVC dependency of this stage (ratings/ may not exist; people add to it
between runs): after new ratings, `srgan mos` tags the versions without re-running it.
"""

from __future__ import annotations

import sys
from typing import Any

from srcore import evaluate, tracking
from srcore.config import Params
from srcore.data.datasets import verify_prepared
from srcore.layout import Layout, write_json
from srcore.training import runtime
from srcore.training.checkpoints import load_generator_file

#: params.yaml keys whose values change this stage's result (dvc.yaml's params): the gate's
#: rule is part of it (its decisions are recorded in the registry).
PARAMS = (
    "scale", "data.val", "data.test",
    "evaluate.crop_border", "evaluate.tile", "evaluate.tile_overlap", "evaluate.grid_images",
    "evaluate.alphas", "runtime.device", "runtime.precision", "runtime.channels_last",
    "tracking.gate_set", "tracking.gate_metric_srgan", "tracking.gate_psnr_budget_db",
    "tracking.gate_min_ratings",
)


def run(params: Params, layout: Layout) -> None:
    """Benchmark both generators, log the numbers, then gate the registered versions."""
    # 1. params: data.val/test, evaluate, tracking.gate_set (a bad one fails before any work)
    gate_set = evaluate.gate_set(params)
    # 2. inputs: models/{srresnet,srgan}.pt, prepared/<val and test sets> (checked against
    #    their manifests first)
    verify_prepared(layout.prepared, params.data, ("val", "test"))
    generators = {name: load_generator_file(layout.model(name))
                  for name in ("srresnet", "srgan")}
    chosen = runtime.precision(params, runtime.resolve_device(params.runtime.device))
    print(f"evaluate: {chosen.describe()}", file=sys.stderr)
    with tracking.stage_run(params.tracking.experiment, "evaluate") as tracker:
        tracker.log_params({"runtime.precision_used": chosen.describe()})
        # 3. work + 4. outputs: metrics/evaluate.json, plots/evaluate.csv, reports/grid_*.png
        summary, grids = evaluate.evaluate(
            params, layout.prepared, generators, layout.metrics / "evaluate.json",
            layout.plots / "evaluate.csv", layout.reports, chosen, verified=True)
        # 4. outputs: metrics/val.json (what `dvc metrics show` prints), the numbers,
        #    grids and CSV in MLflow; the registry's tags and aliases
        write_json(layout.metrics / "val.json", headline(summary, gate_set))
        flat = {f"{s}/{m}/{k}": v for s, ms in summary.items()
                for m, vals in ms.items() for k, v in vals.items()}
        tracker.log_metrics(flat)
        for grid in grids:
            tracker.log_artifact(grid, "grids")
        tracker.log_artifact(layout.plots / "evaluate.csv")
        tracker.log_artifact(layout.plots / "perception_distortion.csv")
        mos_table = log_mos(layout, tracker)
        decisions = registry_gate(params, layout, summary, gate_set)
        tracker.set_tags({f"gate.{d.name}": f"v{d.version} {d.decision}" for d in decisions})
    print(evaluate.table(summary))
    if mos_table:
        print(f"\nMean opinion score (ratings/, `srgan mos`):\n\n{mos_table}")
    for decision in decisions:
        print(decision)


def headline(summary: dict[str, Any], gate_set: str) -> dict[str, Any]:
    """The numbers a person compares runs by, on the gate's validation set: PSNR-Y of
    bicubic, SRResNet and SRGAN and their NIQE (`dvc metrics show` fits in 100 columns; the
    full per-set summary stays in metrics/evaluate.json)."""
    scores = summary.get(gate_set, {})
    wanted = {"psnr": ("psnr_y", ("bicubic", "srresnet", "srgan")),
              "niqe": ("niqe", ("srresnet", "srgan"))}
    return {short: {m: scores[m][key] for m in methods if key in scores.get(m, {})}
            for short, (key, methods) in wanted.items()}


def log_mos(layout: Layout, tracker: Any) -> str | None:
    """MOS from ratings/ when there are scores: logged to the run (finite values only) and
    tagged on the rated registered versions; returns the table, None without ratings."""
    from srcore.rating import mos

    found = mos.compute(layout.root)
    if found is None:
        return None
    summary, agreement, methods = found
    tracker.log_metrics({f"{s}/{m}/{k}": v for s, ms in mos.as_metrics(summary).items()
                         for m, vals in ms.items() for k, v in vals.items()})
    tracking.tag_mos(mos.versions_of(summary, methods))
    return mos.table(summary, agreement)


def registry_gate(params: Params, layout: Layout, summary: dict[str, Any],
                  gate_set: str) -> list[Any]:
    """Tag the versions that made models/*.pt with their numbers, then run the promotion gate.

    Each version is found by the sha256 of models/<name>.pt, which training tags it with.
    A version this registry does not know (another MLFLOW_TRACKING_URI, a deleted mlflow.db)
    is reported and skipped: the benchmark itself stands and the stage does not fail.
    """
    decisions = []
    for name in ("srresnet", "srgan"):
        # models/<name>.pt holds no version number (DVC tracks it): found by its sha256 tag
        version = tracking.version_of_file(name, layout.model(name))
        if version is None:
            if params.tracking.register_models:
                print(f"registry gate: skipped {name}: {layout.model(name)} is no version "
                      f"registered in {tracking.tracking_uri()}", file=sys.stderr)
            continue
        metric = "psnr_y" if name == "srresnet" else params.tracking.gate_metric_srgan
        budget = params.tracking.gate_psnr_budget_db if name == "srgan" else None
        bicubic = summary.get(gate_set, {}).get("bicubic", {}).get("psnr_y")
        try:
            tracking.tag_metrics(name, str(version), {
                s: methods[name] for s, methods in summary.items() if name in methods})
            decisions.append(tracking.gate(
                name, str(version), gate_set, metric, bicubic_psnr=bicubic,
                psnr_budget_db=budget,
                min_ratings=params.tracking.gate_min_ratings if name == "srgan" else None))
        except tracking.RegistryError as err:
            print(f"registry gate: skipped {name}: {err}", file=sys.stderr)
    return decisions
