"""`srgan check-data`: dvc.yaml's guard stage, run before anything reads data/.

DVC's own error for a missing `data` dependency does not say how to get it, so this stage does
not depend on data/ (it runs on a fresh clone, whose dvc.lock lists an output it lacks) and
names the missing set and the fix (`srgan download`, or `dvc pull` where data.dvc has a
remote). Its output, .srgan/data-check.json, is what hash-data depends on first.
"""

from __future__ import annotations

from srcore.config import Params
from srcore.data.images import list_images_tree
from srcore.layout import Layout, write_json

#: params.yaml keys whose values change this stage's result (dvc.yaml's params).
PARAMS = ("data.train", "data.val", "data.test")


class MissingDataError(FileNotFoundError):
    """data/ lacks a configured dataset; the message says how to get it."""


def run(params: Params, layout: Layout) -> None:
    """Refuse to go on unless every configured set is in data/ with at least one image."""
    # 1. params: the configured sets (train, val and test)
    sets = params.data.all_sets
    # 2. inputs + 3. work: data/<name>/ of each set, counted
    found = {}
    for spec in sets:
        folder = layout.data / spec.name
        if not folder.is_dir() or not list_images_tree(folder):
            raise MissingDataError(
                f"{folder}: dataset '{spec.name}' is not in data/; run `srgan download` "
                "(or `dvc pull` when this clone's data.dvc has a reachable remote)"
            )
        found[spec.name] = len(list_images_tree(folder))
    # 4. outputs: .srgan/data-check.json
    write_json(layout.data_check, {"sets": sorted(found)})
    print("data/ holds " + ", ".join(f"{k} ({v} images)" for k, v in found.items()))
