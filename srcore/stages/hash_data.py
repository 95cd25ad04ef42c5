"""`srgan hash-data`: what each split of data/ holds, by content, in one small file per split.

data.dvc versions data/ as a whole; depending on it, every prepare would re-run when any set
changes. This stage reads data/ once and writes .srgan/data-<split>.json (the split's set
names, in order, and each image's sha256), so adding a test set re-runs only the test split's
prepare and what reads it (evaluate), never training. It also refuses two sets, across train,
val and test, that hold the same image (same decoded pixels).
"""

from __future__ import annotations

from srcore.config import SPLITS, Params
from srcore.data.images import list_images_tree
from srcore.data.manifest import PixelCache, raw_files, refuse_shared_images
from srcore.layout import Layout, write_json
from srcore.stages.check_data import MissingDataError

#: params.yaml keys whose values change this stage's result (dvc.yaml's params).
PARAMS = ("data.train", "data.val", "data.test")


def run(params: Params, layout: Layout) -> None:
    """Hash every configured set, refuse shared images, write one fingerprint per split."""
    # 1. params: the sets of each split, in order
    splits = {split: [spec.name for spec in getattr(params.data, split)] for split in SPLITS}
    # 2. inputs: data/<set>/ of every set
    files = {}
    for names in splits.values():
        for name in names:
            folder = layout.data / name
            if not folder.is_dir() or not list_images_tree(folder):
                raise MissingDataError(f"{folder}: dataset '{name}' is not in data/; run "
                                       "`srgan download` (or `dvc pull`)")
            files[name] = raw_files(folder)
    # 3. work: the same pixels in two sets are refused (decoded once per file content)
    check_shared_images(layout, files)
    # 4. outputs: .srgan/data-<split>.json
    for split, names in splits.items():
        write_json(layout.data_fingerprint(split),
                   {"split": split, "sets": [{"name": n, "files": files[n]} for n in names]})
    print("hashed " + ", ".join(f"{s}: {len(n)} set(s)" for s, n in splits.items()))


def check_shared_images(layout: Layout, files: dict[str, dict[str, str]]) -> None:
    """SharedImageError naming both sets and files when two sets hold the same pixels."""
    cache = PixelCache(layout.state / "pixel-digests.json")
    paths = {name: [layout.data / name / f for f in sorted(found)]
             for name, found in files.items()}
    digests = {layout.data / name / f: cache.digest(layout.data / name / f, sha)
               for name, found in files.items() for f, sha in found.items()}
    cache.save()
    refuse_shared_images(paths, digests)
