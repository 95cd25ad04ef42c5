"""Regenerate tests/data/niqe_reference.json: NIQE from an independent port, in double precision.

The reference is BasicSR's NIQE port (Apache-2.0), which is NOT part of this project: only its
source tree is read, from a path you give, and four of its files are loaded directly (BasicSR's
package import is broken with modern torchvision). Its arithmetic is forced to float64 (the
LIVE MATLAB release computes in double; float32 moves single images by up to 0.3) by the text
patches in ``PATCHES`` below, each of which must match exactly once, so a different BasicSR
release fails loudly instead of silently computing something else.

Get the source (no wheel exists; build isolation would try to compile setuptools from source)::

    mkdir -p /work/scratch/niqe && cd /work/scratch/niqe
    pip download basicsr==1.4.2 --no-deps --no-binary :all: --no-build-isolation -d .
    tar xzf basicsr-1.4.2.tar.gz

Then, from the repository root (takes a few minutes on one core)::

    python benchmarks/niqe_reference.py /work/scratch/niqe/basicsr-1.4.2

For every HR image of Set5, Set14 and BSD100 (``<datasets>/<set>/HR``) and its bicubic
reconstruction ``srcore.data.degrade.imresize(LR, 4.0)`` of ``<set>/LR_bicubic_X4``, it records
the NIQE with a 4-pixel border crop (BasicSR's ``calculate_niqe(img, crop_border=4)``, BGR
input, Y of MATLAB rgb2ycbcr; grey images as their own values), per image and per set mean,
plus the provenance. The file is written through a temporary name.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from srcore.data.degrade import imresize  # noqa: E402
from srcore.data.images import list_images, load_image  # noqa: E402

SETS = ("Set5", "Set14", "BSD100")
CROP = 4
BASICSR_VERSION = "1.4.2"

#: (file inside the basicsr package, old text, new text): the float64 patch. Each must match.
PATCHES: tuple[tuple[str, str, str], ...] = (
    ("utils/matlab_functions.py", ".float()", ".double()"),
    ("utils/matlab_functions.py", "torch.FloatTensor(", "torch.DoubleTensor("),
    ("utils/color_util.py", "img = img.astype(np.float32)", "img = img.astype(np.float64)"),
    ("utils/color_util.py", "if img_type == np.float32:",
     "if img_type in (np.float32, np.float64):"),
    ("utils/color_util.py", "if dst_type not in (np.uint8, np.float32):",
     "if dst_type not in (np.uint8, np.float32, np.float64):"),
    ("metrics/metric_util.py", "img.astype(np.float32) / 255.", "img.astype(np.float64) / 255."),
    ("metrics/niqe.py", "img = img.astype(np.float32)", "img = img.astype(np.float64)"),
    # scipy >= 1.8 moved convolve out of the deprecated scipy.ndimage.filters namespace.
    ("metrics/niqe.py", "from scipy.ndimage.filters import convolve",
     "from scipy.ndimage import convolve"),
)
#: Counts of the patterns above; torch.linspace in calculate_weights_indices follows the
#: default dtype, which is set to float64 for the whole run.
EXPECTED_COUNTS = {".float()": 1, "torch.FloatTensor(": 4}


def _patched_source(root: Path, rel: str) -> tuple[str, str]:
    path = root / "basicsr" / rel
    text = path.read_text()
    digest = hashlib.sha256(text.encode()).hexdigest()
    for name, old, new in PATCHES:
        if name != rel:
            continue
        count = text.count(old)
        if count != EXPECTED_COUNTS.get(old, 1):
            raise SystemExit(f"{path}: patch target {old!r} found {count} times; "
                             f"this script expects BasicSR {BASICSR_VERSION}")
        text = text.replace(old, new)
    return text, digest


def _load(name: str, source: str, filename: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def load_basicsr_niqe(root: Path) -> tuple[types.ModuleType, dict[str, str]]:
    """BasicSR's niqe module, float64-patched, with stub packages for its imports."""
    if not (root / "basicsr" / "metrics" / "niqe.py").is_file():
        raise SystemExit(f"{root}: not a BasicSR source tree (no basicsr/metrics/niqe.py); "
                         "see this script's docstring for how to get it")
    torch.set_default_dtype(torch.float64)
    sys.modules.setdefault("cv2", types.ModuleType("cv2"))  # only used for convert_to='gray'
    for pkg in ("basicsr", "basicsr.utils", "basicsr.metrics"):
        sys.modules[pkg] = types.ModuleType(pkg)
    registry = types.ModuleType("basicsr.utils.registry")
    registry.METRIC_REGISTRY = types.SimpleNamespace(register=lambda: (lambda f: f))
    sys.modules["basicsr.utils.registry"] = registry

    digests: dict[str, str] = {}
    for mod, rel in (("basicsr.utils.color_util", "utils/color_util.py"),
                     ("basicsr.utils.matlab_functions", "utils/matlab_functions.py"),
                     ("basicsr.metrics.metric_util", "metrics/metric_util.py"),
                     ("basicsr.metrics.niqe", "metrics/niqe.py")):
        text, digests[rel] = _patched_source(root, rel)
        module = _load(mod, text, str(root / "basicsr" / rel))
        if mod == "basicsr.utils.color_util":
            sys.modules["basicsr.utils"].bgr2ycbcr = module.bgr2ycbcr
    return sys.modules["basicsr.metrics.niqe"], digests


def reference_niqe(niqe_mod: types.ModuleType, rgb_or_grey: np.ndarray, crop: int) -> float:
    """BasicSR's calculate_niqe on our uint8 image (it expects BGR channel order)."""
    img = rgb_or_grey[..., ::-1] if rgb_or_grey.ndim == 3 else rgb_or_grey
    return float(niqe_mod.calculate_niqe(np.ascontiguousarray(img), crop_border=crop,
                                         input_order="HWC", convert_to="y"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("basicsr_src", type=Path, help="unpacked basicsr-1.4.2 source tree")
    parser.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("--baboon", type=Path,
                        default=REPO.parent / "shared" / "perceptual" / "baboon.png")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "niqe_reference.json")
    args = parser.parse_args()
    niqe_mod, digests = load_basicsr_niqe(args.basicsr_src)

    sets: dict[str, dict[str, object]] = {}
    for name in SETS:
        hr_dir, lr_dir = args.datasets / name / "HR", args.datasets / name / "LR_bicubic_X4"
        hr_vals: dict[str, float] = {}
        bic_vals: dict[str, float] = {}
        for hr_path in list_images(hr_dir):
            lr_path = lr_dir / hr_path.name.replace("_HR.", "_LR.")
            hr, lr = load_image(hr_path), load_image(lr_path)
            bicubic = imresize(lr, 4.0)
            if bicubic.shape != hr.shape:
                raise SystemExit(f"{lr_path}: x4 bicubic is {bicubic.shape}, HR is {hr.shape}")
            hr_vals[hr_path.name] = reference_niqe(niqe_mod, hr, CROP)
            bic_vals[hr_path.name] = reference_niqe(niqe_mod, bicubic, CROP)
            print(f"{name}/{hr_path.name}: HR {hr_vals[hr_path.name]:.4f} "
                  f"bicubic {bic_vals[hr_path.name]:.4f}", flush=True)
        sets[name] = {
            "mean_hr": float(np.mean(list(hr_vals.values()))),
            "mean_bicubic": float(np.mean(list(bic_vals.values()))),
            "hr": hr_vals,
            "bicubic": bic_vals,
        }
        print(f"{name}: mean HR {sets[name]['mean_hr']:.4f} "
              f"bicubic {sets[name]['mean_bicubic']:.4f}", flush=True)

    baboon = reference_niqe(niqe_mod, load_image(args.baboon), 0)
    result = {
        "provenance": {
            "reference": f"BasicSR {BASICSR_VERSION} metrics/niqe.py calculate_niqe "
                         "(PyPI sdist, Apache-2.0), loaded from its source files",
            "basicsr_source_sha256": digests,
            "float64_patch": [f"{rel}: {old!r} -> {new!r}" for rel, old, new in PATCHES]
            + ["torch.set_default_dtype(torch.float64) (torch.linspace in imresize weights)"],
            "bicubic": "srcore.data.degrade.imresize(LR_bicubic_X4 image, 4.0), uint8",
            "crop": CROP,
            "date": dt.date.today().isoformat(),
            "generated_by": "benchmarks/niqe_reference.py",
            "numpy": np.__version__,
            "torch": torch.__version__,
        },
        "baboon_crop0": baboon,
        "sets": sets,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"baboon (crop 0): {baboon:.6f}; wrote {args.out}")


if __name__ == "__main__":
    main()
