"""What both training stages do around the loop: the process group, the MLflow run (the
killed run's when resuming), and the outputs that rank 0 alone writes.

Under torchrun every process trains; rank 0 alone logs and writes. Other ranks get a tracker
that does nothing: one MLflow run, one registered version, one set of files, however many
processes train. They do not even import mlflow (seconds of CPU that the training processes
share).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from srcore import config, versioning
from srcore.layout import Layout, write_json
from srcore.models.srresnet import SRResNet
from srcore.training import distributed
from srcore.training.checkpoints import file_digest, fingerprint, read_checkpoint, save_generator
from srcore.training.loop import LoopTracker


class StageTracker(LoopTracker, Protocol):
    """tracking.Tracker on rank 0, distributed.NullTracker elsewhere."""

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def log_generator(self, model: Any, name: str, register: bool,
                      tags: Mapping[str, Any] | None = None) -> str | None: ...


@dataclass
class TrainingSession:
    """One training stage in progress: this process's place in the job and its tracker."""

    stage: str
    params: config.Params
    layout: Layout
    world: distributed.World
    tracker: StageTracker
    summary: str | None = None

    def save(self, model: SRResNet, name: str, metrics: dict[str, float]) -> None:
        """models/<name>.pt, the logged (and registered) model, the final metrics in MLflow
        and metrics/<stage>.json; rank 0 only."""
        if not self.world.is_main:
            return
        params, layout, tracker = self.params, self.layout, self.tracker
        data_version = versioning.data_version(layout.root)
        save_generator(model, layout.model(name), {"data_version": data_version})
        tags = {"data_version": data_version, "mlflow_run_id": tracker.run_id,
                "global_skip": params.model.global_skip, "blocks": params.model.blocks,
                "channels": params.model.channels, "scale": params.scale}
        version = tracker.log_generator(model, name, params.tracking.register_models, tags)
        tracker.log_metrics({f"{self.stage}/final_{k}": v for k, v in metrics.items()})
        write_json(layout.metrics / f"{self.stage}.json",
                   {**{k: round(v, 6) for k, v in metrics.items()},
                    "registered_version": version})
        self.summary = (f"{self.stage}: wrote {layout.model(name)}"
                        + (f", registered {name} version {version}" if version else ""))


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
        with _stage_run(stage, params, layout, world, init) as tracker:
            tracker.log_params(config.as_flat_dict(params))
            tracker.log_params(distributed.run_params(world, batch_size))
            session = TrainingSession(stage, params, layout, world, tracker)
            yield session
        if world.is_main:
            layout.checkpoint(stage).unlink(missing_ok=True)
    if session.summary is not None:
        print(session.summary)


def _stage_run(stage: str, params: config.Params, layout: Layout, world: distributed.World,
               init: Path | None) -> contextlib.AbstractContextManager[Any]:
    """The MLflow run on rank 0 (the checkpoint's run when resuming); nothing elsewhere."""
    if not world.is_main:
        return contextlib.nullcontext(distributed.NullTracker())
    resume_id = _resume_run_id(stage, params, layout, init)
    from srcore import tracking  # rank 0 alone imports mlflow

    return tracking.stage_run(params.tracking.experiment, stage, resume_id)


def _resume_run_id(stage: str, params: config.Params, layout: Layout,
                   init: Path | None) -> str | None:
    """The run of the checkpoint the loop will resume, so that one run holds its history."""
    init_digest = file_digest(init) if init is not None else None
    ckpt = read_checkpoint(layout.checkpoint(stage), fingerprint(params, stage), init_digest)
    return ckpt["run_id"] if ckpt else None
