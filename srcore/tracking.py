"""The only module that talks to MLflow: runs, metrics, images, models and the registry.

Stages run in separate processes (dvc repro spawns `srgan <stage>`), so a pipeline execution is
grouped by a parent run whose id travels in the SRGAN_PARENT_RUN_ID environment variable.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

PARENT_ENV = "SRGAN_PARENT_RUN_ID"
DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (a server, another store), else the local SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def configure(experiment: str) -> str:
    """Point MLflow at the store and experiment; returns the experiment id."""
    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.set_experiment(experiment)
    return exp.experiment_id


def _git(*args: str) -> str | None:
    """stdout of a git command in the cwd, or None outside a repository / without commits."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_commit() -> str | None:
    # A repository without commits prints "HEAD" with status 128: that is no commit.
    return _git("rev-parse", "--verify", "-q", "HEAD") or None


def _git_dirty() -> bool | None:
    """Whether the code differs from the commit, when a commit id alone would mislead.

    Only code paths count: params.yaml and dvc.lock change with every experiment and are
    recorded separately (the params tags, the data version).
    """
    status = _git("status", "--porcelain", "--untracked-files=no", "--",
                  "srcore", "flows", "pyproject.toml")
    return None if status is None else bool(status)


class NonFiniteMetric(ValueError):
    """A NaN or infinite metric reached the tracker; the message names it."""


class Tracker:
    """What a stage may log; a thin facade so training code never imports mlflow."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._client = MlflowClient()

    def log_params(self, params: Mapping[str, Any]) -> None:
        existing = self._client.get_run(self.run_id).data.params
        fresh = {k: v for k, v in params.items() if k not in existing}
        if fresh:
            mlflow.log_params({k: str(v) for k, v in fresh.items()}, run_id=self.run_id)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Refuses a non-finite value instead of dropping it: a NaN loss or metric is a
        diverged run, which must stop the stage, not vanish from its history."""
        values = {k: float(v) for k, v in metrics.items()}
        bad = sorted(k for k, v in values.items() if not math.isfinite(v))
        if bad:
            raise NonFiniteMetric(f"MLflow run {self.run_id}: metric '{bad[0]}' is "
                                  f"{values[bad[0]]} (step {step}); a non-finite value is "
                                  "never logged")
        if values:
            mlflow.log_metrics(values, step=step, run_id=self.run_id)

    def log_image(self, image: np.ndarray, name: str) -> None:
        self._client.log_image(self.run_id, image, artifact_file=name)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self._client.log_artifact(self.run_id, str(path), folder)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self.run_id, k, str(v))

    def log_generator(self, model: Any, name: str, register: bool,
                      tags: Mapping[str, Any] | None = None) -> str | None:
        """Log G as a pickled PyTorch model that also serves images, optionally registered.

        The default pt2 format would fix batch, height and width to the example's; the pickle
        format keeps the network fully convolutional, so `mlflow.pytorch.load_model` gives an
        nn.Module for (N,3,H,W) of any size. Its pyfunc flavor is ours (`_save_generator`):
        base64 images in, base64 PNGs out, which `mlflow models serve` exposes over HTTP.
        Returns the registered version, if any.
        """
        import torch

        model = model.to("cpu", memory_format=torch.contiguous_format).eval()
        with _active(self.run_id):
            info = mlflow.models.Model.log(
                artifact_path=None,  # deprecated in favour of name, but still positional
                name=name,
                flavor=SimpleNamespace(save_model=_save_generator),
                flavor_name="mlflow.pytorch",  # what mlflow.pytorch.log_model records
                pytorch_model=model,
                signature=_serving_signature(),
                serialization_format="pickle",
                pickle_module=mlflow.pytorch.pickle_module,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "srgan-pipeline"],
                registered_model_name=name if register else None,
            )
        version = getattr(info, "registered_model_version", None)
        if register and version is not None:
            for k, v in {**self._provenance(), **(tags or {})}.items():
                self._client.set_model_version_tag(name, str(version), k, str(v))
        return None if version is None else str(version)

    def _provenance(self) -> dict[str, str]:
        """What made a version, readable in the registry without opening its run: the git
        commit (and whether its code was dirty) and the run's params as one JSON tag. One
        tag, not one per key: two dozen params.* tags pushed the metric and gate tags out of
        view on the registry page, and the run itself holds the params one by one."""
        run = self._client.get_run(self.run_id)
        commit = run.data.tags.get("git_commit") or _git_commit()
        out = {"git_commit": commit or "none"}
        dirty = _git_dirty() if commit else None
        if dirty is not None:
            out["git_dirty"] = str(dirty).lower()
        if run.data.params:
            out["params"] = json.dumps(dict(sorted(run.data.params.items())),
                                       separators=(",", ":"))
        return out


@contextlib.contextmanager
def _active(run_id: str) -> Iterator[None]:
    """Make run_id the active run for APIs without a run_id argument (log_model)."""
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield


@contextlib.contextmanager
def stage_run(experiment: str, stage: str, resume_run_id: str | None = None) -> Iterator[Tracker]:
    """One MLflow run per stage, nested under the pipeline's parent run when there is one.

    `resume_run_id` continues a killed stage's run, so a resumed training has one history.
    """
    configure(experiment)
    parent = os.environ.get(PARENT_ENV)
    tags = {"stage": stage}
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    nested = mlflow.active_run() is not None  # in-process under the pipeline run
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id, nested=nested)
    else:
        run = mlflow.start_run(run_name=stage, parent_run_id=parent, tags=tags, nested=nested)
    status = "FAILED"
    try:
        yield Tracker(run.info.run_id)
        status = "FINISHED"
    finally:
        # A killed process never gets here, which leaves the run RUNNING for resume to reuse.
        mlflow.end_run(status=status)


@contextlib.contextmanager
def pipeline_run(experiment: str, name: str = "pipeline") -> Iterator[str]:
    """Parent run for one pipeline execution; exports its id for the stage processes."""
    configure(experiment)
    previous = os.environ.get(PARENT_ENV)
    tags = {"stage": "pipeline"}
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    with mlflow.start_run(run_name=name, tags=tags) as run:
        os.environ[PARENT_ENV] = run.info.run_id
        try:
            yield run.info.run_id
        finally:
            if previous is None:
                os.environ.pop(PARENT_ENV, None)
            else:
                os.environ[PARENT_ENV] = previous


def log_to_run(run_id: str, metrics: Mapping[str, float]) -> None:
    """Log final metrics onto an existing run (the pipeline parent run), non-finite refused."""
    mlflow.set_tracking_uri(tracking_uri())
    Tracker(run_id).log_metrics(metrics)


def load_generator(uri: str) -> Any:
    """Load a logged generator (e.g. models:/srgan/1 or models:/srgan@champion) on the CPU."""
    mlflow.set_tracking_uri(tracking_uri())
    try:
        return mlflow.pytorch.load_model(uri, map_location="cpu")
    except mlflow.exceptions.MlflowException as err:
        raise RegistryError(f"{uri}: cannot be loaded from {tracking_uri()} ({err.message}); "
                            "see `srgan models compare`, or set MLFLOW_TRACKING_URI") from None


def latest_version(name: str) -> str | None:
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    newest = max((int(v.version) for v in versions), default=None)
    return None if newest is None else str(newest)


# ------------------------------------------------------------------------------- registry
#
# Aliases, not stages (deprecated): `models:/NAME@champion` is what serving loads, and
# `@challenger` is the newest evaluated version. Every decision is a model-version tag, so the
# registry itself answers "why is this the champion?".

CHAMPION = "champion"
CHALLENGER = "challenger"
#: Gate metrics and their direction. NIQE (no-reference naturalness) is where SRGAN wins;
#: PSNR/SSIM reward blur (the paper's point), so they can only bound SRGAN, not rank it.
GATE_METRICS = ("psnr_y", "ssim_y", "ssim_daala_y", "niqe")
#: Metrics where a smaller number is better (everywhere else: larger).
LOWER_IS_BETTER = frozenset({"niqe", "lpips"})
#: The model whose champion bounds SRGAN's distortion (tracking.gate_psnr_budget_db).
REFERENCE_MODEL = "srresnet"


class RegistryError(Exception):
    """A registry problem the user can fix (unknown model or version, missing metrics)."""


def better(metric: str, new: float, old: float) -> bool:
    """Strictly better in the metric's own direction (lower NIQE, higher PSNR)."""
    return new < old if metric in LOWER_IS_BETTER else new > old


def direction(metric: str) -> str:
    return "lower is better" if metric in LOWER_IS_BETTER else "higher is better"


@dataclass(frozen=True)
class GateDecision:
    """The outcome of `gate` for one version: promoted, the champion kept, or refused by a
    distortion bound, and why (both numbers and the rule)."""

    name: str
    version: str
    decision: str  # promoted | champion_kept | already_champion | refused
    champion: str  # the champion after the gate ("" when there is none)
    reason: str

    @property
    def promoted(self) -> bool:
        return self.decision == "promoted"

    def __str__(self) -> str:
        if self.promoted:
            head = f"{self.name} v{self.version} is now @{CHAMPION}"
        elif self.decision == "already_champion":
            head = f"{self.name} v{self.version} stays @{CHAMPION}"
        elif self.champion:
            head = (f"{self.name} v{self.version} is @{CHALLENGER}; "
                    f"@{CHAMPION} stays v{self.champion}")
        else:
            head = f"{self.name} v{self.version} is @{CHALLENGER}; there is no @{CHAMPION}"
        return f"registry gate: {head} ({self.reason})"


def metric_tag(set_name: str, metric: str) -> str:
    """Model-version tag holding a benchmark number, e.g. metric.set14.psnr_y."""
    return f"metric.{set_name}.{metric}"


def _registry() -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient()


def _version(client: MlflowClient, name: str, version: str) -> Any:
    try:
        return client.get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException:
        raise RegistryError(f"model '{name}' has no version {version} in the registry at "
                            f"{tracking_uri()}; see `srgan models compare {name}`") from None


def aliases(name: str) -> dict[str, str]:
    """alias -> version of a registered model ({} when it is not registered)."""
    try:
        model = _registry().get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        return {}
    return {alias: str(version) for alias, version in model.aliases.items()}


def tag_metrics(name: str, version: str, metrics: Mapping[str, Mapping[str, float]]) -> None:
    """Tag a version with its benchmark numbers, metrics[set][metric] -> metric.<set>.<metric>.

    A non-finite number is refused: it would make every later comparison meaningless.
    """
    client = _registry()
    _version(client, name, version)
    for set_name, values in metrics.items():
        for metric, value in values.items():
            if not math.isfinite(float(value)):
                raise RegistryError(f"{name} v{version}: {metric_tag(set_name, metric)} is "
                                    f"{value}; a non-finite metric is never registered")
            client.set_model_version_tag(name, str(version), metric_tag(set_name, metric),
                                         str(round(float(value), 4)))


@dataclass(frozen=True)
class GateRule:
    """What a version must show on a validation set to become champion.

    `metric` ranks it against the champion in its own direction. Two bounds keep a perceptual
    ranking honest: PSNR-Y above bicubic's (`bicubic_psnr`), and, with `psnr_budget_db`, PSNR-Y
    no more than that below the current REFERENCE_MODEL champion's on the same set.
    """

    set_name: str
    metric: str
    bicubic_psnr: float | None = None
    psnr_budget_db: float | None = None

    def __str__(self) -> str:
        parts = [f"{metric_tag(self.set_name, self.metric)} ({direction(self.metric)})"]
        if self.bicubic_psnr is not None:
            parts.append(f"psnr_y above bicubic's {self.bicubic_psnr:.2f}")
        if self.psnr_budget_db is not None:
            parts.append(f"psnr_y within {self.psnr_budget_db:g} dB of @{CHAMPION} "
                         f"{REFERENCE_MODEL}")
        return "; ".join(parts)


def _float_tag(tags: Mapping[str, str], key: str) -> float | None:
    return float(tags[key]) if key in tags else None


def _distortion_bounds(client: MlflowClient, name: str, tags: Mapping[str, str],
                       rule: GateRule) -> str | None:
    """Why the version breaks a PSNR bound of `rule`, or None when it keeps them all."""
    if rule.bicubic_psnr is None and rule.psnr_budget_db is None:
        return None
    key = metric_tag(rule.set_name, "psnr_y")
    psnr = _float_tag(tags, key)
    if psnr is None:
        return f"it has no {key} tag to check the PSNR bounds with; run `srgan evaluate`"
    if rule.bicubic_psnr is not None and not psnr > rule.bicubic_psnr:
        return f"{key} {psnr:.2f} is not above bicubic's {rule.bicubic_psnr:.2f}"
    if rule.psnr_budget_db is None or name == REFERENCE_MODEL:
        return None
    reference = aliases(REFERENCE_MODEL).get(CHAMPION)
    ref_psnr = None if reference is None else _float_tag(
        _version(client, REFERENCE_MODEL, reference).tags, key)
    if ref_psnr is None:
        return (f"no @{CHAMPION} {REFERENCE_MODEL} with a {key} tag to measure the "
                f"{rule.psnr_budget_db:g} dB PSNR budget against")
    if psnr < ref_psnr - rule.psnr_budget_db:
        return (f"{key} {psnr:.2f} is more than {rule.psnr_budget_db:g} dB below "
                f"{REFERENCE_MODEL} v{reference}'s {ref_psnr:.2f}")
    return None


def gate(name: str, version: str, set_name: str, metric: str, *,
         bicubic_psnr: float | None = None,
         psnr_budget_db: float | None = None) -> GateDecision:
    """Make `version` the challenger; make it the champion only if it keeps the PSNR bounds
    of GateRule(set_name, metric, bicubic_psnr, psnr_budget_db) and beats the champion on
    `metric` in that metric's direction.

    Numbers are read from tags that `tag_metrics` wrote. With no champion yet, a version that
    keeps the bounds becomes champion. A champion without the metric's tag (measured on other
    sets) is kept: the numbers are not like for like, and `srgan models promote` is the
    explicit way out. The decision, its reason (both numbers) and the rule are recorded on the
    version as `gate_decision`, `gate_reason` and `gate_rule`.
    """
    if metric not in GATE_METRICS:
        raise ValueError(f"gate metric must be one of {GATE_METRICS}, got {metric!r}")
    rule = GateRule(set_name, metric, bicubic_psnr, psnr_budget_db)
    client = _registry()
    version = str(version)
    key = metric_tag(rule.set_name, rule.metric)
    tags = _version(client, name, version).tags
    new = _float_tag(tags, key)
    if new is None:
        raise RegistryError(f"{name} v{version} has no {key} tag; run `srgan evaluate` first")
    client.set_registered_model_alias(name, CHALLENGER, version)
    current = aliases(name).get(CHAMPION)
    broken = _distortion_bounds(client, name, tags, rule)
    if current == version:
        decision, reason = "already_champion", f"already @{CHAMPION}; {key} = {new:.4f}"
    elif broken is not None:
        decision, reason = "refused", f"not promoted: {broken}"
    elif current is None:
        decision, reason = "promoted", f"first champion: no @{CHAMPION} yet; {key} = {new:.4f}"
    else:
        old = _float_tag(_version(client, name, current).tags, key)
        if old is None:
            decision = "champion_kept"
            reason = (f"champion v{current} has no {key} tag, so they cannot be compared like "
                      f"for like; promote by hand with `srgan models promote {name} {version}`")
        elif better(rule.metric, new, old):
            decision = "promoted"
            reason = f"{key} {new:.4f} beats champion v{current}'s {old:.4f}"
        else:
            decision = "champion_kept"
            reason = f"{key} {new:.4f} does not beat champion v{current}'s {old:.4f}"
    if decision == "promoted":
        client.set_registered_model_alias(name, CHAMPION, version)
        current = version
    for tag, value in {"gate_decision": decision, "gate_reason": reason,
                       "gate_rule": str(rule), "gate_metric": key}.items():
        client.set_model_version_tag(name, version, tag, value)
    return GateDecision(name, version, decision, current or "", reason)


def promote(name: str, version: str, reason: str, who: str | None = None) -> str | None:
    """Manual override: make `version` the champion, recording who, why, when and over whom.

    Its `gate_decision` becomes `manual`, so the registry never shows a champion marked
    `champion_kept`. Returns the previous champion's version (None when there was none).
    """
    client = _registry()
    version = str(version)
    _version(client, name, version)
    previous = aliases(name).get(CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, version)
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for key, value in {"promoted_by": who or _user(), "promoted_reason": reason,
                       "promoted_at": when, "promoted_over": previous or "none",
                       "gate_decision": "manual",
                       "gate_reason": f"promoted by hand: {reason}"}.items():
        client.set_model_version_tag(name, version, key, value)
    return previous


def gate_comparison(name: str, version: str, other: str) -> str | None:
    """How `version` compares with `other` on the gate metric `other` was judged by, in that
    metric's direction (None when they share no such number). Shown after a manual promotion
    so that overriding the gate is a decision made knowingly."""
    client = _registry()
    theirs = _version(client, name, other).tags
    key = theirs.get("gate_metric")
    ours = _version(client, name, version).tags
    if key is None or key not in ours or key not in theirs:
        return None
    new, old = float(ours[key]), float(theirs[key])
    metric = key.rsplit(".", 1)[-1]
    verdict = ("better" if better(metric, new, old)
               else "equal" if new == old else "worse")
    return (f"{key}: v{version} {new:.4f} is {verdict} than v{other}'s {old:.4f} "
            f"({direction(metric)})")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no USER in a container
        return "unknown"


def compare(names: Sequence[str]) -> pd.DataFrame:
    """All versions of `names` side by side: aliases, creation time, data version, commit,
    gate decision, manual promoter and one column per metric tag (set.metric), newest first."""
    client = _registry()
    rows = []
    for name in names:
        try:
            versions = client.search_model_versions(f"name = '{name}'")
        except mlflow.exceptions.MlflowException:
            continue
        by_version: dict[str, list[str]] = {}
        for alias, v in aliases(name).items():
            by_version.setdefault(v, []).append(alias)
        for mv in versions:
            tags = mv.tags
            created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC)
            row: dict[str, Any] = {
                "model": name, "version": int(mv.version),
                "aliases": ",".join(sorted(by_version.get(str(mv.version), []))),
                "created (UTC)": created.strftime("%Y-%m-%d %H:%M:%S"),
                "data_version": tags.get("data_version", ""),
                "git_commit": tags.get("git_commit", "")[:10],
                "gate_decision": tags.get("gate_decision", ""),
                "promoted_by": tags.get("promoted_by", ""),  # a manual override, if any
            }
            row.update({k.removeprefix("metric."): float(v) for k, v in tags.items()
                        if k.startswith("metric.")})
            rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    fixed = [c for c in frame.columns if "." not in c]
    metric_cols = sorted(c for c in frame.columns if "." in c)
    frame = frame[fixed + metric_cols]
    return frame.sort_values(["model", "version"], ascending=[True, False], ignore_index=True)


def run_links(parent_run_id: str, ui_url: str) -> dict[str, str]:
    """Links to the MLflow UI for the pipeline run and each stage run nested under it."""
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    exp = parent.info.experiment_id
    base = ui_url.rstrip("/")
    links = {"pipeline": f"{base}/#/experiments/{exp}/runs/{parent_run_id}"}
    children = client.search_runs(
        [exp], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    for run in children:
        stage = run.data.tags.get("stage", run.info.run_name)
        links[stage] = f"{base}/#/experiments/{exp}/runs/{run.info.run_id}"
    return links


def model_links(names: Sequence[str], ui_url: str) -> dict[str, tuple[str, str]]:
    """Registered model -> (aliases as "v2 @champion, v3 @challenger", registry page URL)."""
    base = ui_url.rstrip("/")
    out: dict[str, tuple[str, str]] = {}
    for name in names:
        held = aliases(name)
        text = ", ".join(f"v{v} @{a}" for a, v in sorted(held.items())) or "no aliases"
        out[name] = (text, f"{base}/#/models/{name}")
    return out


# -------------------------------------------------------------------------------- serving
#
# A registered generator carries two flavors over one pickled nn.Module: `pytorch` (tensors, for
# code) and `python_function`, whose loader is this module (images, for `mlflow models serve`).
# The MLflow model format lets any module with `_load_pyfunc(data_path)` be the pyfunc loader;
# the server imports it from the installed srgan-pipeline package (`--env-manager local`).

def _serving_signature() -> Any:
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    from srcore.serving import DEFAULT_TILE, IMAGE_COLUMN

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
        outputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
        params=ParamSchema([ParamSpec("tile", DataType.long, DEFAULT_TILE)]),
    )


def _save_generator(path: str, mlflow_model: Any, **kwargs: Any) -> None:
    """mlflow.pytorch.save_model, then point the pyfunc flavor's loader at this module.

    Everything else (the pytorch flavor, data/model.pth, requirements) stays as MLflow wrote
    it, so `mlflow.pytorch.load_model` is unaffected.
    """
    mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
    mlflow_model.flavors["python_function"]["loader_module"] = __name__
    mlflow_model.save(os.path.join(path, "MLmodel"))


def _load_pyfunc(data_path: str, model_config: Mapping[str, Any] | None = None) -> ImageModel:
    """The pyfunc loader MLflow calls with the model's data/ folder (see `_save_generator`)."""
    import torch

    device = (model_config or {}).get("device") or ("cuda" if torch.cuda.is_available()
                                                   else "cpu")
    model = mlflow.pytorch.load_model(str(Path(data_path).parent), map_location="cpu")
    # channels_last, as `srgan upscale`: 25-35% faster on CPU (benchmarks/upscale.py)
    model = model.to(device, memory_format=torch.channels_last).eval()
    return ImageModel(model, device, torch.channels_last)


class ImageModel:
    """The served generator: a column of base64 images in, a column of base64 PNGs out.

    Each image is upscaled as `srgan upscale` does with its defaults (grey stays grey, alpha is
    carried through; srcore/serving.py); an unusable image fails the request with HTTP 400.
    """

    def __init__(self, model: Any, device: str, memory_format: Any = None) -> None:
        self.model, self.device, self.memory_format = model, device, memory_format

    def predict(self, data: Any, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        from srcore.data.images import ImageError
        from srcore.serving import DEFAULT_TILE, IMAGE_COLUMN, upscale_base64

        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
        if IMAGE_COLUMN not in frame.columns:
            raise _bad_request(f"expected a column {IMAGE_COLUMN!r} of base64 images, got "
                               f"columns {list(frame.columns)}")
        tile = int((params or {}).get("tile", DEFAULT_TILE))
        try:
            out = [upscale_base64(self.model, text, f"{IMAGE_COLUMN}[{i}]", tile,
                                  device=self.device, memory_format=self.memory_format)
                   for i, text in enumerate(frame[IMAGE_COLUMN])]
        except ImageError as err:
            raise _bad_request(str(err)) from None
        return pd.DataFrame({IMAGE_COLUMN: out}, index=frame.index)


def _bad_request(message: str) -> Exception:
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return mlflow.exceptions.MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
