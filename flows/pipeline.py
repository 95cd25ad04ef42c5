"""Prefect flow: download -> prepare -> pretrain -> finetune -> evaluate. Orchestration only.

The four DVC stages run through DVC itself (srcore.versioning.reproduce), so a stage finished by
`dvc repro` is skipped here and vice versa; Prefect adds retries, schedules, the UI and
artifacts. `python -m flows.pipeline run` is the main job; `... serve` registers a deployment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from filelock import FileLock, Timeout  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact  # noqa: E402
from prefect.deployments.runner import RunnerDeployment  # noqa: E402

from srcore import config, tracking, versioning  # noqa: E402
from srcore.cli import failure_path, run_stage  # noqa: E402
from srcore.evaluate import table  # noqa: E402

DVC_STAGES = versioning.STAGES


class StageFailed(RuntimeError):
    """A pipeline stage failed; the message says which and why (shown in the Prefect UI)."""


@task(name="download datasets", retries=2, retry_delay_seconds=10)
def download(params_path: str, root: str) -> None:
    """Downloads are the one stage where a retry can help (flaky network)."""
    run_stage("download", params_path, root)


@task(name="dvc stage")
def dvc_stage(stage: str, root: str, force: bool) -> list[str]:
    logger = get_run_logger()
    started = time.perf_counter()
    try:
        ran = versioning.reproduce(Path(root), stage, force=force)
    except versioning.VersioningError as err:
        # DVC only knows the exit status; the stage left its own one-line reason on disk.
        reason = failure_path(Path(root), stage)
        why = reason.read_text().strip() if reason.is_file() else str(err)
        guard = failure_path(Path(root), versioning.GUARD_STAGE)
        if stage == "prepare" and guard.is_file():
            why = guard.read_text().strip()
        raise StageFailed(f"stage '{stage}' failed: {why}") from None
    seconds = time.perf_counter() - started
    if ran:
        logger.info("%s: ran in %.1f s", stage, seconds)
    else:
        logger.info("%s: up to date, skipped (%.1f s)", stage, seconds)
    return ran


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
    models = tracking.model_links(["srresnet", "srgan"], ui_url)
    skipped = [s for s in DVC_STAGES if s not in runs]
    lines = [f"- [{stage} run]({url})" for stage, url in runs.items()]
    lines += [f"- {', '.join(skipped)}: up to date, skipped by DVC"] if skipped else []
    lines += [f"- registered [{name}]({url}): {text}" for name, (text, url) in models.items()]
    if "evaluate" in runs:
        lines += [f"- [comparison grid {g.stem}]({runs['evaluate']}/artifacts/grids/{g.name})"
                  for g in sorted((Path(root) / "reports").glob("grid_*.png"))]
    create_markdown_artifact(
        key="srgan-metrics",
        markdown="# Benchmark (Y channel, border crop)\n\n" + markdown
                 + "\n\n## Runs and models\n\n" + "\n".join(lines) + "\n",
        description="bicubic / SRResNet / SRGAN on every test set, with MLflow links",
    )
    create_link_artifact(key="mlflow-run", link=runs["pipeline"],
                         link_text="MLflow parent run of this pipeline execution")
    return markdown


class WorkspaceBusy(RuntimeError):
    """Another pipeline run holds the workspace; the message says which lock file."""


@contextlib.contextmanager
def workspace_lock(root: Path, timeout_s: float) -> Iterator[None]:
    """One pipeline run per workspace: two runs writing data/, prepared/ and models/ at once
    would corrupt each other. The second waits up to timeout_s, then stops clearly."""
    lock_path = root / ".srgan.lock"
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise WorkspaceBusy(
            f"another srgan pipeline run is using {root} (lock {lock_path}); wait for it to "
            "finish, or pass lock_timeout_s to wait"
        ) from None
    try:
        yield
    finally:
        lock.release()


@flow(name="srgan-pipeline", log_prints=True)
def pipeline(params_path: str = "params.yaml", root: str = ".",
             force: list[str] | None = None, skip_download: bool = False,
             lock_timeout_s: float = 0.0) -> str:
    """The whole product: every stage, each skipped by DVC when its inputs are unchanged."""
    root = str(Path(root).resolve())
    params_path = str((Path(root) / params_path).resolve())
    params = config.load(params_path)  # fail before any work on a bad params.yaml
    force_set = set(force or [])
    unknown = force_set - set(DVC_STAGES)
    if unknown:
        raise ValueError(f"force: unknown stage(s) {sorted(unknown)}; choose from {DVC_STAGES}")
    with workspace_lock(Path(root), lock_timeout_s), \
            tracking.pipeline_run(params.tracking.experiment) as parent_id:
        if not skip_download:
            download(params_path, root)
        for stage in DVC_STAGES:
            dvc_stage.with_options(name=f"dvc repro {stage}")(stage, root, stage in force_set)
        markdown = publish(root, parent_id, params.tracking.ui_url)
    print(markdown)
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
    serve_p.add_argument("--cron", default="0 3 * * *", help="schedule (default: nightly 03:00)")
    serve_p.add_argument("--name", default="nightly")
    args = parser.parse_args(argv)
    if args.command == "run":
        try:
            pipeline(params_path=args.params, root=".", force=args.force)
        except (config.ConfigError, versioning.VersioningError, StageFailed,
                WorkspaceBusy) as err:
            print(f"srgan pipeline: error: {err}", file=sys.stderr)
            return 2
        return 0
    from prefect import serve

    # pause_on_shutdown=False: stopping this process must not pause the nightly schedule.
    serve(deployment(args.name, args.cron, args.params, str(Path.cwd()), args.force),
          pause_on_shutdown=False)
    return 0


def deployment(name: str, cron: str, params_path: str, root: str,
               force: list[str] | None = None) -> RunnerDeployment:
    """The scheduled deployment; its parameters stay editable in the Prefect UI."""
    return pipeline.to_deployment(
        name=name, cron=cron,
        parameters={"params_path": params_path, "root": root, "force": force or []},
        description="Retrain and evaluate SRResNet/SRGAN; DVC skips unchanged stages.",
        tags=["srgan"],
    )


if __name__ == "__main__":
    sys.exit(main())
