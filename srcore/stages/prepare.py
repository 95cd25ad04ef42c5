"""`srgan prepare`: training and benchmark pairs, HR cropped to a multiple of the scale and
its MATLAB-bicubic LR, in prepared/<split>/<set>/{HR,LR}/ with a manifest.json per set.

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
from srcore.data.images import ImageError, list_images, load_image, save_png
from srcore.data.manifest import pixel_digest, refuse_shared_images, write_manifest
from srcore.layout import Layout, clear_leftovers, new_folder_beside, swap_in
from srcore.stages.check_data import MissingDataError

#: params.yaml keys whose values change this stage's result (dvc.yaml's params). Which sets a
#: split holds reaches it as content: .srgan/data-<split>.json, written by hash-data.
PARAMS = ("scale", "prepare.gaussian_sigma")


def run(params: Params, layout: Layout, split: str | None = None) -> None:
    """Rebuild prepared/<split> (every split when None) from data/, then log the counts."""
    # 1. params: scale, prepare.gaussian_sigma and the configured sets (read by prepare())
    splits = SPLITS if split is None else (split,)
    logged = {"scale": params.scale, "prepare.gaussian_sigma": params.prepare.gaussian_sigma}
    with tracking.stage_run(params.tracking.experiment, "prepare") as tracker:
        # 2. inputs: data/<set>/ | 3. work | 4. outputs: prepared/<split> (swapped in whole)
        counts = prepare(params, layout.data, layout.prepared, splits)
        # 4. outputs: the params and the pairs per set in MLflow
        tracker.log_params({**logged, "prepare.splits": ",".join(splits)})
        tracker.log_metrics({f"pairs/{k}": v for k, v in counts.items()})
    print("prepared " + ", ".join(f"{k}: {v} pairs" for k, v in counts.items()))


def prepare(params: Params, data_dir: Path, out_dir: Path,
            splits: Sequence[str] = SPLITS) -> dict[str, int]:
    """Write out_dir/<split>/<set>/{HR,LR}/<stem>.png and manifest.json for every set of
    `splits`, then swap them in: all of out_dir when every split is made, else
    out_dir/<split>. A corrupt image or a shared one stops the stage with the old output
    intact."""
    whole = tuple(splits) == SPLITS
    if not whole and len(splits) != 1:
        raise ValueError(f"prepare makes one split or all of {SPLITS}, not {list(splits)}")
    target = out_dir if whole else out_dir / splits[0]
    clear_leftovers(target)
    tmp = new_folder_beside(target)
    try:
        counts: dict[str, int] = {}
        sets: dict[str, list[Path]] = {}
        digests: dict[Path, str] = {}
        for split in splits:
            for spec in getattr(params.data, split):
                folder = (tmp / split if whole else tmp) / spec.name
                files = _source_images(data_dir / spec.name, spec.name)
                for path in tqdm(files, desc=f"prepare {spec.name}", unit="img", leave=False):
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


def _source_images(src: Path, name: str) -> list[Path]:
    if not src.is_dir():
        raise MissingDataError(f"{src}: dataset '{name}' is not downloaded; run `srgan download` "
                               "(or `dvc pull` on a clone with a remote)")
    files = list_images(src)
    if not files:
        raise MissingDataError(f"{src}: no images; run `srgan download` again")
    return files


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
