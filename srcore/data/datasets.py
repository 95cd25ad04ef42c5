"""Training batches of aligned random crops, and whole-image pairs for evaluation.

Prepared validation and test sets live in prepared/<split>/<set>/{HR,LR} with a manifest.json;
training sets in prepared/train/<set>/ as shards + index.json (srcore.data.shards), read crop
by crop. Every reader checks the set against its manifest first (srcore.data.manifest).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from srcore.config import DataConfig
from srcore.data.images import ImageError, list_images, load_image, to_rgb
from srcore.data.manifest import MANIFEST, ManifestError, verify_set
from srcore.data.shards import ShardFormatError, ShardSet, is_shard_set
from srcore.layout import SPLITS


@dataclass(frozen=True)
class Pair:
    name: str
    hr: np.ndarray  # uint8 HxWx3 or HxW
    lr: np.ndarray


def _is_set(folder: Path) -> bool:
    return (folder / MANIFEST).is_file() or (folder / "HR").is_dir() \
        or is_shard_set(folder)


def find_set(prepared: Path, set_name: str) -> Path:
    """The folder of a prepared set: the one split folder of prepared/ that holds it, or
    `prepared/<set>` when `prepared` is itself a split folder (prepared/train)."""
    found = [prepared / split / set_name for split in SPLITS
             if _is_set(prepared / split / set_name)]
    if len(found) > 1:
        raise ManifestError(f"{found[0]} and {found[1]}: set '{set_name}' is prepared twice; "
                            "run `srgan prepare` (or `dvc repro`)")
    if found:
        return found[0]
    if _is_set(prepared / set_name):
        return prepared / set_name
    raise FileNotFoundError(f"{prepared / '<split>' / set_name}: missing; run `srgan prepare` "
                            "(or `dvc repro`)")


def verify_prepared(prepared: Path, data: DataConfig, splits: Iterable[str]) -> None:
    """Check every set of `splits` (data.train, ...) against its manifest before a stage does
    any work: a removed or altered HR/LR file stops it with one line naming the file and the
    fix, instead of training on what is left."""
    for split in splits:
        for spec in getattr(data, split):
            folder = prepared / split / spec.name
            if not folder.is_dir():
                raise ManifestError(f"{folder}: missing; run `srgan prepare` (or `dvc repro`)")
            verify_set(folder)


def load_pairs(prepared: Path, set_name: str, scale: int | None = None, *,
               verified: bool = False) -> list[Pair]:
    """Decode a prepared set's HR/LR pairs once it matches its manifest; a missing partner
    or wrong size names the file.

    With `scale`, HR must be exactly `scale` times LR: a set prepared for another scale would
    otherwise train on misaligned crops without any error. `verified`: the calling stage has
    just checked the set with verify_prepared, so its files are not hashed a second time.
    """
    set_dir = find_set(prepared, set_name)
    if not verified:
        verify_set(set_dir)
    hr_dir, lr_dir = set_dir / "HR", set_dir / "LR"
    if not hr_dir.is_dir():
        raise FileNotFoundError(f"{hr_dir}: missing; run `srgan prepare` (or `dvc repro`)")
    pairs = []
    for hr_path in list_images(hr_dir):
        lr_path = lr_dir / hr_path.name
        if not lr_path.is_file():
            raise FileNotFoundError(f"{lr_path}: LR partner of {hr_path} is missing")
        hr, lr = load_image(hr_path), load_image(lr_path)
        if hr.shape[0] % lr.shape[0] or hr.shape[0] // lr.shape[0] != hr.shape[1] // lr.shape[1]:
            raise ImageError(f"{lr_path}: size {lr.shape} does not match HR {hr.shape}")
        if scale is not None and hr.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
            raise ImageError(
                f"{lr_path}: LR {lr.shape[1]}x{lr.shape[0]} is not HR {hr.shape[1]}x{hr.shape[0]}"
                f" / {scale}; prepared/ was made for another scale: run `srgan prepare`"
            )
        pairs.append(Pair(hr_path.stem, hr, lr))
    return pairs


def open_train_set(prepared: Path, set_name: str, scale: int | None = None, *,
                   verified: bool = False) -> ShardSet:
    """A prepared training set (shards + index) once it matches its manifest; nothing is
    decoded or read into memory beyond the index. `verified`: as for load_pairs."""
    set_dir = find_set(prepared, set_name)
    if not verified:
        verify_set(set_dir)
    if not is_shard_set(set_dir) and (set_dir / "HR").is_dir():
        raise ShardFormatError(f"{set_dir}: a training set in the PNG-pair format of earlier "
                               "versions; run `srgan prepare --split train` (or `dvc repro`) "
                               "to write it as shards")
    return ShardSet(set_dir, scale)


class CropSource(Protocol):
    """Images a crop can be read from: decoded pairs in memory or a set of shards."""

    scale: int

    def __len__(self) -> int: ...

    def lr_sizes(self) -> np.ndarray: ...

    def hr_crop(self, k: int, y: int, x: int, c: int) -> np.ndarray: ...

    def lr_crop(self, k: int, y: int, x: int, c: int) -> np.ndarray: ...


class MemoryImages:
    """Decoded pairs as a CropSource (tests, tools, small sets)."""

    def __init__(self, pairs: Sequence[Pair], scale: int) -> None:
        for p in pairs:
            if p.hr.shape[:2] != (p.lr.shape[0] * scale, p.lr.shape[1] * scale):
                raise ImageError(f"{p.name}: HR {p.hr.shape[:2]} is not LR {p.lr.shape[:2]} x "
                                 f"{scale}; crops would be misaligned (run `srgan prepare`)")
        self.hr = [to_rgb(p.hr) for p in pairs]
        self.lr = [to_rgb(p.lr) for p in pairs]
        self.scale = scale

    def __len__(self) -> int:
        return len(self.lr)

    def lr_sizes(self) -> np.ndarray:
        return np.array([lr.shape[:2] for lr in self.lr], np.int64).reshape(-1, 2)

    def hr_crop(self, k: int, y: int, x: int, c: int) -> np.ndarray:
        s = self.scale
        return self.hr[k][y * s:(y + c) * s, x * s:(x + c) * s]

    def lr_crop(self, k: int, y: int, x: int, c: int) -> np.ndarray:
        return self.lr[k][y:y + c, x:x + c]


class Concat:
    """Several CropSources (the sets of data.train) as one, in order."""

    def __init__(self, sources: Sequence[CropSource], scale: int) -> None:
        for src in sources:
            if src.scale != scale:
                raise ImageError(f"a training set was prepared for scale {src.scale}, not "
                                 f"{scale}; run `srgan prepare --split train`")
        self.scale = scale
        self.sources = list(sources)
        self.starts = np.cumsum([0, *(len(src) for src in self.sources)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _where(self, k: int) -> tuple[CropSource, int]:
        i = int(np.searchsorted(self.starts, k, side="right")) - 1
        return self.sources[i], k - int(self.starts[i])

    def lr_sizes(self) -> np.ndarray:
        return np.concatenate([src.lr_sizes() for src in self.sources] or
                              [np.zeros((0, 2), np.int64)])

    def hr_crop(self, k: int, y: int, x: int, c: int) -> np.ndarray:
        src, j = self._where(k)
        return src.hr_crop(j, y, x, c)

    def lr_crop(self, k: int, y: int, x: int, c: int) -> np.ndarray:
        src, j = self._where(k)
        return src.lr_crop(j, y, x, c)


class RandomCropBatches(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Item i is the whole mini-batch of iteration i, drawn from a generator seeded by (seed, i).

    Making a batch a pure function of its iteration number means resuming after a kill sees
    exactly the batches an uninterrupted run would, with any number of loader workers and no
    sampler state to checkpoint. `images` is a CropSource: a training set's shards (each crop
    reads only its rows; nothing is decoded or kept in memory) or, for tests and tools,
    decoded pairs. Both give the same batches for the same images.

    `part` = (rank, world size): item i is then that process's contiguous slice of iteration
    i's global batch of `batch_size` crops. Every process draws the whole batch's random
    numbers from the same (seed, i) generator and materialises only its own crops, so the
    slices of all processes are exactly the single-process batch, in order.

    `min_std` > 0 redraws (up to `REDRAWS` times) a crop whose HR pixels have a standard
    deviation below it, on the 0-255 scale: black borders, night sky and flat walls teach an
    SR network nothing and, in a short run, take steps from the crops that do. Every process
    sees every candidate's pixels, so the redraws stay the same in all of them.
    """

    REDRAWS = 10

    def __init__(self, images: CropSource | Sequence[Pair], batch_size: int, hr_crop: int,
                 scale: int, seed: int, augment: bool, sampling: str = "pixel",
                 part: tuple[int, int] = (0, 1), min_std: float = 0.0) -> None:
        if hr_crop % scale:
            raise ValueError(f"hr_crop {hr_crop} is not a multiple of scale {scale}")
        rank, world = part
        if batch_size % world or not 0 <= rank < world:
            raise ValueError(f"batch_size {batch_size} does not split into {world} equal "
                             f"slices (or rank {rank} is outside the world)")
        self.local = batch_size // world
        self.first = rank * self.local
        self.lr_crop = hr_crop // scale
        if isinstance(images, Sequence):
            images = MemoryImages(images, scale)
        elif images.scale != scale:
            raise ImageError(f"training images prepared for scale {images.scale}, not {scale}; "
                             "run `srgan prepare --split train`")
        self.images = images
        sizes = images.lr_sizes()  # N x 2 arrays: a few bytes per image, even for 350k
        self.keys = np.flatnonzero(sizes.min(axis=1, initial=2**62) >= self.lr_crop)
        if not len(self.keys):
            raise ImageError(f"no training image has an LR side of at least {self.lr_crop} px "
                             f"(hr_crop {hr_crop}); lower pretrain.hr_crop or add images")
        self.sizes = sizes[self.keys]
        if sampling == "pixel":  # every pixel equally likely: big images dominate
            areas = (self.sizes[:, 0] * self.sizes[:, 1]).astype(np.float64)
        elif sampling == "image":  # every image equally likely, as BasicSR's loaders do
            areas = np.ones(len(self.sizes))
        else:
            raise ValueError(f"sampling must be 'pixel' or 'image', got {sampling!r}")
        self.weights = areas / areas.sum()
        self.batch_size, self.scale, self.seed, self.augment = batch_size, scale, seed, augment
        self.min_std = min_std
        self.length = 2**62

    def __len__(self) -> int:
        return self.length

    def _place(self, rng: np.random.Generator,
               k: int) -> tuple[int, int, int, np.ndarray | None]:
        """(image, y, x) of one crop in LR pixels, and its HR pixels when they were read to
        check them; redraws flat crops when min_std is set."""
        c = self.lr_crop
        hr = None
        for attempt in range(self.REDRAWS + 1):
            if attempt:
                k = int(rng.choice(len(self.sizes), p=self.weights))
            h, w = int(self.sizes[k, 0]), int(self.sizes[k, 1])
            y = int(rng.integers(0, h - c + 1))
            x = int(rng.integers(0, w - c + 1))
            if not self.min_std:
                break
            hr = self.images.hr_crop(int(self.keys[k]), y, x, c)
            if hr.std() >= self.min_std:
                break
        return k, y, x, hr

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        c, s = self.lr_crop, self.scale
        lrs = np.empty((self.local, c, c, 3), np.uint8)
        hrs = np.empty((self.local, c * s, c * s, 3), np.uint8)
        picks = rng.choice(len(self.sizes), size=self.batch_size, p=self.weights)
        for b, k in enumerate(picks):
            k, y, x, hr_crop = self._place(rng, int(k))
            flip, rot = (rng.integers(0, 2), int(rng.integers(0, 4))) if self.augment else (0, 0)
            slot = b - self.first
            if not 0 <= slot < self.local:
                continue  # another process's crop: its random numbers are drawn all the same
            key = int(self.keys[k])
            lr_crop = self.images.lr_crop(key, y, x, c)
            if hr_crop is None:
                hr_crop = self.images.hr_crop(key, y, x, c)
            if flip:
                lr_crop, hr_crop = lr_crop[:, ::-1], hr_crop[:, ::-1]
            lrs[slot], hrs[slot] = np.rot90(lr_crop, rot), np.rot90(hr_crop, rot)
        lr_t = torch.from_numpy(lrs).permute(0, 3, 1, 2).float().div_(255)
        hr_t = torch.from_numpy(hrs).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
        return lr_t, hr_t
