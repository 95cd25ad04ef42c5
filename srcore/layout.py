"""Where each stage reads and writes, relative to the project root; dvc.yaml names the same.

prepared/ is split by kind (prepared/train, prepared/val, prepared/test, one folder per set
inside), one DVC output each, so that adding a test set never touches what training reads.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srcore.config import SPLITS

__all__ = ["SPLITS", "Layout", "clear_leftovers", "new_folder_beside", "swap_in", "write_atomic",
           "write_json"]


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    def prepared_split(self, split: str) -> Path:
        """prepared/<split>: what one kind of data became (one DVC output)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.prepared / split

    def prepared_set(self, split: str, name: str) -> Path:
        return self.prepared_split(split) / name

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def state(self) -> Path:
        """.srgan/: small git-ignored files the stages leave for each other."""
        return self.root / ".srgan"

    @property
    def data_check(self) -> Path:
        """What `srgan check-data` writes: the guard output hash-data depends on."""
        return self.state / "data-check.json"

    def data_fingerprint(self, split: str) -> Path:
        """What `srgan hash-data` writes per split (set names, file hashes): what that
        split's prepare depends on instead of all of data/."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.state / f"data-{split}.json"

    @property
    def sources_record(self) -> Path:
        """What `srgan download` materialised last, so an unchanged source is not redone."""
        return self.state / "sources.json"

    def model(self, name: str) -> Path:
        return self.models / f"{name}.pt"

    def checkpoint(self, stage: str) -> Path:
        return self.checkpoints / f"{stage}.pt"


def write_atomic(path: Path, data: str | bytes) -> None:
    """A small file written whole or not at all: a temporary name beside it, then a rename,
    so a kill never leaves a half-written file where a reader looks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data)
    os.replace(tmp, path)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Small JSON outputs (metrics, guards), written atomically.

    Sorted keys and a fixed format: the same payload is the same bytes, so DVC and git see
    no change when nothing changed.
    """
    write_atomic(path, json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")


# ------------------------------------------------------------- folders swapped in whole


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_folder_beside(target: Path) -> Path:
    """An empty sibling of `target` (same file system, so it can be renamed into place) with
    the permissions a plain mkdir gives, not mkdtemp's 0700."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    system or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def clear_leftovers(target: Path) -> None:
    """Remove what a killed swap may have left beside `target`: unfinished new folders and
    old ones not yet deleted. An old folder is moved back first if `target` itself is gone
    (a kill between the two renames of the fallback)."""
    if not target.parent.is_dir():
        return
    olds = sorted(target.parent.glob(f".{target.name}.old-*"))
    if not target.exists() and olds:
        os.replace(olds.pop(), target)
    for leftover in [*olds, *target.parent.glob(f".{target.name}.new-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def swap_in(new: Path, target: Path) -> None:
    """Make the folder `new` be `target`, with never a moment without a `target`: a kill at
    any point leaves the old folder or the new one (what is left beside it is cleared by
    the next `clear_leftovers`).

    Linux swaps the two names in one step; elsewhere the old folder is renamed aside first,
    and `clear_leftovers` moves it back if a kill came between the two renames.
    """
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)  # `new` now names the old folder
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old)
