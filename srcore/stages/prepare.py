"""`srgan prepare`: training and benchmark sets, HR cropped to a multiple of the scale and
its MATLAB-bicubic LR, one folder per set in prepared/<split>/<set>/ with a manifest.json.

Validation and test sets are PNG pairs ({HR,LR}/<stem>.png), read whole by evaluation.
Training sets are a few large shards of raw pixels plus an index (srcore.data.shards), read
crop by crop: memory does not grow with the number of training images, and DVC tracks a few
files, not two per image. A training set may be a folder tree of any depth (ImageNet's class
folders); images smaller than prepare.min_hr_side are skipped, with a count in the log. The
training split is written by every core, shard by shard: a killed prepare resumes at the
shard it was in (finished shards wait in prepared/.work/).

One folder per kind of data (train, val, test; one DVC output each, `srgan prepare --split`),
one folder per set inside it, so adding a test set never touches what training reads; the LR
is made once here, not per epoch, so every later stage sees the same degradation. Each set's
manifest lists its files and their sha256, which every reader checks first.

Run by hand (all splits), prepare refuses two sets that share an image (under `dvc repro`,
hash-data has refused them already) and swaps prepared/ in whole: a kill at any point leaves
the old prepared/ or the new one, never none.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from srcore import tracking
from srcore.config import SPLITS, Params
from srcore.data.degrade import bicubic_lr, modcrop
from srcore.data.images import ImageError, list_images, list_images_tree, load_image, save_png
from srcore.data.manifest import pixel_digest, refuse_shared_images, write_manifest
from srcore.data.shards import write_set
from srcore.layout import Layout, clear_leftovers, new_folder_beside, swap_in
from srcore.stages.check_data import MissingDataError

#: params.yaml keys whose values change this stage's result (dvc.yaml's params). Which sets a
#: split holds reaches it as content: .srgan/data-<split>.json, written by hash-data.
PARAMS = ("scale", "prepare.gaussian_sigma", "prepare.min_hr_side", "prepare.shard_mb")
#: Where the finished shards of an interrupted prepare wait to be resumed (inside prepared/,
#: beside the DVC outputs prepared/<split>, so neither DVC nor a swap removes them).
WORK = ".work"


def run(params: Params, layout: Layout, split: str | None = None) -> None:
    """Rebuild prepared/<split> (every split when None) from data/, then log the counts."""
    # 1. params: scale, prepare.gaussian_sigma and the configured sets (read by prepare())
    splits = SPLITS if split is None else (split,)
    logged = {"scale": params.scale, "prepare.gaussian_sigma": params.prepare.gaussian_sigma,
              "prepare.min_hr_side": params.prepare.min_hr_side,
              "prepare.shard_mb": params.prepare.shard_mb}
    with tracking.stage_run(params.tracking.experiment, "prepare") as tracker:
        # 2. inputs: data/<set>/ | 3. work | 4. outputs: prepared/<split> (swapped in whole)
        skipped: dict[str, int] = {}
        counts = prepare(params, layout.data, layout.prepared, splits, skipped)
        # 4. outputs: the params, the pairs and the skipped images per set in MLflow
        tracker.log_params({**logged, "prepare.splits": ",".join(splits)})
        tracker.log_metrics({**{f"pairs/{k}": v for k, v in counts.items()},
                             **{f"skipped/{k}": v for k, v in skipped.items()}})
    print("prepared " + ", ".join(f"{k}: {v} pairs" for k, v in counts.items()))


def prepare(params: Params, data_dir: Path, out_dir: Path,
            splits: Sequence[str] = SPLITS,
            skipped: dict[str, int] | None = None) -> dict[str, int]:
    """Write every set of `splits` (training sets as shards + index.json, the others as
    {HR,LR}/<stem>.png) with its manifest.json, then swap them in: all of out_dir when every
    split is made, else out_dir/<split>. A corrupt image or a shared one stops the stage with
    the old output intact. Returns the images per set; `skipped` receives the training
    images too small to use, per set."""
    whole = tuple(splits) == SPLITS
    if not whole and len(splits) != 1:
        raise ValueError(f"prepare makes one split or all of {SPLITS}, not {list(splits)}")
    target = out_dir if whole else out_dir / splits[0]
    existed = out_dir.exists()
    clear_leftovers(target)
    tmp = new_folder_beside(target)
    try:
        counts: dict[str, int] = {}
        sets: dict[str, list[Path]] = {}
        digests: dict[Path, str] = {}
        for split in splits:
            for spec in getattr(params.data, split):
                folder = (tmp / split if whole else tmp) / spec.name
                if split == "train":
                    files = _train_set(params, data_dir / spec.name, spec.name, folder,
                                       out_dir / WORK, digests, skipped)
                else:
                    files = _source_images(data_dir / spec.name, spec.name)
                    for path in tqdm(files, desc=f"prepare {spec.name}", unit="img",
                                     leave=False):
                        image = load_image(path)
                        digests[path] = pixel_digest(image)
                        _write_pair(params, path, image, folder)
                write_manifest(folder, {"set": spec.name, "split": split, "scale": params.scale,
                                        "gaussian_sigma": params.prepare.gaussian_sigma})
                counts[spec.name] = len(files)
                sets[spec.name] = files
        refuse_shared_images(sets, digests)
        if not whole:
            _drop_legacy(out_dir)
        swap_in(tmp, target)
        return counts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only still there when the stage failed
        if not existed and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # made only to hold prepared/.work


def _source_images(src: Path, name: str) -> list[Path]:
    if not src.is_dir():
        raise MissingDataError(f"{src}: dataset '{name}' is not downloaded; run `srgan download` "
                               "(or `dvc pull` on a clone with a remote)")
    files = list_images(src)
    if not files:
        raise MissingDataError(f"{src}: no images; run `srgan download` again")
    return files


def _train_set(params: Params, src: Path, name: str, folder: Path, work: Path,
               digests: dict[Path, str], skipped: dict[str, int] | None) -> list[Path]:
    """Write one training set as shards; the images stored, in index order."""
    if not src.is_dir() or not list_images_tree(src):
        raise MissingDataError(f"{src}: dataset '{name}' has no images (at any depth); run "
                               "`srgan download` (or `dvc pull` on a clone with a remote)")
    cfg = params.prepare
    _, left_out, stored = write_set(src, folder, work, scale=params.scale,
                                    sigma=cfg.gaussian_sigma, min_hr_side=cfg.min_hr_side,
                                    shard_mb=cfg.shard_mb, name=name)
    if skipped is not None:
        skipped[name] = len(left_out)
    digests.update(stored)
    return list(stored)


def _write_pair(params: Params, path: Path, image: np.ndarray, out: Path) -> None:
    hr = modcrop(image, params.scale)
    if min(hr.shape[:2]) < params.scale:
        raise ImageError(f"{path}: {hr.shape[1]}x{hr.shape[0]} is too small")
    lr = bicubic_lr(hr, params.scale, params.prepare.gaussian_sigma)
    save_png(hr, out / "HR" / f"{path.stem}.png")
    save_png(lr, out / "LR" / f"{path.stem}.png")


def _drop_legacy(out_dir: Path) -> None:
    """Remove what the layout before the split folders left in prepared/ (a manifest.json
    and prepared/<set>/{HR,LR}), which no reader would check any more."""
    (out_dir / "manifest.json").unlink(missing_ok=True)
    if out_dir.is_dir():
        for child in out_dir.iterdir():
            if child.name not in SPLITS and (child / "HR").is_dir():
                shutil.rmtree(child)
