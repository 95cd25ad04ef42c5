"""The only module that talks to DVC: version data/, push/pull it, reproduce, restore and
check stages, and queue and read experiments."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

STAGES = ("prepare", "pretrain", "finetune", "evaluate")
#: dvc.yaml's guard stages that run before prepare (not pipeline stages of their own).
GUARD_STAGE = "check-data"
HASH_STAGE = "hash-data"
#: What DVC sets in a stage's environment under `dvc exp run` (DVC 3.67): the experiment.
EXPERIMENT_ENV = "DVC_EXP_NAME"
#: Files a DVC user commits so that a commit pins the data and every stage's result.
STATE_FILES = ("data.dvc", "dvc.lock")

#: Set by `deferred_git_hints`: DVC's "To track the changes with git, run: git add ..." is
#: then not printed by each call, and the caller says it once (`git_hint`).
_QUIET_HINTS = False


class VersioningError(RuntimeError):
    """A DVC operation failed; the message names the operation and the fix."""


class StageFailed(VersioningError):
    """A dvc.yaml stage failed: which one (e.g. prepare@train), DVC's reason and what was
    restored of its previous outputs (a note, empty when nothing was)."""

    def __init__(self, stage: str, cause: str, restored: str) -> None:
        super().__init__(f"stage '{stage}' failed: {cause}{restored}")
        self.stage, self.cause, self.restored = stage, cause, restored


def _quiet_dvc_logs() -> None:
    """DVC's loggers have their own console handlers; propagating to the root logger as well
    (Prefect gives it one) prints every DVC line twice in a flow run's terminal."""
    for name in ("dvc", "dvc_objects", "dvc_data"):
        logging.getLogger(name).propagate = False


def _repo(root: Path) -> Any:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    _quiet_dvc_logs()
    try:
        repo = Repo(str(root))
    except NotDvcRepoError:
        raise VersioningError(
            f"{root} is not a DVC repository; run `dvc init` there (the project ships one)"
        ) from None
    repo.scm_context.quiet = _QUIET_HINTS
    return repo


@contextlib.contextmanager
def deferred_git_hints() -> Iterator[None]:
    """Silence DVC's per-call "git add" hint inside (a flow runs many stages; `git_hint`
    then says it once)."""
    global _QUIET_HINTS
    previous, _QUIET_HINTS = _QUIET_HINTS, True
    try:
        yield
    finally:
        _QUIET_HINTS = previous


def git_hint(root: Path) -> str | None:
    """One line saying which of data.dvc and dvc.lock differ from the last commit (None when
    none does, or outside git): commit them to pin this data and these results."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", *STATE_FILES], cwd=root,
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    changed = [line[3:] for line in out.stdout.splitlines()] if out.returncode == 0 else []
    if not changed:
        return None
    return (f"{' and '.join(changed)} changed: commit to pin this data and these results "
            f"(git add {' '.join(changed)} && git commit)")


def experiment_name() -> str | None:
    """The `dvc exp run` experiment this process runs a stage of, else None."""
    return os.environ.get(EXPERIMENT_ENV) or None


def project_root(root: Path) -> Path:
    """The project a stage run belongs to (its MLflow store and registry): DVC_ROOT when
    `dvc exp run --queue` runs the stage in a temporary copy of the project, else `root`."""
    dvc_root = os.environ.get("DVC_ROOT")
    if dvc_root and experiment_name():
        return Path(dvc_root).resolve()
    return root.resolve()


def add_data(root: Path, data_dir: str = "data") -> None:
    """`dvc add data` -> data.dvc: one pointer for the whole raw-data folder."""
    with _repo(root) as repo:
        repo.add(str(root / data_dir))  # DVC resolves relative targets against the cwd


def add_ratings(root: Path, ratings_dir: str = "ratings") -> int | None:
    """`dvc add ratings` -> ratings.dvc, then push it to the default remote; returns the
    files pushed, None without a remote. Human ratings are data, versioned like data/.

    The caller folds the SQLite WAL into the database first (srcore.rating.store.Store.
    checkpoint) and has stopped writing, so ratings.sqlite alone holds every score; the WAL
    and shared-memory files a reader may leave are never versioned (.dvcignore)."""
    folder = root / ratings_dir
    if not folder.is_dir():
        raise VersioningError(f"{folder}: missing; nothing to version (run `srgan rate`)")
    with _repo(root) as repo:
        try:
            repo.add(str(folder))
        except Exception as err:  # noqa: BLE001 - DVC raises many types; all mean "add failed"
            raise VersioningError(f"dvc add {ratings_dir} failed: {err}") from None
    if not has_remote(root):
        return None
    return push(root, [f"{ratings_dir}.dvc"])


def _absolute(root: Path, targets: list[str] | None) -> list[str]:
    return [str(root / t) for t in (targets or ["data.dvc"])]


def has_remote(root: Path) -> bool:
    with _repo(root) as repo:
        return bool(repo.config.get("core", {}).get("remote"))


def push(root: Path, targets: list[str] | None = None) -> int:
    """Push to the default remote; returns the number of files transferred."""
    with _repo(root) as repo:
        try:
            return int(repo.push(targets=_absolute(root, targets)))
        except Exception as err:  # noqa: BLE001 - DVC raises many types; all mean "push failed"
            raise VersioningError(f"dvc push failed: {err}; check `dvc remote list`") from None


def pull(root: Path, targets: list[str] | None = None) -> None:
    with _repo(root) as repo:
        try:
            repo.pull(targets=_absolute(root, targets))
        except Exception as err:  # noqa: BLE001
            raise VersioningError(f"dvc pull failed: {err}; check `dvc remote list`") from None


def _expose_own_scripts() -> None:
    """Put this interpreter's bin/ on PATH so dvc.yaml's `srgan <stage>` resolves to our own
    install even when the virtualenv is not activated."""
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if bindir not in path.split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + path


def reproduce(root: Path, stage: str, force: bool = False) -> list[str]:
    """Run one dvc.yaml stage (and what it needs upstream) if DVC finds it changed.

    Going through DVC keeps dvc.lock true, so `dvc repro` and the Prefect flow never recompute
    what the other finished (architecture rule 1). Returns the names of stages that ran.

    DVC deletes a stage's outputs before running it (they are not `persist`, so that its run
    cache can restore them). When the stage fails, its outputs are checked out again from
    the cache as dvc.lock last recorded them: the last good models, metrics and plots stay.
    """
    if stage not in STAGES:
        raise VersioningError(f"unknown stage {stage!r}; dvc.yaml has {', '.join(STAGES)}")
    from dvc.exceptions import DvcException

    _expose_own_scripts()
    with _repo(root) as repo:
        try:
            # Upstream stages are checked too (cheap when up to date), except when forcing,
            # where DVC would force the whole upstream chain.
            ran = repo.reproduce(f"{root / 'dvc.yaml'}:{stage}", single_item=force, force=force)
        except DvcException as err:
            failed = _failed_stage(err) or stage
            raise StageFailed(failed, str(err.__cause__ or err),
                              _restore(repo, root, failed)) from None
    return [getattr(s, "addressing", str(s)) for s in ran]


def _failed_stage(err: Exception) -> str | None:
    """The stage DVC names in "failed to reproduce 'NAME'", if it does."""
    text = str(err)
    marker = "failed to reproduce '"
    if marker not in text:
        return None
    return text.split(marker, 1)[1].split("'", 1)[0]


def _restore(repo: Any, root: Path, stage: str) -> str:
    """Check out a failed stage's outputs as dvc.lock records them (the last good run's);
    returns a note for the error message (empty when there was nothing to restore). The
    guards' small files are not results: they are written again by their next run."""
    if stage in (GUARD_STAGE, HASH_STAGE):
        return ""
    try:
        stats = repo.checkout(targets=[f"{root / 'dvc.yaml'}:{stage}"], force=True)
    except Exception as err:  # noqa: BLE001 - restoring is best effort; the failure stands
        return f" (its previous outputs could not be restored: {err})"
    restored = [p for kind in ("added", "modified") for p in stats.get(kind, [])]
    return f"; restored its previous outputs ({', '.join(restored)})" if restored else ""


def checkout(root: Path, targets: Sequence[str] | None = None) -> dict[str, list[str]]:
    """`dvc checkout` of stages or paths (all when None): outputs as dvc.lock records them."""
    with _repo(root) as repo:
        try:
            return dict(repo.checkout(targets=list(targets) if targets else None, force=True))
        except Exception as err:  # noqa: BLE001
            raise VersioningError(f"dvc checkout failed: {err}; run `dvc pull` or "
                                  "`dvc repro`") from None


def status(root: Path) -> dict[str, Any]:
    """`dvc status` as a dict by stage name (or .dvc file relative to root), whatever the
    working directory; empty means everything is up to date."""
    with _repo(root) as repo:
        found = dict(repo.status())
    out = {}
    for key, value in found.items():
        path, _, stage = key.rpartition(":")
        if path.endswith("dvc.yaml") and stage:
            out[stage] = value
        else:
            out[os.path.relpath(os.path.abspath(key), root)] = value
    return out


def data_version(root: Path) -> str | None:
    """The md5 that data.dvc records for data/: which data a model was trained on."""
    import yaml

    pointer = root / "data.dvc"
    if not pointer.is_file():
        return None
    outs = (yaml.safe_load(pointer.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


# ----------------------------------------------------------------------------- experiments


def queue_experiment(root: Path, name: str, params: dict[str, Any]) -> None:
    """`dvc exp run --queue -n NAME -S key=value ...`: one variant of params.yaml, queued."""
    overrides = [f"{k}={v}" for k, v in params.items()]
    with _repo(root) as repo:
        try:
            repo.experiments.run(params=overrides, queue=True, name=name)
        except Exception as err:  # noqa: BLE001
            raise VersioningError(f"dvc exp run --queue -n {name} failed: {err}; commit "
                                  "dvc.lock and data.dvc first (see README, Experiments)") from None


def run_queue(root: Path, jobs: int = 1) -> None:
    """`dvc exp run --run-all`: run every queued experiment and wait for them."""
    _expose_own_scripts()
    with _repo(root) as repo:
        try:
            repo.experiments.reproduce_celery(jobs=jobs)
        except Exception as err:  # noqa: BLE001
            raise VersioningError(f"running the queued experiments failed: {err}; see "
                                  "`dvc queue logs NAME`") from None


def remove_experiments(root: Path, names: Sequence[str]) -> None:
    """`dvc exp remove NAME...` of those that exist (a study's earlier run of a variant)."""
    with _repo(root) as repo:
        existing = set(experiment_results_of(repo))
        gone = [n for n in names if n in existing]
        if gone:
            repo.experiments.remove(exp_names=gone)


def experiment_results(root: Path) -> dict[str, dict[str, Any]]:
    """What `dvc exp show` shows, by experiment name ("workspace" and "baseline" too):
    {"params": params.yaml, "metrics": {file: values}, "state": success | failed | ...}."""
    with _repo(root) as repo:
        return experiment_results_of(repo)


def experiment_results_of(repo: Any) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for baseline in repo.experiments.show():
        state = baseline.dumpd()
        out["workspace" if state["rev"] == "workspace" else "baseline"] = _exp(state, None)
        for group in state.get("experiments") or []:
            executor = (group.get("executor") or {}).get("state")
            for exp in group.get("revs") or []:
                out[exp.get("name") or exp["rev"][:7]] = _exp(exp, executor)
    return out


def _exp(state: dict[str, Any], executor: str | None) -> dict[str, Any]:
    data = state.get("data") or {}

    def files(kind: str) -> dict[str, Any]:
        return {path: (value or {}).get("data") or {}
                for path, value in (data.get(kind) or {}).items()}

    return {"params": files("params").get("params.yaml", {}), "metrics": files("metrics"),
            "state": executor or ("failed" if state.get("error") else "success")}
