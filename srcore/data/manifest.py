"""What a folder of images is, by content: raw data fingerprints, prepared-set manifests and
the refusal of one image in two sets.

A prepared set carries manifest.json (its files and their sha256), written by `prepare` and
checked by every stage that reads the set, so a removed or altered HR/LR file stops the stage
with one line naming it instead of training on what is left.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from srcore.data.images import (
    IMAGE_SUFFIXES,
    ImageError,
    list_images_tree,
    load_image,
    to_rgb,
)

MANIFEST = "manifest.json"
#: Fixes for a prepared/ that no longer matches what prepare wrote.
PREPARED_FIX = ("restore it with `dvc checkout` (the pipeline's last good state) or rebuild it "
                "with `srgan prepare`")


class ManifestError(FileNotFoundError):
    """prepared/ differs from its manifest; the message names the file and the fix."""


class SharedImageError(ImageError):
    """Two sets hold the same image; the message names both sets and both files."""


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks so multi-GB archives do not fill memory."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pixel_digest(image: np.ndarray) -> str:
    """Hash of the decoded pixels (grey as RGB): a re-encoded copy of a photo, or a grey
    copy of a grey photo stored as RGB, is the same image."""
    rgb = np.ascontiguousarray(to_rgb(image))
    h = hashlib.sha256(f"{rgb.shape}:{rgb.dtype}".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------- raw data (data/<set>)


def raw_files(folder: Path) -> dict[str, str]:
    """path (relative to the folder, posix) -> sha256 of the images in one data/<set> folder,
    at any depth (a training set may be a tree of class folders)."""
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in list_images_tree(folder)}


@dataclass(frozen=True)
class Seen:
    set_name: str
    path: Path


def refuse_shared_images(sets: Mapping[str, Iterable[Path]],
                         digests: Mapping[Path, str]) -> None:
    """Refuse two sets (of any split) that hold the same pixels: a photo trained on and then
    scored would flatter the model. `digests` maps each path to its pixel_digest."""
    seen: dict[str, Seen] = {}
    for set_name, paths in sets.items():
        for path in paths:
            digest = digests[path]
            first = seen.setdefault(digest, Seen(set_name, path))
            if first.set_name != set_name:
                raise SharedImageError(
                    f"sets '{first.set_name}' and '{set_name}' share an image: {first.path} "
                    f"and {path} have the same pixels; remove it from one of them (a set "
                    "belongs to one of train, val and test)")


class PixelCache:
    """pixel_digest by file sha256, kept between runs in a small JSON file: decoding every
    image again each time data/ changes would cost a minute on DIV2K."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError):
            loaded = {}
        self.known: dict[str, str] = loaded if isinstance(loaded, dict) else {}
        self.changed = False

    def digest(self, path: Path, file_sha256: str) -> str:
        if file_sha256 not in self.known:
            self.known[file_sha256] = pixel_digest(load_image(path))
            self.changed = True
        return self.known[file_sha256]

    def save(self) -> None:
        if self.changed:
            from srcore.layout import write_json

            write_json(self.path, self.known)


# ------------------------------------------------------------ prepared sets (prepared/..)


def write_manifest(set_dir: Path, info: Mapping[str, Any]) -> dict[str, Any]:
    """manifest.json of a finished prepared set: `info` (scale, pre-filter) plus every file
    under HR/ and LR/ with its sha256."""
    files = {str(p.relative_to(set_dir)): sha256_file(p)
             for p in sorted(set_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {**info, "files": files}
    (set_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def verify_set(set_dir: Path) -> dict[str, Any]:
    """The set's manifest once every file it lists is there, unchanged, and no image was
    added; otherwise ManifestError naming the first file that differs."""
    path = set_dir / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{path}: missing, so {set_dir} cannot be trusted; {PREPARED_FIX}")
    try:
        manifest = json.loads(path.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError):
        raise ManifestError(f"{path}: not a manifest written by `srgan prepare`; "
                            f"{PREPARED_FIX}") from None
    for rel, digest in sorted(files.items()):
        file = set_dir / rel
        if not file.is_file():
            raise ManifestError(f"{file}: missing from prepared/ ({path} lists it); "
                                f"{PREPARED_FIX}")
        if sha256_file(file) != digest:
            raise ManifestError(f"{file}: altered since `srgan prepare` wrote it (its sha256 "
                                f"differs from {path}); {PREPARED_FIX}")
    for file in sorted(set_dir.rglob("*")):
        rel = str(file.relative_to(set_dir))
        if file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES and rel not in files:
            raise ManifestError(f"{file}: not in {path} (added after `srgan prepare`); "
                                f"{PREPARED_FIX}")
    return manifest


def content_digest(set_dirs: Iterable[Path]) -> str:
    """One hash of what prepared sets hold (their manifests' file hashes): the training
    data a checkpoint was made on."""
    h = hashlib.sha256()
    for set_dir in set_dirs:
        try:
            files = json.loads((set_dir / MANIFEST).read_text()).get("files", {})
        except (OSError, ValueError):
            files = {}
        h.update(json.dumps([set_dir.name, files], sort_keys=True).encode())
    return h.hexdigest()[:16]
