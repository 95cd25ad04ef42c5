"""`srgan prepare`: training and benchmark pairs, HR cropped to a multiple of the scale and
its MATLAB-bicubic LR, in prepared/<set>/{HR,LR}/.

One folder per set, so adding a test set never touches what training reads; the LR is made
once here, not per epoch, so every later stage sees the same degradation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from srcore import tracking
from srcore.config import Params
from srcore.data.degrade import bicubic_lr, modcrop
from srcore.data.images import ImageError, list_images, load_image, save_png
from srcore.layout import Layout
from srcore.stages.check_data import MissingDataError


def run(params: Params, layout: Layout) -> None:
    """Rebuild prepared/ from data/ as a whole, then log the pair counts."""
    # 1. params: scale, prepare.gaussian_sigma and the configured sets (read by prepare())
    logged = {"scale": params.scale, "prepare.gaussian_sigma": params.prepare.gaussian_sigma}
    with tracking.stage_run(params.tracking.experiment, "prepare") as tracker:
        # 2. inputs: data/<set>/ | 3. work | 4. outputs: prepared/ (swapped in whole)
        counts = prepare(params, layout.data, layout.prepared)
        # 4. outputs: the params and the pairs per set in MLflow
        tracker.log_params(logged)
        tracker.log_metrics({f"pairs/{k}": v for k, v in counts.items()})
    print("prepared " + ", ".join(f"{k}: {v} pairs" for k, v in counts.items()))


def prepare(params: Params, data_dir: Path, out_dir: Path) -> dict[str, int]:
    """Write out_dir/<set>/{HR,LR}/<stem>.png for every configured set, atomically as a whole.

    Everything is built in a temporary sibling folder and swapped in at the end, so a corrupt
    image stops the stage with the old prepared/ intact.
    """
    counts: dict[str, int] = {}
    tmp = Path(tempfile.mkdtemp(prefix=".prepared.", dir=out_dir.parent))
    try:
        for spec in params.data.all_sets:
            src = data_dir / spec.name
            if not src.is_dir():
                raise MissingDataError(
                    f"{src}: dataset '{spec.name}' is not downloaded; "
                    "run `srgan download` (or `dvc pull` on a clone with a remote)"
                )
            files = list_images(src)
            if not files:
                raise MissingDataError(f"{src}: no images; run `srgan download` again")
            for path in tqdm(files, desc=f"prepare {spec.name}", unit="img", leave=False):
                hr = modcrop(load_image(path), params.scale)
                if min(hr.shape[:2]) < params.scale:
                    raise ImageError(f"{path}: {hr.shape[1]}x{hr.shape[0]} is too small")
                lr = bicubic_lr(hr, params.scale, params.prepare.gaussian_sigma)
                save_png(hr, tmp / spec.name / "HR" / f"{path.stem}.png")
                save_png(lr, tmp / spec.name / "LR" / f"{path.stem}.png")
            counts[spec.name] = len(files)
        (tmp / "manifest.json").write_text(
            json.dumps({"scale": params.scale, "sets": counts}, indent=2)
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        return counts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
