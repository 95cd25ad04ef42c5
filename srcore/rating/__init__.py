"""The paper's blind mean-opinion-score test, run on our own models.

store.py     the SQLite store of raters, displays and scores (one transaction per score)
protocol.py  what a rater sees and in which order: calibration, the shuffled plan, repeats
app.py       `srgan rate`: the FastAPI page and its JSON endpoint
mos.py       `srgan mos`: MOS per set and method with a rater-clustered 95% interval, and the
             test-retest agreement of repeated images

Ratings are data people made: they live in ratings/ (versioned with `dvc add ratings`), never
regenerated. Nothing here imports prefect or mlflow; the CLI and the evaluate stage log MOS
through srcore.tracking and version ratings/ through srcore.versioning.
"""

from __future__ import annotations

from pathlib import Path

#: Where ratings live under the project root (DVC-tracked as ratings.dvc).
RATINGS_DIR = "ratings"
#: The SQLite file inside RATINGS_DIR.
DB_NAME = "ratings.sqlite"
#: The versions every image is shown in, as the paper's MOS test (plus any --model), in the
#: order tables list them.
BUILTIN_METHODS = ("nearest", "bicubic", "srresnet", "srgan", "hr")


def ratings_path(root: Path) -> Path:
    """The ratings store of the project at `root`."""
    return root / RATINGS_DIR / DB_NAME
