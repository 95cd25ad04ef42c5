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

from srcore.stages import UserError  # noqa: E402
from srcore.workspace import scoped_env  # noqa: E402

PARENT_ENV = "SRGAN_PARENT_RUN_ID"
DEFAULT_URI = "sqlite:///mlflow.db"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set (a server, another store), else the local SQLite store:
    the project's own, also when `dvc exp run --queue` runs a stage in a temporary copy of
    the project (DVC then points DVC_ROOT at the project)."""
    if "MLFLOW_TRACKING_URI" in os.environ:
        return os.environ["MLFLOW_TRACKING_URI"]
    from srcore.versioning import project_root

    project = project_root(Path.cwd())
    return DEFAULT_URI if project == Path.cwd().resolve() else f"sqlite:///{project / 'mlflow.db'}"


def local_store_missing() -> bool:
    """The default local store is meant but ./mlflow.db is not there: asking MLflow would
    create an empty store instead of finding the project's."""
    return tracking_uri() == DEFAULT_URI and not Path("mlflow.db").is_file()


class ForeignArtifactStore(UserError):
    """A local store whose experiment keeps its artifacts outside the store's folder: an
    mlflow.db copied from another workspace (MLflow records absolute artifact paths)."""


def local_store_dir(uri: str) -> Path | None:
    """The folder of a local SQLite store (`sqlite:///<path>`), None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path).expanduser().resolve().parent


def _local_path(location: str) -> Path | None:
    """An artifact location as a local path (plain or file:), None for s3:, http: etc."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(location) if parsed.scheme == "" else None


def configure(experiment: str) -> str:
    """Point MLflow at the store and experiment; returns the experiment id.

    A local SQLite store keeps its artifacts beside it (<store folder>/mlruns/...), wherever
    the working directory is: MLflow's default is ./mlruns of the process that first creates
    the experiment, and it records that absolute path for good. An experiment whose
    artifacts lie outside the store's folder means a store copied from another workspace,
    which would write into the original's mlruns/: refused, saying how to go on.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    store = local_store_dir(uri)
    if store is not None and MlflowClient().get_experiment_by_name(experiment) is None:
        folder = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment)
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # made meanwhile: fine
            MlflowClient().create_experiment(experiment, str(store / "mlruns" / folder))
    exp = mlflow.set_experiment(experiment)
    where = _local_path(exp.artifact_location) if store is not None else None
    if where is not None and not where.resolve().is_relative_to(store):
        raise ForeignArtifactStore(
            f"{store / 'mlflow.db'}: experiment '{experiment}' keeps its artifacts in {where}, "
            f"outside {store}; this store was copied from another workspace (MLflow records "
            "absolute artifact paths) and would write into that one's mlruns/. Move mlflow.db "
            "(and mlruns/) aside to start a fresh store here, or set MLFLOW_TRACKING_URI to "
            "the original store to log there")
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
                      tags: Mapping[str, Any] | None = None, *, blend_base: Any = None,
                      serve_alpha: float | None = None) -> str | None:
        """Log G as a pickled PyTorch model that also serves images, optionally registered.

        The default pt2 format would fix batch, height and width to the example's; the pickle
        format keeps the network fully convolutional, so `mlflow.pytorch.load_model` gives an
        nn.Module for (N,3,H,W) of any size. Its pyfunc flavor is ours (`_save_generator`):
        base64 images in, base64 PNGs out, which `mlflow models serve` exposes over HTTP.
        `blend_base`: the SRResNet G was fine-tuned from, stored beside it (data/srresnet.pt)
        so a request may ask for any point between the two (`alpha`, default `serve_alpha`);
        `mlflow.pytorch.load_model` still returns G alone. Returns the registered version.
        """
        import torch

        if blend_base is None and serve_alpha not in (None, 1.0):
            raise ValueError(f"serve_alpha {serve_alpha} needs the blend_base to blend with")
        alpha = 1.0 if serve_alpha is None else float(serve_alpha)
        if not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"serve_alpha must be in [0, 1], got {serve_alpha!r}")
        _check_finite(model, f"{name} (to be logged)")
        model = model.to("cpu", memory_format=torch.contiguous_format).eval()
        if blend_base is not None:
            _check_finite(blend_base, f"{name}'s SRResNet (to be logged)")
        with _active(self.run_id):
            info = mlflow.models.Model.log(
                artifact_path=None,  # deprecated in favour of name, but still positional
                name=name,
                flavor=SimpleNamespace(save_model=_save_generator),
                flavor_name="mlflow.pytorch",  # what mlflow.pytorch.log_model records
                pytorch_model=model,
                signature=_serving_signature(alpha if blend_base is not None else None),
                serialization_format="pickle",
                pickle_module=mlflow.pytorch.pickle_module,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "srgan-pipeline"],
                registered_model_name=name if register else None,
                srgan_blend_base=blend_base,
                srgan_serve_alpha=alpha,
            )
        version = getattr(info, "registered_model_version", None)
        if register and version is not None:
            extra = {"serve_alpha": alpha} if blend_base is not None else {}
            for k, v in {**self._provenance(), **extra, **(tags or {})}.items():
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
    tags = {"stage": "pipeline"}
    commit = _git_commit()
    if commit:
        tags["git_commit"] = commit
    with mlflow.start_run(run_name=name, tags=tags) as run, \
            scoped_env(PARENT_ENV, run.info.run_id):
        yield run.info.run_id


def log_to_run(run_id: str, metrics: Mapping[str, float]) -> None:
    """Log final metrics onto an existing run (the pipeline parent run), non-finite refused."""
    mlflow.set_tracking_uri(tracking_uri())
    Tracker(run_id).log_metrics(metrics)


def load_generator(uri: str) -> Any:
    """Load a logged generator (e.g. models:/srgan/1 or models:/srgan@champion) on the CPU;
    one whose weights are not all finite (a diverged training) is refused."""
    mlflow.set_tracking_uri(tracking_uri())
    try:
        model = mlflow.pytorch.load_model(uri, map_location="cpu")
    except mlflow.exceptions.MlflowException as err:
        raise RegistryError(f"{uri}: cannot be loaded from {tracking_uri()} ({err.message}); "
                            "see `srgan models compare`, or set MLFLOW_TRACKING_URI") from None
    _check_finite(model, uri)
    return model


def latest_version(name: str) -> str | None:
    mlflow.set_tracking_uri(tracking_uri())
    client = MlflowClient()
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    newest = max((int(v.version) for v in versions), default=None)
    return None if newest is None else str(newest)


#: Model-version tag holding the sha256 of the models/<name>.pt file a version was saved as.
#: DVC-tracked files hold no version number (they must be the same bytes on every run), so a
#: weights file finds its registered version by content (`version_of_file`).
FILE_TAG = "file_sha256"
#: Model-version (and run) tag naming the `dvc exp run` experiment that trained a version.
EXPERIMENT_TAG = "dvc_experiment"


def version_of_file(name: str, path: Path) -> str | None:
    """The newest registered version of `name` saved as the file at `path` (its FILE_TAG),
    or None: no such file, no such model, or no version with that content here."""
    if not path.is_file():
        return None
    from srcore.data.manifest import sha256_file

    return version_of_digest(name, sha256_file(path))


def version_of_digest(name: str, digest: str) -> str | None:
    """The newest registered version of `name` whose weights file has this sha256."""
    try:
        versions = _registry().search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException:
        return None
    matching = [int(v.version) for v in versions if v.tags.get(FILE_TAG) == digest]
    return str(max(matching)) if matching else None


# ------------------------------------------------------------------------------- registry
#
# Aliases, not stages (deprecated): `models:/NAME@champion` is what serving loads, and
# `@challenger` is the newest evaluated version. Every decision is a model-version tag, so the
# registry itself answers "why is this the champion?".

CHAMPION = "champion"
CHALLENGER = "challenger"
#: Gate metrics and their direction. NIQE (no-reference naturalness) is where SRGAN wins;
#: PSNR/SSIM reward blur (the paper's point), so they can only bound SRGAN, not rank it.
GATE_METRICS = ("psnr_y", "ssim_y", "ssim_daala_y", "niqe", "mos")
#: The mean opinion score (srcore.rating.mos), higher is better, and the number of ratings
#: behind it: the gate judges by MOS only when every compared version has enough of them.
MOS_METRIC, MOS_RATINGS = "mos", "mos_ratings"
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
    rule: str = ""  # the GateRule it was judged by, as recorded in the gate_rule tag
    mos_note: str = ""  # why MOS was or was not the metric (`mos_choice`), tag gate_mos

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
        rule = f" [rule: {self.rule}]" if self.rule else ""
        note = f" [{self.mos_note}]" if self.mos_note else ""
        return f"registry gate: {head} ({self.reason}){rule}{note}"


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


def tag_mos(versions: Mapping[tuple[str, str], Mapping[str, Mapping[str, float]]]) -> list[str]:
    """Tag each (model, version) with its mean opinion scores per set (metric.<set>.mos,
    mos_ci_low, mos_ci_high, mos_ratings, mos_raters), skipping non-finite values (no
    interval with one rater) and versions this registry does not know. Returns what was
    tagged, as "name vN"."""
    tagged = []
    for (name, version), by_set in versions.items():
        finite = {s: {k: v for k, v in values.items() if math.isfinite(float(v))}
                  for s, values in by_set.items()}
        try:
            tag_metrics(name, version, finite)
        except RegistryError:
            continue
        tagged.append(f"{name} v{version}")
    return tagged


def resolve_version(uri: str) -> tuple[str, str]:
    """(name, version) of models:/NAME@ALIAS or models:/NAME/VERSION, from the registry."""
    ref = uri.removeprefix("models:/")
    if ref == uri or not ref:
        raise RegistryError(f"{uri}: not a models:/NAME@ALIAS or models:/NAME/VERSION URI")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        version = aliases(name).get(alias)
        if version is None:
            raise RegistryError(f"{uri}: model '{name}' has no alias @{alias} in "
                                f"{tracking_uri()}; see `srgan models compare`")
        return name, version
    name, _, version = ref.partition("/")
    _version(_registry(), name, version)
    return name, version


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


def mos_choice(name: str, version: str, set_name: str, fallback: str,
               min_ratings: int) -> tuple[str, str]:
    """(metric, note): MOS when `version` and the current champion (if any, and not the
    version itself) each have at least `min_ratings` ratings on `set_name` (their
    metric.<set>.mos_ratings tags), else `fallback`, the note saying which and why."""
    client = _registry()
    compared = [version]
    champion = aliases(name).get(CHAMPION)
    if champion is not None and champion != str(version):
        compared.append(champion)
    key = metric_tag(set_name, MOS_RATINGS)
    short = []
    for v in compared:
        count = _float_tag(_version(client, name, v).tags, key)
        if count is None or count < min_ratings:
            short.append(f"v{v} has {0 if count is None else int(count)}")
    if not short:
        return MOS_METRIC, (f"MOS: {', '.join('v' + v for v in compared)} each have >= "
                            f"{min_ratings} ratings on {set_name}")
    return fallback, (f"MOS not used, fell back to {fallback}: {', '.join(short)} of the "
                      f"{min_ratings} ratings on {set_name} it needs "
                      "(tracking.gate_min_ratings)")


def gate(name: str, version: str, set_name: str, metric: str, *,
         bicubic_psnr: float | None = None,
         psnr_budget_db: float | None = None,
         min_ratings: int | None = None) -> GateDecision:
    """Make `version` the challenger; make it the champion only if it keeps the PSNR bounds
    of GateRule(set_name, metric, bicubic_psnr, psnr_budget_db) and beats the champion on
    `metric` in that metric's direction.

    Numbers are read from tags that `tag_metrics` wrote. With no champion yet, a version that
    keeps the bounds becomes champion. A champion without the metric's tag (measured on other
    sets) is kept: the numbers are not like for like, and `srgan models promote` is the
    explicit way out. The decision, its reason (both numbers) and the rule are recorded on the
    version as `gate_decision`, `gate_reason` and `gate_rule`.

    `min_ratings`: judge by MOS instead of `metric` when every compared version has that many
    ratings on the set (`mos_choice`); the decision line and the `gate_mos` tag say which
    metric was used and why.
    """
    if metric not in GATE_METRICS:
        raise ValueError(f"gate metric must be one of {GATE_METRICS}, got {metric!r}")
    version = str(version)
    note = ""
    if min_ratings is not None:
        metric, note = mos_choice(name, version, set_name, metric, min_ratings)
    rule = GateRule(set_name, metric, bicubic_psnr, psnr_budget_db)
    client = _registry()
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
    recorded = {"gate_decision": decision, "gate_reason": reason, "gate_rule": str(rule),
                "gate_metric": key}
    if note:
        recorded["gate_mos"] = note
    for tag, value in recorded.items():
        client.set_model_version_tag(name, version, tag, value)
    return GateDecision(name, version, decision, current or "", reason, str(rule), note)


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


def compare_text(names: Sequence[str]) -> str:
    """`srgan models compare`: the table, and which metric columns are lower-is-better."""
    frame = compare(names)
    if frame.empty:
        return f"no registered versions in {tracking_uri()}"
    text = frame.to_string(index=False)
    lower = sorted({c.rsplit(".", 1)[-1] for c in frame.columns
                    if c.rsplit(".", 1)[-1] in LOWER_IS_BETTER})
    if lower:
        text += (f"\n(lower is better: {', '.join(lower)}; higher is better: every other "
                 "metric column)")
    return text


def promote_text(name: str, version: str, reason: str) -> str:
    """`srgan models promote`: promote by hand, then say how the new champion compares with
    the old one on the metric the gate judged the old one by, in that metric's direction."""
    previous = promote(name, version, reason)
    text = f"{name} v{version} is now @{CHAMPION}" + (f" (was v{previous})" if previous else "")
    note = gate_comparison(name, version, previous) if previous else None
    return text + (f"\n{note}" if note else "")


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
# A registered srgan also carries the SRResNet it was fine-tuned from (data/srresnet.pt, our
# weights-only format) and its default alpha (the pyfunc model_config and the signature's
# `alpha` ParamSpec), so a request can choose its point on the perception-distortion curve.

#: The blend base's file inside the model's data/ folder (beside MLflow's model.pth).
BLEND_BASE_FILE = "srresnet.pt"


class NonFiniteWeights(RegistryError):
    """A generator with NaN or infinite weights: a diverged training, never served."""


def _check_finite(model: Any, what: str) -> None:
    from srcore.training.checkpoints import non_finite_keys

    bad = non_finite_keys(model.state_dict())
    if bad:
        raise NonFiniteWeights(
            f"{what}: {len(bad)} weight tensor(s) hold NaN or infinity (first: '{bad[0]}'); "
            "the training that made it diverged; use an earlier version or re-train")


def _serving_signature(alpha: float | None = None) -> Any:
    """Images in and out; params `tile`, and `alpha` (default: the registered serve_alpha)
    for a model that carries its SRResNet."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    from srcore.serving import DEFAULT_TILE, IMAGE_COLUMN

    params = [ParamSpec("tile", DataType.long, DEFAULT_TILE)]
    if alpha is not None:
        params.append(ParamSpec("alpha", DataType.double, float(alpha)))
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
        outputs=Schema([ColSpec(DataType.string, IMAGE_COLUMN)]),
        params=ParamSchema(params),
    )


def _save_generator(path: str, mlflow_model: Any, srgan_blend_base: Any = None,
                    srgan_serve_alpha: float = 1.0, **kwargs: Any) -> None:
    """mlflow.pytorch.save_model, then point the pyfunc flavor's loader at this module and
    add the blend base (its weights and spec, loaded weights-only) and the default alpha.

    Everything else (the pytorch flavor, data/model.pth, requirements) stays as MLflow wrote
    it, so `mlflow.pytorch.load_model` is unaffected.
    """
    mlflow.pytorch.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
    pyfunc = mlflow_model.flavors["python_function"]
    pyfunc["loader_module"] = __name__
    config = pyfunc.setdefault(mlflow.pyfunc.MODEL_CONFIG, {})
    # overridable at load: model_config, or MLFLOW_PYFUNC_INFERENCE_CONFIG for `models serve`
    config["precision"] = "auto"
    if srgan_blend_base is not None:
        from srcore.training.checkpoints import save_generator

        save_generator(srgan_blend_base, Path(path) / pyfunc["data"] / BLEND_BASE_FILE, {})
        config["alpha"] = float(srgan_serve_alpha)
    mlflow_model.save(os.path.join(path, "MLmodel"))


@dataclass
class ServedGenerators:
    """A logged generator as a server uses it: G, the SRResNet it carries (or None) and the
    alpha a request without one gets."""

    generator: Any
    srresnet: Any
    default_alpha: float


def load_served_generators(uri: str) -> ServedGenerators:
    """G, its SRResNet and default alpha from a logged model (models:/srgan@champion, ...), on
    the CPU; non-finite weights in either are refused, naming the model."""
    import tempfile

    mlflow.set_tracking_uri(tracking_uri())
    with tempfile.TemporaryDirectory(prefix="srgan-model-") as tmp:  # all read into memory
        try:
            # no "Downloading artifacts" bar: the CLI's stderr is for its one-line answers
            with scoped_env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
                local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        except mlflow.exceptions.MlflowException as err:
            raise RegistryError(f"{uri}: cannot be loaded from {tracking_uri()} "
                                f"({err.message}); see `srgan models compare`, or set "
                                "MLFLOW_TRACKING_URI") from None
        return _served_from_folder(Path(local), uri)


def _served_from_folder(folder: Path, what: str,
                        model_config: Mapping[str, Any] | None = None) -> ServedGenerators:
    from mlflow.models import Model

    from srcore.training.checkpoints import CheckpointMismatch, load_generator_file

    try:
        pyfunc = Model.load(str(folder / "MLmodel")).flavors.get("python_function", {})
        generator = mlflow.pytorch.load_model(str(folder), map_location="cpu")
    except (mlflow.exceptions.MlflowException, OSError) as err:
        raise RegistryError(f"{what}: not a logged generator ({err})") from None
    _check_finite(generator, what)
    config = {**(pyfunc.get(mlflow.pyfunc.MODEL_CONFIG) or {}), **(model_config or {})}
    base_path = folder / pyfunc.get("data", "data") / BLEND_BASE_FILE
    base = None
    if base_path.is_file():
        try:
            base = load_generator_file(base_path)
        except CheckpointMismatch as err:
            raise RegistryError(f"{what}: its SRResNet ({BLEND_BASE_FILE}) is unusable: "
                                f"{err}") from None
        _check_finite(base, f"{what} (its SRResNet)")
    alpha = config.get("alpha")
    return ServedGenerators(generator, base, 1.0 if alpha is None else float(alpha))


def _load_pyfunc(data_path: str, model_config: Mapping[str, Any] | None = None) -> ImageModel:
    """The pyfunc loader MLflow calls with the model's data/ folder (see `_save_generator`).

    model_config may set `device` (default: cuda when present) and `precision` (auto | bf16 |
    fp32, default auto: bf16 where the hardware runs it natively); the choice is logged once.
    """
    import torch

    from srcore.precision import resolve
    from srcore.upscale import GeneratorSet, for_inference

    config = dict(model_config or {})
    device = config.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    served = _served_from_folder(Path(data_path).parent, str(Path(data_path).parent), config)
    precision = resolve(config.get("precision") or "auto", torch.device(device))
    # channels_last, as `srgan upscale`: faster on CPU with bf16 (benchmarks/upscale.py)
    fmt = torch.channels_last
    generators = GeneratorSet(
        served.generator.to(device, memory_format=fmt),
        None if served.srresnet is None else served.srresnet.to(device, memory_format=fmt),
        source="the served model", default_alpha=served.default_alpha,
        prepare=lambda network: for_inference(network, precision, fmt))
    _log_startup(f"srgan served model: {precision.describe()} on {device}, default alpha "
                 f"{served.default_alpha:g}"
                 + ("" if served.srresnet is not None else " (no SRResNet: alpha 1 only)"))
    return ImageModel(generators, device, fmt, precision)


def _log_startup(message: str) -> None:
    """One line on stderr when a server loads the model (`mlflow models serve` shows it)."""
    import sys

    print(message, file=sys.stderr, flush=True)


class ImageModel:
    """The served generator: a column of base64 images in, a column of base64 PNGs out.

    Each image is upscaled as `srgan upscale` does with its defaults (grey stays grey, alpha is
    carried through; srcore/serving.py) at the request's `alpha` (blends cached, see
    srcore.upscale.GeneratorSet); an unusable image or parameter fails the request with 400.
    """

    def __init__(self, generators: Any, device: str, memory_format: Any = None,
                 precision: Any = None) -> None:
        self.generators, self.device = generators, device
        self.memory_format, self.precision = memory_format, precision

    @property
    def model(self) -> Any:
        """The generator at the default alpha (what `load_model(...).unwrap_python_model()`
        users reach for)."""
        return self.generators.at(None)

    def predict(self, data: Any, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        from srcore.data.images import ImageError
        from srcore.serving import IMAGE_COLUMN, request_params, upscale_base64
        from srcore.upscale import MissingSRResNet, NonFiniteOutput

        frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
        if IMAGE_COLUMN not in frame.columns:
            raise _bad_request(f"expected a column {IMAGE_COLUMN!r} of base64 images, got "
                               f"columns {list(frame.columns)}")
        try:
            alpha, tile = request_params(dict(params or {}))
            model = self.generators.at(alpha)
        except (ValueError, MissingSRResNet) as err:
            raise _bad_request(str(err)) from None
        try:
            out = [upscale_base64(model, text, f"{IMAGE_COLUMN}[{i}]", tile,
                                  device=self.device, memory_format=self.memory_format,
                                  precision=self.precision)
                   for i, text in enumerate(frame[IMAGE_COLUMN])]
        except ImageError as err:
            raise _bad_request(str(err)) from None
        except NonFiniteOutput as err:
            raise mlflow.exceptions.MlflowException(f"the served model: {err}") from None
        return pd.DataFrame({IMAGE_COLUMN: out}, index=frame.index)


def _bad_request(message: str) -> Exception:
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return mlflow.exceptions.MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
