"""The only module that talks to DVC: version data/, push/pull it, reproduce and check stages."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("DVC_NO_ANALYTICS", "1")

STAGES = ("prepare", "pretrain", "finetune", "evaluate")
#: dvc.yaml's guard stage that runs before prepare (not a pipeline stage of its own).
GUARD_STAGE = "check-data"


class VersioningError(RuntimeError):
    """A DVC operation failed; the message names the operation and the fix."""


def _repo(root: Path) -> Any:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo(str(root))
    except NotDvcRepoError:
        raise VersioningError(
            f"{root} is not a DVC repository; run `dvc init` there (the project ships one)"
        ) from None


def add_data(root: Path, data_dir: str = "data") -> None:
    """`dvc add data` -> data.dvc: one pointer for the whole raw-data folder."""
    with _repo(root) as repo:
        repo.add(str(root / data_dir))  # DVC resolves relative targets against the cwd


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
    """Run one dvc.yaml stage (and nothing upstream) if DVC finds it changed.

    Going through DVC keeps dvc.lock true, so `dvc repro` and the Prefect flow never recompute
    what the other finished (architecture rule 1). Returns the names of stages that ran.
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
            cause = err.__cause__ or err
            raise VersioningError(f"stage '{stage}' failed: {cause}") from None
    return [getattr(s, "addressing", str(s)) for s in ran]


def status(root: Path) -> dict[str, Any]:
    """`dvc status` as a dict; empty means everything is up to date."""
    with _repo(root) as repo:
        return dict(repo.status())


def data_version(root: Path) -> str | None:
    """The md5 that data.dvc records for data/: which data a model was trained on."""
    import yaml

    pointer = root / "data.dvc"
    if not pointer.is_file():
        return None
    outs = (yaml.safe_load(pointer.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")
