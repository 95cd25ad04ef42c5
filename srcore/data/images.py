"""Decoding and atomic writing of images, with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the fix."""


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_images_tree(folder: Path) -> list[Path]:
    """Every image under `folder`, at any depth (ImageNet's class folders), sorted by path;
    hidden files and folders (.git, .DS_Store, editors' temporaries) are left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames
                     if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def load_image(path: Path) -> np.ndarray:
    """Decode as uint8 HxWx3 (RGB) or HxW (grey), converting what can be converted.

    Grey stays grey so evaluation can treat it the way the field does; alpha is dropped;
    16-bit is scaled to 8-bit; palette images become RGB. Pillow's decompression-bomb guard
    stays on.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("L", "RGB"):
                arr = np.asarray(im)
            elif im.mode.startswith("I;16") or im.mode == "I":
                wide = np.asarray(im, dtype=np.float64)
                arr = (wide / 257.0).round().clip(0, 255).astype(np.uint8)
            elif im.mode in ("LA", "La", "1"):
                arr = np.asarray(im.convert("L"))
            else:
                arr = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(
            f"{path}: cannot be decoded as an image ({err}); replace or remove the file, "
            "or re-fetch the data (srgan download / dvc pull)"
        ) from None
    if arr.ndim not in (2, 3) or min(arr.shape[:2]) == 0:
        raise ImageError(f"{path}: unusable image shape {arr.shape}")
    return np.ascontiguousarray(arr)


def to_rgb(image: np.ndarray) -> np.ndarray:
    return np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image


def save_png(image: np.ndarray, path: Path) -> None:
    """Write a PNG via a temporary name so a killed process never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)
