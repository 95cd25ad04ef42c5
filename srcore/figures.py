"""Figures written by the pipeline (the perception-distortion plane, the studies' plots).

Headless (Agg: no display on a server or in CI) and atomic like every other output: a killed
process leaves the previous figure or the new one, never half a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend, imported on first use (seconds of import that
    `srgan --help` and the stages that draw nothing should not pay)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write `fig` as PNG via a temporary name, then close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        pyplot().close(fig)
        tmp.unlink(missing_ok=True)
    return path
