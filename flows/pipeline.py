"""Prefect flow: download -> prepare -> pretrain -> finetune -> evaluate. Orchestration only.

The four DVC stages run through DVC itself (srcore.versioning.reproduce), so a stage finished by
`dvc repro` is skipped here and vice versa; Prefect adds retries, schedules, the UI and
artifacts. `python -m flows.pipeline run` is the main job; `... serve` serves a scheduled
deployment; `prefect.yaml` at the repo root deploys the same flow to a `process` work pool.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact  # noqa: E402
from prefect.deployments.runner import RunnerDeployment  # noqa: E402

from srcore import config, preflight, tracking, versioning, workspace  # noqa: E402
from srcore.cli import failure_path, run_stage  # noqa: E402
from srcore.data.download import DownloadError  # noqa: E402
from srcore.layout import write_atomic  # noqa: E402
from srcore.report import table  # noqa: E402
from srcore.workspace import WorkspaceBusy, tracking_store  # noqa: E402

DVC_STAGES = versioning.STAGES
#: The stages `force` accepts; a Literal so the Prefect UI offers them as a multi-select.
Stage = Literal["prepare", "pretrain", "finetune", "evaluate"]
assert get_args(Stage) == DVC_STAGES, "flows.pipeline.Stage must list versioning.STAGES"

#: Exceptions a later attempt can fix: the network, not the user's params or files.
TRANSIENT = (DownloadError, ConnectionError, TimeoutError)


class StageFailed(RuntimeError):
    """A pipeline stage failed; the message says which and why (shown in the Prefect UI)."""


def retry_only_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry condition: a missing folder or a bad archive fails the same way twice,
    so only network errors earn the task-level retries (the download itself already retried
    with a few seconds of backoff; these come 30 s and 2 min later, for longer outages).
    A DownloadError says whether it is one: a 404 is not, an unreachable host is."""
    return isinstance(state.data, TRANSIENT) and getattr(state.data, "transient", True)


@task(name="download datasets", retries=2, retry_delay_seconds=[30, 120],
      retry_condition_fn=retry_only_transient)
def download(params_path: str, root: str) -> None:
    """Downloads are the one stage where a retry can help (flaky network): network errors
    keep their type so the retry condition sees them; anything else names the stage."""
    try:
        run_stage("download", params_path, root)
    except TRANSIENT:
        raise
    except Exception as err:  # noqa: BLE001 - the cause stays chained in the task's log
        raise StageFailed(f"stage 'download' failed: {err}") from err


@task(name="dvc stage")
def dvc_stage(stage: str, root: str, force: bool) -> list[str]:
    """No retries: a stage fails the same way on the same inputs; DVC keeps what it had."""
    logger = get_run_logger()
    started = time.perf_counter()
    try:
        ran = versioning.reproduce(Path(root), stage, force=force)
    except versioning.StageFailed as err:
        # DVC only knows the exit status; the stage (or the guard or hash-data before
        # prepare) left its own one-line reason on disk. DVC had deleted its outputs: they
        # were checked out again (err.restored), so the last good ones stay.
        reason = failure_path(Path(root), err.stage.split("@")[0])
        why = reason.read_text().strip() if reason.is_file() else err.cause
        raise StageFailed(f"stage '{err.stage}' failed: {why}{err.restored}") from None
    seconds = time.perf_counter() - started
    if ran:
        logger.info("%s: ran in %.1f s", stage, seconds)
    else:
        logger.info("%s: up to date, skipped (%.1f s)", stage, seconds)
    return ran


def _version_lines(root: Path, ui_url: str) -> list[str]:
    """Which registered version each models/*.pt is, its registry page and the gate's verdict,
    so the run page answers "did this run change the champion?"."""
    models = tracking.model_links(["srresnet", "srgan"], ui_url)
    frame = tracking.compare(list(models))
    lines = []
    for name in ("srresnet", "srgan"):
        text, url = models[name]
        line = f"- registered [{name}]({url}): {text}"
        # models/<name>.pt holds no version number (DVC tracks it): found by its sha256 tag
        version = tracking.version_of_file(name, root / "models" / f"{name}.pt")
        if version is not None:
            rows = frame[(frame["model"] == name) & (frame["version"] == int(version))] \
                if not frame.empty else frame
            gate = rows["gate_decision"].iloc[0] if len(rows) else ""
            line += (f"; models/{name}.pt is [v{version}]({url}/versions/{version})"
                     + (f", gate: {gate}" if gate else ""))
        lines.append(line)
    return lines


@task(name="publish metrics")
def publish(root: str, parent_run_id: str, ui_url: str) -> str:
    """Prefect artifacts for the run page: the metrics table, grids and MLflow links.

    Prefect image artifacts take URLs only, so the grids are linked from the MLflow UI, where
    the evaluate stage logged them.
    """
    summary = json.loads((Path(root) / "metrics" / "evaluate.json").read_text())
    markdown = table(summary)
    tracking.log_to_run(parent_run_id, {
        f"{s}/{m}/{k}": v for s, ms in summary.items() for m, vals in ms.items()
        for k, v in vals.items()})
    runs = tracking.run_links(parent_run_id, ui_url)
    skipped = [s for s in DVC_STAGES if s not in runs]
    lines = [f"- [{stage} run]({url})" for stage, url in runs.items()]
    lines += [f"- {', '.join(skipped)}: up to date, skipped by DVC"] if skipped else []
    lines += _version_lines(Path(root), ui_url)
    if "evaluate" in runs:
        lines += [f"- [comparison grid {g.stem}]({runs['evaluate']}/artifacts/grids/{g.name})"
                  for g in sorted((Path(root) / "reports").glob("grid_*.png"))]
        lines += [f"- [perception-distortion plane {g.stem.removeprefix('perception_distortion_')}]"
                  f"({runs['evaluate']}/artifacts/grids/{g.name})"
                  for g in sorted((Path(root) / "reports").glob("perception_distortion_*.png"))]
    create_markdown_artifact(
        key="srgan-metrics",
        markdown="# Benchmark (Y channel, border crop)\n\n" + markdown
                 + "\n\n## Runs and models\n\n" + "\n".join(lines) + "\n",
        description="bicubic / SRResNet / SRGAN on every test set, with MLflow links",
    )
    create_link_artifact(key="mlflow-run", link=runs["pipeline"],
                         link_text="MLflow parent run of this pipeline execution")
    return markdown


#: What a run that finds the workspace busy says: the two ways to let it wait.
WAIT_HINT = ("let this run wait: `python -m flows.pipeline run --lock-timeout SECONDS` (a "
             "deployment's lock_timeout_s parameter)")


def workspace_lock(root: Path, timeout_s: float) -> contextlib.AbstractContextManager[None]:
    """One pipeline run per workspace (srcore.workspace): the second waits up to timeout_s,
    then stops clearly; `srgan <stage>` by hand takes the same lock, and the stages this run
    starts through DVC inherit it."""
    return workspace.workspace_lock(root, timeout_s, WAIT_HINT)


def _preflight(params: config.Params, params_path: str, root: Path,
               skip_download: bool) -> None:
    """Everything params.yaml and the registry can tell, before the first task."""
    stages = ([] if skip_download else ["download"]) + list(DVC_STAGES)
    preflight.check(params, params_path, root, stages)


@flow(name="srgan-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", root: str = ".",
             force: list[Stage] | None = None, overlay: str | None = None,
             skip_download: bool = False, lock_timeout_s: float = 0.0) -> str:
    """The whole product: every stage, each skipped by DVC when its inputs are unchanged.

    Args:
        params_path: params file, relative to root.
        root: project directory (holds dvc.yaml, data/, models/).
        force: stages to recompute even when DVC finds them up to date.
        overlay: YAML overlay (e.g. configs/paper.yaml, relative to root) merged into
            params_path before the run, so DVC sees the change; it stays merged afterwards.
        skip_download: reuse data/ as it is (no download, no `dvc add`).
        lock_timeout_s: how long to wait for another run on the same root to finish.
    """
    root_path = Path(root).resolve()
    params_file = (root_path / params_path).resolve()
    params = config.load(params_file)  # fail before any work on a bad params.yaml
    force_set = set(force or [])
    unknown = force_set - set(DVC_STAGES)
    if unknown:
        raise ValueError(f"force: unknown stage(s) {sorted(unknown)}; choose from {DVC_STAGES}")
    with workspace_lock(root_path, lock_timeout_s), tracking_store(root_path):
        if overlay:
            overlay_file = root_path / overlay
            if not overlay_file.is_file():
                raise config.ConfigError(f"overlay {overlay_file}: no such file")
            # Inside the lock: params.yaml is an input of every stage of a concurrent run.
            before = params_file.read_bytes()
            params = config.apply_overlay(params_file, overlay_file)
            try:
                _preflight(params, params_path, root_path, skip_download)
            except preflight.PreflightError:
                write_atomic(params_file, before)  # refused before any work: as it was
                raise
            print(f"applied overlay {overlay} to {params_file.name}")
        else:
            _preflight(params, params_path, root_path, skip_download)
        # DVC's "git add" hint once per run (below), not once per stage
        with tracking.pipeline_run(params.tracking.experiment) as parent_id, \
                versioning.deferred_git_hints():
            if not skip_download:
                download(str(params_file), str(root_path))
            for stage in DVC_STAGES:
                dvc_stage.with_options(name=f"dvc repro {stage}")(
                    stage, str(root_path), stage in force_set)
            markdown = publish(str(root_path), parent_id, params.tracking.ui_url)
        hint = versioning.git_hint(root_path)
    print(markdown)
    if hint:
        print(hint)
    return markdown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run the whole pipeline once")
    serve_p = sub.add_parser("serve", help="serve a scheduled deployment (needs a Prefect server)")
    for p in (run_p, serve_p):
        p.add_argument("--params", default="params.yaml")
        p.add_argument("--force", nargs="*", default=[], choices=DVC_STAGES,
                       help="stages to recompute even when DVC finds them up to date")
        p.add_argument("--overlay", default=None,
                       help="YAML overlay merged into params.yaml before the run "
                            "(e.g. configs/paper.yaml)")
    run_p.add_argument("--lock-timeout", type=float, default=0.0, metavar="SECONDS",
                       help="how long to wait for another srgan run on this project to finish "
                            "(default: %(default)s, i.e. stop at once)")
    serve_p.add_argument("--cron", default="0 3 * * *", help="schedule (default: nightly 03:00)")
    serve_p.add_argument("--name", default="nightly")
    args = parser.parse_args(argv)
    if args.command == "run":
        try:
            # The lock before the flow call: Prefect's first start on a fresh PREFECT_HOME
            # creates its database, which two simultaneous runs would race on.
            root = Path.cwd()
            if not args.overlay:  # with one, the flow checks the merged params, under the lock
                _preflight(config.load(args.params), args.params, root, skip_download=False)
            with workspace_lock(root, args.lock_timeout):
                pipeline(params_path=args.params, root=".", force=args.force,
                         overlay=args.overlay, lock_timeout_s=args.lock_timeout)
        except (config.ConfigError, versioning.VersioningError, StageFailed, WorkspaceBusy,
                tracking.ForeignArtifactStore, *TRANSIENT) as err:
            print(f"srgan pipeline: error: {err}", file=sys.stderr)
            return 2
        return 0
    from prefect import serve

    # pause_on_shutdown=False: stopping this process must not pause the nightly schedule.
    serve(deployment(args.name, args.cron, args.params, str(Path.cwd()), args.force,
                     args.overlay),
          pause_on_shutdown=False)
    return 0


def deployment(name: str, cron: str, params_path: str, root: str,
               force: list[str] | None = None, overlay: str | None = None) -> RunnerDeployment:
    """The scheduled deployment; its parameters stay editable in the Prefect UI."""
    return pipeline.to_deployment(
        name=name, cron=cron,
        parameters={"params_path": params_path, "root": root, "force": force or [],
                    "overlay": overlay},
        description="Retrain and evaluate SRResNet/SRGAN; DVC skips unchanged stages.",
        tags=["srgan"],
    )


if __name__ == "__main__":
    sys.exit(main())
