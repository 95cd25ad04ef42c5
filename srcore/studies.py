"""Studies of the paper as DVC experiments: `srgan study depth` and `srgan study content-loss`.

Each study queues one `dvc exp run` per variant of params.yaml (named study-value, so `dvc exp
show` lists them beside the baseline), runs the queue, then prints the table and writes it
with a plot to studies/<study>.{csv,png}. A variant seen before is restored from DVC's run
cache instead of retrained. Every experiment registers its models with the experiment's name
as a tag; the registry gate, not the study, decides whether one becomes @champion.

DVC is reached through srcore.versioning only.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srcore import versioning
from srcore.figures import pyplot, save_figure
from srcore.layout import write_atomic

#: Where the tables and plots go (git-ignored; the experiments themselves are DVC's).
OUT_DIR = "studies"


class StudyError(RuntimeError):
    """A study cannot start or did not finish; the message says why and what to do."""


@dataclass(frozen=True)
class Study:
    """One params key varied over values, and the headline numbers (metrics/val.json) shown
    for each: (column title, metric group, method)."""

    name: str
    key: str
    values: tuple[Any, ...]  # the study's variants unless the command names others
    columns: tuple[tuple[str, str, str], ...]
    check: Callable[[Sequence[Any]], None] | None = None

    def experiment(self, value: Any) -> str:
        return f"{self.name}-{value}".replace("_", "-").replace(".", "-")


def _vgg_weights(values: Sequence[Any]) -> None:
    """Stop at once, with the weights message, when a VGG variant could not get its weights:
    neither cached nor fetchable (fetched now, once, rather than by every experiment)."""
    if not any(str(v).startswith("vgg") for v in values):
        return
    from srcore.models.vgg import load_vgg19_state_dict, weights_path

    if not weights_path().is_file():
        load_vgg19_state_dict()  # fetches when it can, else VGGWeightsMissing


STUDIES = {
    # The paper's depth study: SRResNet's PSNR as the number of residual blocks B grows.
    "depth": Study("depth", "model.blocks", (2, 4, 8, 16), (
        ("SRResNet PSNR-Y", "psnr", "srresnet"), ("SRGAN PSNR-Y", "psnr", "srgan"),
        ("SRResNet NIQE", "niqe", "srresnet"), ("SRGAN NIQE", "niqe", "srgan"))),
    # The paper's content losses: MSE against VGG22 and VGG54 feature maps, for SRGAN.
    "content-loss": Study("content-loss", "finetune.content_loss", ("mse", "vgg22", "vgg54"), (
        ("SRGAN PSNR-Y", "psnr", "srgan"), ("SRGAN NIQE", "niqe", "srgan"),
        ("bicubic PSNR-Y", "psnr", "bicubic")), check=_vgg_weights),
}


def run_study(root: Path, study: Study, values: Sequence[Any],
              log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Queue one experiment per value, run them, and return the table's rows (also written
    to studies/<name>.csv and plotted to studies/<name>.png)."""
    if not values:
        raise StudyError(f"study {study.name}: give at least one value of {study.key}")
    hint = versioning.git_hint(root)
    if hint is not None:
        raise StudyError(f"study {study.name}: {hint}; experiments compare against the last "
                         "commit, so commit the main job's results first")
    if study.check is not None:
        study.check(values)
    names = [study.experiment(v) for v in values]
    versioning.remove_experiments(root, names)  # an earlier run of the study: run again
    for value, name in zip(values, names, strict=True):
        versioning.queue_experiment(root, name, {study.key: value})
        log(f"queued {name}: {study.key}={value}")
    versioning.run_queue(root)
    results = versioning.experiment_results(root)
    rows = [_row(study, value, results.get(name)) for value, name in zip(values, names,
                                                                         strict=True)]
    failed = [name for name, row in zip(names, rows, strict=True) if row["state"] != "success"]
    out = root / OUT_DIR
    write_table(rows, study, out / f"{study.name}.csv")
    plot(rows, study, out / f"{study.name}.png")
    log(table(rows, study))
    if failed:
        raise StudyError(f"study {study.name}: {', '.join(failed)} failed; see "
                         f"`dvc queue logs {failed[0]}`")
    return rows


def _row(study: Study, value: Any, result: dict[str, Any] | None) -> dict[str, Any]:
    metrics = (result or {}).get("metrics", {}).get("metrics/val.json", {})
    row: dict[str, Any] = {study.key: value, "experiment": study.experiment(value),
                           "state": (result or {}).get("state", "missing")}
    for title, group, method in study.columns:
        row[title] = metrics.get(group, {}).get(method)
    return row


def table(rows: list[dict[str, Any]], study: Study) -> str:
    """Markdown: one row per variant, the headline numbers on the validation set."""
    titles = [t for t, _, _ in study.columns]
    lines = [f"| {study.key} | experiment | " + " | ".join(titles) + " |",
             "|---|---|" + "---|" * len(titles)]
    for row in rows:
        cells = ["-" if row[t] is None else f"{row[t]:.2f}" for t in titles]
        lines.append(f"| {row[study.key]} | {row['experiment']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_table(rows: list[dict[str, Any]], study: Study, path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue())


def plot(rows: list[dict[str, Any]], study: Study, path: Path) -> None:
    """The first two columns (PSNR-Y) against the varied value; a line per column."""
    fig, ax = pyplot().subplots(figsize=(6.4, 4.2), dpi=100)
    labels = [str(r[study.key]) for r in rows]
    for title, group, _ in study.columns:
        if group != "psnr":
            continue
        points = [(i, r[title]) for i, r in enumerate(rows) if r[title] is not None]
        if points:
            ax.plot([i for i, _ in points], [v for _, v in points], "-o", label=title)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_xlabel(study.key)
    ax.set_ylabel("PSNR-Y (dB), validation set")
    ax.set_title(f"srgan study {study.name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
