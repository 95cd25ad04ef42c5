"""One writer per workspace: .srgan.lock, taken by the Prefect flow and by `srgan <stage>`.

Two runs writing params.yaml, data/, prepared/ and models/ at once would corrupt each other,
so the flow and every stage run by hand hold the same file lock. The stages the flow itself
runs (DVC starts them as subprocesses while the flow holds the lock) must not wait for their
own parent: the holder exports a random token in SRGAN_WORKSPACE_LOCK and records it in
.srgan/lock-holder.json; a process whose token matches the workspace's record is running on
its ancestor's behalf and goes ahead. A token from another workspace, or one left in an
environment after its holder let go, matches nothing and the lock is taken as usual.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from srcore.layout import write_atomic

LOCK_NAME = ".srgan.lock"
TOKEN_ENV = "SRGAN_WORKSPACE_LOCK"


class WorkspaceBusy(RuntimeError):
    """Another run holds the workspace; the message names the lock, the holder and the wait
    option."""


def lock_path(root: Path) -> Path:
    return root / LOCK_NAME


def holder_path(root: Path) -> Path:
    """Who holds the lock and the token its children inherit (git- and DVC-ignored .srgan/)."""
    return root / ".srgan" / "lock-holder.json"


def _holder(root: Path) -> dict[str, object]:
    try:
        value = json.loads(holder_path(root).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def held_by_ancestor(root: Path) -> bool:
    """True when this process runs for the current holder of root's lock (a stage the flow
    started through DVC): its inherited token is the one the holder recorded."""
    token = os.environ.get(TOKEN_ENV)
    return bool(token) and _holder(root).get("token") == token


def _record(root: Path, token: str) -> None:
    write_atomic(holder_path(root), json.dumps({"token": token, "pid": os.getpid(),
                                                "command": " ".join(sys.argv)[:200]}))


def _busy_message(root: Path, wait_hint: str) -> str:
    holder = _holder(root)
    who = (f"; held by pid {holder['pid']}: {holder.get('command', '?')}"
           if "pid" in holder else "")
    return (f"another srgan run is using {root} (lock {lock_path(root)}{who}); wait for it to "
            f"finish, or {wait_hint}")


@contextlib.contextmanager
def workspace_lock(root: Path, timeout_s: float, wait_hint: str) -> Iterator[None]:
    """Hold root's lock (waiting up to timeout_s, then WorkspaceBusy naming `wait_hint`, the
    option that waits longer); a no-op in a process its holder started, and when re-entered."""
    root = Path(root).resolve()
    if held_by_ancestor(root):
        yield
        return
    lock = FileLock(lock_path(root))
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise WorkspaceBusy(_busy_message(root, wait_hint)) from None
    token = secrets.token_hex(16)
    try:
        _record(root, token)
        with scoped_env(TOKEN_ENV, token):  # inherited by the stage processes DVC starts
            yield
    finally:
        holder_path(root).unlink(missing_ok=True)
        lock.release()


@contextlib.contextmanager
def tracking_store(root: Path) -> Iterator[None]:
    """Pin MLflow to root's store (root/mlflow.db) for this run when MLFLOW_TRACKING_URI is
    unset.

    MLflow's default store is relative to the working directory: `srgan --root X` run from
    elsewhere (a test, a deployment with `root` edited in the UI) would otherwise log into
    whatever mlflow.db and mlruns/ the working directory holds.
    """
    if "MLFLOW_TRACKING_URI" in os.environ:
        yield
        return
    from srcore.versioning import project_root  # a queued `dvc exp run`: the project's store

    with scoped_env("MLFLOW_TRACKING_URI", f"sqlite:///{project_root(Path(root)) / 'mlflow.db'}"):
        yield


@contextlib.contextmanager
def scoped_env(key: str, value: str) -> Iterator[None]:
    """`key=value` in this process's environment (and so in every process it starts) for the
    block; afterwards the previous value, or none, as before."""
    previous = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous
