"""What a rater sees, and in which order: the paper's MOS protocol (Ledig et al. 2017, 3.4).

* Calibration first: validation images as nearest-neighbour (shown as a score of 1, bad) and
  as the original HR (a score of 5, excellent). They are never among the images being rated:
  an image used for calibration is left out of the rated set.
* Then every version of every image of the chosen sets (nearest, bicubic, SRResNet, SRGAN, HR
  and any registered version asked for), one at a time, in an order shuffled per rater: the
  shuffle is seeded from the rater's token, so a rater who stops and comes back resumes the
  same order, and two raters see different orders.
* A small fraction of the versions (`rating.repeat_fraction`) is shown a second time, later
  and at a random place, for the test-retest agreement of each rater.

Every version of an image is the same size, encoded the same way into a PNG without metadata
(no text chunks, no time stamp), and held in memory before the page opens, so neither the
bytes nor the time to serve them says which method made it.
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from srcore.data.images import to_rgb
from srcore.rating.store import Key

#: The fixed scores of the calibration versions.
CALIBRATION_SCORES = {"nearest": 1, "hr": 5}

Entry = tuple[Key, int]  # (what is shown, repeat: 0 first showing, 1 the retest)


def nearest_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour x`scale`: every LR pixel becomes a scale x scale block."""
    return np.repeat(np.repeat(lr, scale, axis=0), scale, axis=1)


def png_bytes(image: np.ndarray) -> bytes:
    """An RGB PNG with nothing but pixels: no text chunks, no gamma, no time, same settings
    for every method."""
    image = to_rgb(image)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8), "RGB").save(
        buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


def seed_of(token_sha256: str) -> int:
    return int(hashlib.sha256(("srgan-rating-plan:" + token_sha256).encode()).hexdigest(), 16)


def plan(token_sha256: str, keys: Sequence[Key], repeat_fraction: float) -> list[Entry]:
    """The rater's whole sequence: every key once in a shuffled order, and
    ceil(repeat_fraction * len(keys)) of them again, each at a random later place.

    A pure function of the token's hash and the set of keys (their order does not matter).
    """
    rng = random.Random(seed_of(token_sha256))
    order: list[Entry] = [(k, 0) for k in sorted(set(keys))]
    rng.shuffle(order)
    count = min(len(order), math.ceil(repeat_fraction * len(order))) if order else 0
    for key, _ in rng.sample(order, count):
        first = order.index((key, 0))
        order.insert(rng.randint(first + 1, len(order)), (key, 1))
    return order


def next_entry(entries: Sequence[Entry], done: set[Entry]) -> tuple[int, Entry] | None:
    """The first entry of the plan not yet scored (its position), or None when all are."""
    for i, entry in enumerate(entries):
        if entry not in done:
            return i, entry
    return None


@dataclass(frozen=True)
class ImagePair:
    """An image of a prepared set: its name, HR and LR (uint8)."""

    set_name: str
    name: str
    hr: np.ndarray
    lr: np.ndarray


@dataclass
class Catalog:
    """Every image a rating session shows, encoded once: the rated versions by Key and the
    calibration pairs as (nearest Key, HR Key)."""

    images: dict[Key, bytes] = field(default_factory=dict)
    rated: list[Key] = field(default_factory=list)
    calibration: list[tuple[Key, Key]] = field(default_factory=list)


Upscaler = Callable[[np.ndarray], np.ndarray]


def versions(pair: ImagePair, scale: int, generators: Mapping[str, Upscaler],
             bicubic: Upscaler) -> dict[str, np.ndarray]:
    """Each method's version of one image, all of HR's size."""
    out = {"nearest": nearest_upscale(pair.lr, scale), "bicubic": bicubic(pair.lr)}
    out.update({name: up(pair.lr) for name, up in generators.items()})
    out["hr"] = pair.hr
    for method, image in out.items():
        if image.shape[:2] != pair.hr.shape[:2]:
            raise ValueError(f"{pair.set_name}/{pair.name}: the {method} version is "
                             f"{image.shape[:2]}, HR is {pair.hr.shape[:2]}")
    return out


def calibration_choice(val_pairs: Sequence[ImagePair], count: int) -> list[ImagePair]:
    """The first `count` validation images (by set, then name): the calibration images."""
    ordered = sorted(val_pairs, key=lambda p: (p.set_name, p.name))
    return ordered[:count]


def build_catalog(rated_pairs: Sequence[ImagePair], calibration_pairs: Sequence[ImagePair],
                  scale: int, generators: Mapping[str, Upscaler],
                  bicubic: Upscaler) -> Catalog:
    """Encode every version of every rated image and the calibration pairs. A rated image
    that is also a calibration image is left out of the rated set (the paper calibrated on
    images that were not rated)."""
    catalog = Catalog()
    calibration_ids = {(p.set_name, p.name) for p in calibration_pairs}
    for pair in calibration_pairs:
        low = Key(pair.set_name, pair.name, "nearest")
        high = Key(pair.set_name, pair.name, "hr")
        catalog.images[low] = png_bytes(nearest_upscale(pair.lr, scale))
        catalog.images[high] = png_bytes(pair.hr)
        catalog.calibration.append((low, high))
    for pair in rated_pairs:
        if (pair.set_name, pair.name) in calibration_ids:
            continue
        for method, image in versions(pair, scale, generators, bicubic).items():
            key = Key(pair.set_name, pair.name, method)
            catalog.images[key] = png_bytes(image)
            catalog.rated.append(key)
    return catalog
