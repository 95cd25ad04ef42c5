"""Where each stage reads and writes, relative to the project root; dvc.yaml names the same."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

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
    def data_check(self) -> Path:
        """What `srgan check-data` writes: the guard output prepare depends on."""
        return self.root / ".srgan" / "data-check.json"

    def model(self, name: str) -> Path:
        return self.models / f"{name}.pt"

    def checkpoint(self, stage: str) -> Path:
        return self.checkpoints / f"{stage}.pt"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Small JSON outputs (metrics, guards), written to a temporary name and renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
