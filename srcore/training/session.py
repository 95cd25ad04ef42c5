"""What both training stages do around the loop: the process group, the MLflow run (the
killed run's when resuming), and the outputs that rank 0 alone writes.

Under torchrun every process trains; rank 0 alone logs and writes. Other ranks get a tracker
that does nothing: one MLflow run, one registered version, one set of files, however many
processes train. They do not even import mlflow (seconds of CPU that the training processes
share).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from srcore import config, versioning
from srcore.layout import Layout, write_json
from srcore.models.srresnet import SRResNet
from srcore.training import distributed, guard, runtime
from srcore.training.checkpoints import file_digest, fingerprint, read_checkpoint, save_generator
from srcore.training.loop import LoopTracker


class StageTracker(LoopTracker, Protocol):
    """tracking.Tracker on rank 0, distributed.NullTracker elsewhere."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_generator(self, model: Any, name: str, register: bool,
                      tags: Mapping[str, Any] | None = None, *, blend_base: Any = None,
                      serve_alpha: float | None = None) -> str | None: ...


@dataclass
class TrainingSession:
    """One training stage in progress: this process's place in the job and its tracker."""

    stage: str
    params: config.Params
    layout: Layout
    world: distributed.World
    tracker: StageTracker
    summary: str | None = None
    #: What runtime.precision resolved to, as `Precision.describe()` says it.
    precision_used: str = ""

    def save(self, model: SRResNet, name: str, metrics: dict[str, float], *,
             blend_base: SRResNet | None = None, serve_alpha: float | None = None) -> None:
        """models/<name>.pt, the logged (and registered) model, the final metrics in MLflow
        and metrics/<stage>.json; rank 0 only. `blend_base` and `serve_alpha` go to
        Tracker.log_generator (the SRResNet an srgan carries for alpha blends)."""
        if not self.world.is_main:
            return
        params, layout, tracker = self.params, self.layout, self.tracker
        # Nothing non-finite is written, logged or registered (the loop checked every step;
        # this is the last look, at what is about to be kept).
        iterations = getattr(params, self.stage).iterations
        guard.check_values(self.stage, iterations, metrics, params)
        guard.check_weights(self.stage, iterations, {name: model}, params)
        data_version = versioning.data_version(layout.root)
        save_generator(model, layout.model(name), {"data_version": data_version,
                                                   "precision": self.precision_used})
        # Few tags: the params (model shape included) are one JSON tag that log_generator
        # adds, and the pickled network rebuilds itself; these say what else made it.
        tags = {"data_version": data_version, "precision": self.precision_used}
        tags.update(_content_tags(layout.model(name), tracker))
        version = tracker.log_generator(model, name, params.tracking.register_models, tags,
                                        blend_base=blend_base, serve_alpha=serve_alpha)
        tracker.log_metrics({f"{self.stage}/final_{k}": v for k, v in metrics.items()})
        # DVC tracks this file: only numbers the same run gives again (no timings, no loss
        # averages over a log_every window, no registry version); the rest is in MLflow.
        write_json(layout.metrics / f"{self.stage}.json",
                   {k: round(v, 6) for k, v in metrics.items()
                    if k.startswith("val_") or k == "iterations"})
        self.summary = (f"{self.stage}: wrote {layout.model(name)}"
                        + (f", registered {name} version {version}" if version else ""))


def _content_tags(weights: Path, tracker: StageTracker) -> dict[str, str]:
    """Version tags that tie the registry to DVC: the weights file's sha256 (how
    models/<name>.pt finds its version, tracking.version_of_file) and, under `dvc exp run`,
    the experiment's name (also set on the run)."""
    from srcore import tracking
    from srcore.data.manifest import sha256_file

    tags = {tracking.FILE_TAG: sha256_file(weights)}
    experiment = versioning.experiment_name()
    if experiment:
        tags[tracking.EXPERIMENT_TAG] = experiment
        tracker.set_tags({tracking.EXPERIMENT_TAG: experiment})
    return tags


@contextlib.contextmanager
def training_session(stage: str, params: config.Params, layout: Layout,
                     init: Path | None = None) -> Iterator[TrainingSession]:
    """Join the process group, open the stage's MLflow run, log the params; on success
    delete the stage's checkpoint and print what was written.

    `init`: the weights the stage starts from (fine-tuning's SRResNet); a checkpoint of a run
    that started from other weights is not resumed.
    """
    batch_size = getattr(params, stage).batch_size
    with distributed.session(params.runtime) as world:
        distributed.split_batch(f"{stage}.batch_size", batch_size, world)
        used = runtime.precision(params, runtime.resolve_device(params.runtime.device))
        if world.is_main:  # said once per stage: the same params give other numbers in fp32
            print(f"{stage}: precision {used.describe()}", file=sys.stderr, flush=True)
        with _stage_run(stage, params, layout, world, init, used.name) as tracker:
            tracker.log_params(config.as_flat_dict(params))
            tracker.log_params(distributed.run_params(world, batch_size))
            tracker.log_params({"runtime.precision_used": used.describe()})
            session = TrainingSession(stage, params, layout, world, tracker,
                                      precision_used=used.describe())
            yield session
        if world.is_main:
            layout.checkpoint(stage).unlink(missing_ok=True)
    if session.summary is not None:
        print(session.summary)


def _stage_run(stage: str, params: config.Params, layout: Layout, world: distributed.World,
               init: Path | None, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The MLflow run on rank 0 (the checkpoint's run when resuming); nothing elsewhere."""
    if not world.is_main:
        return contextlib.nullcontext(distributed.NullTracker())
    resume_id = _resume_run_id(stage, params, layout, init, precision)
    from srcore import tracking  # rank 0 alone imports mlflow

    return tracking.stage_run(params.tracking.experiment, stage, resume_id)


def _resume_run_id(stage: str, params: config.Params, layout: Layout,
                   init: Path | None, precision: str) -> str | None:
    """The run of the checkpoint the loop will resume, so that one run holds its history.
    Read quietly: the loop reads it again and says once why it is not resumed."""
    init_digest = file_digest(init) if init is not None else None
    ckpt = read_checkpoint(layout.checkpoint(stage), fingerprint(params, stage, layout.prepared),
                           init_digest, precision, say=False)
    return ckpt["run_id"] if ckpt else None
