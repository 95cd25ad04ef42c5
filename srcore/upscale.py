"""Inference on images of any size: whole-image or tiled with overlap, shared by eval, the CLI
(`srgan upscale`) and the served model; srcore/serving.py holds their shared defaults.

Tiling bounds memory by the tile, not the image. It is exact, not approximate, once every tile
carries at least the generator's receptive-field radius of context on each inner edge: each
tile's output is then cropped to its core, whose pixels saw the same inputs (and the same zero
padding at true image borders) as whole-image inference.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import io
import math
import os
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from tqdm import tqdm

from srcore.data.images import IMAGE_SUFFIXES, ImageError, list_images, to_rgb
from srcore.serving import (
    BLEND_CACHE_SIZE,
    DEFAULT_MAX_PIXELS,
    DEFAULT_OVERLAP,
    DEFAULT_TILE,
    OUTPUT_FORMATS,
)

if TYPE_CHECKING:
    from srcore.precision import Precision

#: Called before each tile; raises (e.g. Cancelled) to stop the work between two tiles.
TileHook = Callable[[], None]


class Cancelled(Exception):
    """The caller gave up (client gone, deadline passed): the work stopped between tiles."""


class NonFiniteOutput(ValueError):
    """The generator produced NaN or infinity: it diverged, and its output is not an image."""


def lr_to_tensor(lr: np.ndarray, device: torch.device | str = "cpu",
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 HxW(x3) -> float (1,3,H,W) in [0, 1], the generator's input range."""
    rgb = np.require(to_rgb(lr), requirements=["C", "W"])  # torch refuses read-only arrays
    t = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    return t.to(device, memory_format=memory_format)


def _to_uint8(sr: torch.Tensor, grey: bool) -> np.ndarray:
    """(1,3,H,W) in [-1, 1] -> uint8 HxWx3, or HxW luma; converted on the model's device so
    only uint8 crosses to the host."""
    img = sr[0].detach().float().clamp(-1, 1).add_(1).mul_(127.5).round_().to(torch.uint8)
    arr = img.permute(1, 2, 0).cpu().numpy()
    if grey:
        weights = np.array([0.299, 0.587, 0.114])
        arr = np.clip(np.rint(arr.astype(np.float64) @ weights), 0, 255).astype(np.uint8)
    return arr


def tensor_to_image(sr: torch.Tensor, grey: bool = False) -> np.ndarray:
    """(1,3,H,W) in [-1, 1] -> uint8 HxWx3, or HxW luma when the source image was grey."""
    return _to_uint8(sr, grey)


def receptive_radius(model: nn.Module) -> int:
    """How many LR pixels of context one output pixel depends on, per side (rounded up).

    Sums each stride-1 convolution's radius, divided by the upsampling already applied before
    it (a 9x9 conv after x4 PixelShuffle reaches 1 LR pixel), over modules in definition order.
    That order is the forward order for SRResNet; residual adds and the bicubic global skip
    (2 LR pixels) never reach further than the longest conv chain, so this is an upper bound.
    SRResNet with B blocks: 8 + 2B (40 for the paper's B = 16).
    """
    radius, scale = 0.0, 1
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if any(s != 1 for s in module.stride):
                raise ValueError(f"receptive_radius: strided conv {module} is not supported")
            reach = max(d * (k - 1) // 2 for d, k in zip(module.dilation, module.kernel_size,
                                                        strict=True))
            radius += reach / scale
        elif isinstance(module, nn.PixelShuffle):
            scale *= module.upscale_factor
    return max(2, math.ceil(radius))


def default_overlap(model: nn.Module) -> int:
    """DEFAULT_OVERLAP, or the receptive radius when that is smaller (then tiling is exact)."""
    return min(DEFAULT_OVERLAP, receptive_radius(model))


@torch.no_grad()
def model_scale(model: nn.Module) -> int:
    """The generator's upscaling factor: its `scale` attribute, else measured on 8x8 zeros."""
    scale = getattr(model, "scale", None)
    if isinstance(scale, int):
        return scale
    param = next(model.parameters())
    with _eval_mode(model):
        out = model(torch.zeros(1, 3, 8, 8, device=param.device, dtype=param.dtype))
    return int(out.shape[-1]) // 8


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """BatchNorm in training mode normalises by each tile's own statistics, so tiles would
    disagree with each other and with whole-image inference; restore the caller's mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


Box = tuple[int, int, int, int]  # y_start, y_end, x_start, x_end in LR pixels


def _tiles(h: int, w: int, tile: int, overlap: int) -> Iterator[tuple[Box, Box]]:
    """(core, window) per tile: cores partition the image; a window is its core plus up to
    `overlap` pixels of context per side, clipped at the image border. tile 0 = one tile."""
    if tile < 0 or overlap < 0:
        raise ValueError(f"tile and overlap must be >= 0, got tile={tile}, overlap={overlap}")
    if tile == 0 or (h <= tile and w <= tile):
        yield (0, h, 0, w), (0, h, 0, w)
        return
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            ye, xe = min(h, y + tile), min(w, x + tile)
            yield (y, ye, x, xe), (max(0, y - overlap), min(h, ye + overlap),
                                   max(0, x - overlap), min(w, xe + overlap))


def _core(sr: torch.Tensor, core: Box, window: Box, scale: int) -> torch.Tensor:
    """The part of a window's output that belongs to its core, after checking the scale."""
    (y, ye, x, xe), (y0, y1, x0, x1) = core, window
    if sr.shape[-2:] != ((y1 - y0) * scale, (x1 - x0) * scale):
        raise ValueError(f"model output {tuple(sr.shape)} is not x{scale} of its "
                         f"input tile {(y1 - y0, x1 - x0)}; check `scale`")
    ty, tx = (y - y0) * scale, (x - x0) * scale
    return sr[..., ty:ty + (ye - y) * scale, tx:tx + (xe - x) * scale]


@torch.no_grad()
def upscale_tensor(model: nn.Module, lr: torch.Tensor, scale: int, tile: int = 0,
                   overlap: int = 8) -> torch.Tensor:
    """Run G on (N,3,H,W) in eval mode; with tile > 0, on overlapping tiles stitched by core.

    Each core of `tile` x `tile` LR pixels is run with up to `overlap` extra LR pixels on every
    side, and only the core's output is kept. With overlap >= receptive_radius(model) the
    result equals whole-image inference to float rounding; a smaller overlap changes pixels
    near the seams. The float result is full size: for large images use `upscale_image`.
    """
    n, _, h, w = lr.shape
    boxes = list(_tiles(h, w, tile, overlap))
    with _eval_mode(model):
        if len(boxes) == 1:
            return model(lr).float()
        out = torch.empty((n, 3, h * scale, w * scale), dtype=torch.float32, device=lr.device)
        for core, window in boxes:
            y0, y1, x0, x1 = window
            sr = _core(model(lr[:, :, y0:y1, x0:x1]).float(), core, window, scale)
            y, ye, x, xe = core
            out[:, :, y * scale:ye * scale, x * scale:xe * scale] = sr
        return out


@torch.no_grad()
def upscale_image(model: nn.Module, lr: np.ndarray, scale: int, tile: int = 0,
                  overlap: int = 8, device: torch.device | str = "cpu",
                  memory_format: torch.memory_format = torch.contiguous_format,
                  out: np.ndarray | None = None, *, precision: Precision | None = None,
                  before_tile: TileHook | None = None) -> np.ndarray:
    """uint8 LR -> uint8 SR, tile by tile; a grey input gives a grey output.

    Each tile is converted to float on the device and its core back to uint8 before the next
    one runs, so memory holds one tile's activations plus the uint8 result: a float32 SR of a
    4000x3000 input alone would be 2.3 GB, its uint8 576 MB. `out` (a view of the right shape,
    e.g. the colour channels of an RGBA buffer) receives the result instead of a new array.
    Tile, overlap and eval mode as in `upscale_tensor`, whose pixels this matches exactly in
    fp32 (`precision` None or fp32; bf16 runs under autocast). `before_tile` runs before each
    tile and may raise to stop (a server's cancel flag). A tile with a non-finite value raises
    NonFiniteOutput: a diverged generator never becomes an all-black image.
    """
    grey = lr.ndim == 2
    h, w = lr.shape[:2]
    shape = (h * scale, w * scale) if grey else (h * scale, w * scale, 3)
    if out is None:
        out = np.empty(shape, np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {shape}, got {out.dtype} {out.shape}")
    autocast = (precision.autocast(torch.device(device)) if precision is not None
                else contextlib.nullcontext())
    with _eval_mode(model):
        for core, window in _tiles(h, w, tile, overlap):
            if before_tile is not None:
                before_tile()
            y0, y1, x0, x1 = window
            with autocast:
                sr = model(lr_to_tensor(lr[y0:y1, x0:x1], device, memory_format))
            # one reduction instead of isfinite's three passes: NaN and inf survive a sum
            if not math.isfinite(float(torch.sum(sr, dtype=torch.float32))):
                raise NonFiniteOutput("the generator produced NaN or infinite values: it "
                                      "diverged; use an earlier or re-trained model")
            y, ye, x, xe = core
            out[y * scale:ye * scale, x * scale:xe * scale] = _to_uint8(
                _core(sr, core, window, scale), grey)
            del sr  # free this tile's output before the next tile allocates its own
    return out


# ----------------------------------------------------------------- inference preparation


def for_inference(model: nn.Module, precision: Precision | None,
                  memory_format: torch.memory_format = torch.contiguous_format) -> nn.Module:
    """The network to run at `precision`: itself in fp32 (bit-exact), else an eval-mode copy
    with every BatchNorm folded into the convolution before it and convolution subclasses
    (SRResNet's NarrowOutputConv2d, a training-speed trick) made plain nn.Conv2d, so oneDNN
    runs each conv once and no BatchNorm or cast runs between them. The same function to
    float rounding; measured with benchmarks/upscale.py, 4% faster under bf16 autocast."""
    if precision is None or not precision.bf16:
        return model
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    ready = copy.deepcopy(model).eval()
    for parent in list(ready.modules()):
        names = list(parent._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, norm = parent._modules[first], parent._modules[second]
            if isinstance(parent, nn.Sequential) and type(conv) is nn.Conv2d \
                    and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats:
                parent._modules[first] = fuse_conv_bn_eval(conv, norm)
                parent._modules[second] = nn.Identity()
        for name, child in parent._modules.items():
            if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d:
                plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size,
                                  child.stride, child.padding, child.dilation, child.groups,
                                  child.bias is not None, child.padding_mode)
                plain.load_state_dict(child.state_dict())
                parent._modules[name] = plain.to(child.weight.device)
    return ready.to(memory_format=memory_format)


# ------------------------------------------------------------------ what memory it takes


def tile_bytes(model: nn.Module, tile: int, overlap: int) -> int:
    """Activations of one tile at their widest, in the last upsampling block: two maps of
    (scale x window)^2 x feature channels (the first conv's width) in fp32 (bf16 autocast
    still runs the 9x9 tail on fp32 input), plus a quarter for the allocator. For the paper's
    generator at tile 256 + 2 x 16 this says 849 MB; measured over the warm baseline: 598 MB
    (bf16) and 689 MB (fp32)."""
    channels = next((m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 64)
    window = tile + 2 * overlap
    return int(2.5 * (model_scale(model) * window) ** 2 * channels * 4)


def image_bytes(lr_pixels: int, scale: int, *, encoded_in_memory: bool) -> int:
    """What one image holds at its peak besides the tile: the decoded input (up to 4 bytes a
    pixel), the uint8 RGB output (3 bytes an output pixel), Pillow's copy of it for the
    encoder (4: RGB is stored as RGBX) and, when the result is kept in memory (a served
    PNG), the encoded file (at most ~3, incompressible); its base64 (4/3 of that) is made
    after the first two are freed."""
    out = lr_pixels * scale ** 2
    return lr_pixels * 4 + out * (3 + 4 + (3 if encoded_in_memory else 0))


# ------------------------------------------------------------------- blends, one knob


class GeneratorSet:
    """An SRGAN, the SRResNet it was fine-tuned from, and the blends between them that a
    caller asks for: alpha 1 is the SRGAN, 0 the SRResNet (srcore.models.interpolate).

    A server sees few distinct alphas, so blends are kept in a small LRU cache: a request
    never re-blends. Both networks are already on their device and in their memory format;
    every blend is made there, from the two as given, then passed through `prepare` (e.g.
    `for_inference`) once. Thread-safe (a server's compute slots share one set).
    """

    def __init__(self, srgan: nn.Module, srresnet: nn.Module | None, *, source: str,
                 default_alpha: float = 1.0, cache_size: int = BLEND_CACHE_SIZE,
                 prepare: Callable[[nn.Module], nn.Module] | None = None) -> None:
        self.srgan, self.srresnet, self.source = srgan.eval(), srresnet, source
        self._prepare = prepare or (lambda network: network)
        self.default_alpha = check_alpha(default_alpha, source)
        if srresnet is not None:
            from srcore.models.interpolate import IncompatibleGenerators, blend

            srresnet.eval()
            try:  # fail at load, not on the first request that asks for a blend
                blend(srresnet, srgan, 0.5)
            except IncompatibleGenerators as err:
                raise IncompatibleGenerators(
                    f"{source}: its SRResNet cannot be blended with it: {err}") from None
        elif self.default_alpha != 1.0:
            raise MissingSRResNet(f"{source}: default alpha {self.default_alpha:g} needs the "
                                  "SRResNet it was fine-tuned from, and there is none")
        self._cache: OrderedDict[float, nn.Module] = OrderedDict()
        self._size = max(1, cache_size)
        self._lock = threading.Lock()
        self.blends_made = 0
        self._ends = {1.0: self._prepare(self.srgan)}
        if srresnet is not None:
            self._ends[0.0] = self._prepare(srresnet)

    def at(self, alpha: float | None = None) -> nn.Module:
        """The generator at `alpha` (None: the default), blended once and then cached."""
        alpha = self.default_alpha if alpha is None else check_alpha(alpha, self.source)
        if alpha in self._ends:  # 1, and 0 when there is an SRResNet
            return self._ends[alpha]
        if self.srresnet is None:
            raise MissingSRResNet(f"{self.source}: alpha {alpha:g} blends SRGAN with the "
                                  "SRResNet it was fine-tuned from, and this model carries "
                                  "none; ask for alpha 1 or give the SRResNet (--srresnet)")
        with self._lock:
            if alpha in self._cache:
                self._cache.move_to_end(alpha)
                return self._cache[alpha]
            from srcore.models.interpolate import blend

            blended = self._prepare(blend(self.srresnet, self.srgan, alpha).eval())
            self.blends_made += 1
            self._cache[alpha] = blended
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
            return blended


class MissingSRResNet(ValueError):
    """A blend was asked of an SRGAN that came without its SRResNet; the message says how."""


def check_alpha(alpha: object, source: str = "alpha") -> float:
    """A finite number in [0, 1], else ValueError naming `source` (hostile requests too)."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) \
            or not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{source}: alpha must be a number from 0 (SRResNet) to 1 (SRGAN), "
                         f"got {alpha!r}")
    return float(alpha)


# ------------------------------------------------------------------- files and encodings


@dataclass(frozen=True)
class Picture:
    """A decoded image as the generator takes it: colour (HxWx3 RGB or HxW grey) and alpha."""

    pixels: np.ndarray
    alpha: np.ndarray | None = None


#: How to get past the size limit, for `srgan upscale`; the server passes its own.
LIMIT_HINT = "split it or raise the limit (srgan upscale --max-pixels)"


def decode_image(source: Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 name: str | None = None, limit_hint: str = LIMIT_HINT) -> Picture:
    """Decode a file or encoded bytes (PNG, JPEG, WebP, ...) into colour and alpha.

    The size is checked against `max_pixels` from the header, before any pixel is decoded, so
    a huge or hostile file costs nothing; Pillow's decompression-bomb guard stays on above it,
    but speaks our words: a bomb under the default limit gets the same `limit_hint` as any
    oversized image, not Pillow's "could be decompression bomb DOS attack".
    EXIF orientation is applied (the PNG written has no EXIF to carry it); 16-bit is scaled to
    8-bit; palette and grey images with a transparent colour get a real alpha channel.
    """
    label = name or (str(source) if isinstance(source, Path) else "image")
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as im:
            w, h = im.size
            if w * h == 0:
                raise ImageError(f"{label}: empty image ({w}x{h})")
            if w * h > max_pixels:
                raise ImageError(_over_limit(label, f"{w}x{h} = {w * h:,}", w * h, max_pixels,
                                             limit_hint))
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            return _split_alpha(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(_bomb(label, str(err), max_pixels, limit_hint)) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{label}: cannot be decoded as an image ({err})") from None


def _over_limit(label: str, size: str, pixels: int, limit: int, hint: str) -> str:
    return (f"{label}: {size} pixels is over the limit of {limit:,} (its x4 RGB output alone "
            f"would be {pixels * 48 / 1e9:.1f} GB); {hint}")


def _bomb(label: str, pillow_message: str, max_pixels: int, hint: str) -> str:
    """Pillow refused the header before we could read the size: say it as our limit does."""
    found = re.search(r"\((\d+) pixels\)", pillow_message)
    pixels = int(found.group(1)) if found else None
    if pixels is not None and pixels > max_pixels:
        return _over_limit(label, f"{pixels:,}", pixels, max_pixels, hint)
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    size = f"{pixels:,} pixels" if pixels else "its size"
    return (f"{label}: {size} is over "
            f"Pillow's decompression-bomb limit of {limit:,} pixels, which --max-pixels does "
            "not raise; split the image")


def _split_alpha(im: Image.Image) -> Picture:
    if "transparency" in im.info and im.mode in ("P", "L", "RGB"):
        im = im.convert("LA" if im.mode == "L" else "RGBA")
    mode = im.mode
    if mode == "I" or mode.startswith("I;16"):
        wide = np.asarray(im, dtype=np.float64)
        return Picture((wide / 257.0).round().clip(0, 255).astype(np.uint8))
    if mode in ("1", "L", "F"):
        return Picture(np.asarray(im if mode == "L" else im.convert("L")))
    if mode in ("LA", "La"):
        la = im.convert("LA")
        return Picture(np.asarray(la.getchannel("L")), np.asarray(la.getchannel("A")))
    if mode in ("RGBA", "RGBa", "PA"):
        rgba = im.convert("RGBA")
        return Picture(np.asarray(rgba.convert("RGB")), np.asarray(rgba.getchannel("A")))
    return Picture(np.asarray(im if mode == "RGB" else im.convert("RGB")))


def upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    """Alpha is not what G learned: it is upscaled bicubically (Pillow), like the paper's
    baseline, so edges of transparency stay smooth and flat regions stay exactly flat."""
    h, w = alpha.shape
    return np.asarray(Image.fromarray(alpha).resize((w * scale, h * scale), Image.BICUBIC))


def upscale_picture(model: nn.Module, picture: Picture, scale: int, tile: int = 0,
                    overlap: int = 8, device: torch.device | str = "cpu",
                    memory_format: torch.memory_format = torch.contiguous_format, *,
                    precision: Precision | None = None,
                    before_tile: TileHook | None = None) -> np.ndarray:
    """Upscale colour with G and alpha bicubically into one uint8 buffer: HxW (grey), HxWx2
    (grey + alpha), HxWx3 (RGB) or HxWx4 (RGBA), the layouts Pillow writes as L/LA/RGB/RGBA.
    `precision` and `before_tile` as in `upscale_image`."""
    lr, alpha = picture.pixels, picture.alpha
    if alpha is None:
        return upscale_image(model, lr, scale, tile, overlap, device, memory_format,
                             precision=precision, before_tile=before_tile)
    grey = lr.ndim == 2
    h, w = lr.shape[:2]
    buf = np.empty((h * scale, w * scale, 2 if grey else 4), np.uint8)
    upscale_image(model, lr, scale, tile, overlap, device, memory_format,
                  out=buf[..., 0] if grey else buf[..., :3], precision=precision,
                  before_tile=before_tile)
    buf[..., -1] = upscale_alpha(alpha, scale)
    return buf


def _as_pil(image: np.ndarray, fmt: str) -> Image.Image:
    has_alpha = image.ndim == 3 and image.shape[2] in (2, 4)
    if fmt == "jpeg" and has_alpha:
        raise ImageError("JPEG has no alpha channel; use --format png or webp for this image")
    im = Image.fromarray(image)
    if fmt == "webp" and im.mode in ("L", "LA"):  # WebP stores colour only
        im = im.convert("RGBA" if has_alpha else "RGB")
    return im


def encode_image(image: np.ndarray, fmt: str = "png") -> bytes:
    """uint8 L/LA/RGB/RGBA array -> encoded bytes (the served model answers PNG)."""
    buffer = io.BytesIO()
    _as_pil(image, fmt).save(buffer, format=fmt.upper(), **_save_options(fmt))
    return buffer.getvalue()


def save_image(image: np.ndarray, path: Path, fmt: str = "png") -> None:
    """Write via a temporary name so a killed process never leaves half a file."""
    im = _as_pil(image, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        im.save(tmp, format=fmt.upper(), **_save_options(fmt))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _save_options(fmt: str) -> dict[str, object]:
    return {"quality": 95} if fmt in ("jpeg", "webp") else {}


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Failure:
    """One input that produced no output; `message` names it and says why."""

    source: str
    message: str

    def __str__(self) -> str:
        return self.message


def collect_inputs(inputs: Sequence[str]) -> tuple[list[Path], list[Failure]]:
    """Files, folders (their images, not recursive) and globs, deduplicated, in given order.

    A named file is tried whatever its suffix (and fails if it is no image); folders and globs
    contribute only files with image suffixes. A name that matches nothing is a failure.
    """
    found: list[Path] = []
    failures: list[Failure] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            matches = list_images(path)
            why = f"folder holds no images ({', '.join(IMAGE_SUFFIXES)})"
        elif path.exists():
            matches, why = [path], ""
        elif any(c in item for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item)
                             if Path(m).is_file() and Path(m).suffix.lower() in IMAGE_SUFFIXES)
            why = "pattern matches no images"
        else:
            matches, why = [], "no such file or folder"
        if not matches:
            failures.append(Failure(item, f"{item}: {why}"))
        found += matches
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values()), failures


def _say(message: str) -> None:
    """A per-file message on stderr that does not break the progress bar."""
    tqdm.write(message, file=sys.stderr)


def upscale_files(model: nn.Module, inputs: Sequence[str], out_dir: Path, *,
                  tile: int = DEFAULT_TILE,
                  overlap: int | None = None, fmt: str = "png",
                  max_pixels: int = DEFAULT_MAX_PIXELS, device: torch.device | str = "cpu",
                  memory_format: torch.memory_format = torch.contiguous_format,
                  precision: Precision | None = None,
                  progress: bool | None = None,
                  report: Callable[[str], None] = _say) -> tuple[list[Path], list[Failure]]:
    """Upscale every input image into out_dir/<input stem>.<fmt>; one bad file never stops the
    rest. Returns (written, failures); each failure also goes to `report` as it happens.

    `overlap` None means `default_overlap(model)`. Two inputs that would write the same
    output, or an output that would overwrite an input, fail. `progress` None shows the bar
    only on a terminal. NonFiniteOutput is the model's fault, not the file's: it stops all.
    """
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"format must be one of {sorted(OUTPUT_FORMATS)}, got {fmt!r}")
    scale = model_scale(model)
    if overlap is None:
        overlap = default_overlap(model)
    files, failures = collect_inputs(inputs)
    for failure in failures:
        report(str(failure))
    written: list[Path] = []
    claimed: dict[Path, Path] = {}
    sources = {p.resolve() for p in files}
    for source in tqdm(files, desc="upscale", unit="img",
                       disable=None if progress is None else not progress):
        target = out_dir / (source.stem + OUTPUT_FORMATS[fmt])
        try:
            if target.resolve() in sources:
                raise ImageError(f"output {target} would overwrite an input; choose another "
                                 "-o folder")
            if target.resolve() in claimed:
                raise ImageError(f"output {target} is already written from "
                                 f"{claimed[target.resolve()]}; upscale one of them separately")
            picture = decode_image(source, max_pixels)
            image = upscale_picture(model, picture, scale, tile, overlap, device, memory_format,
                                    precision=precision)
            del picture
            save_image(image, target, fmt)
        except (ImageError, OSError, MemoryError, torch.OutOfMemoryError) as err:
            text = str(err)
            failures.append(Failure(str(source), text if text.startswith(str(source))
                                    else f"{source}: {text}"))
            report(failures[-1].message)
            continue
        claimed[target.resolve()] = source
        written.append(target)
    return written, failures


# ------------------------------------------------------------------- loading, the command


@dataclass
class LoadedGenerators:
    """What a --model names, on the CPU: the generator, the SRResNet to blend it with (None
    when not needed or not there) and the alpha a request without one gets."""

    generator: nn.Module
    srresnet: nn.Module | None
    default_alpha: float
    source: str


def is_registry_uri(model: str) -> bool:
    return model.startswith(("models:/", "runs:/"))


def load_generators(model: str, srresnet: str | None = None,
                    base: str = "skip") -> LoadedGenerators:
    """The generator `model` names (models:/..., runs:/... or a .pt) and, by `base`, its
    SRResNet: "skip" (not loaded), "if_present" or "required" (a missing one is a UserError).

    A registered srgan carries the SRResNet it was fine-tuned from and its default alpha
    (tracking.serve_alpha when it was registered); beside a .pt the SRResNet is `srresnet`,
    else srresnet.pt in the same folder, and the default alpha is 1 (the file itself).
    """
    from srcore.stages import UserError
    from srcore.training.checkpoints import load_generator_file

    if is_registry_uri(model):
        from srcore import tracking  # mlflow only when the model is in its registry

        if srresnet is not None:
            raise UserError(f"--srresnet {srresnet}: a registered model carries its own "
                            "SRResNet; use --srresnet only with a .pt --model")
        if tracking.local_store_missing():
            raise UserError(f"{model}: no mlflow.db here; run from the project root, set "
                            "MLFLOW_TRACKING_URI, or pass --model models/srgan.pt")
        try:
            if base == "skip":
                return LoadedGenerators(tracking.load_generator(model), None, 1.0, model)
            served = tracking.load_served_generators(model)
        except tracking.RegistryError as err:
            raise UserError(str(err)) from None
        if served.srresnet is None and base == "required":
            raise UserError(f"{model}: carries no SRResNet to blend with (not an srgan, or "
                            "registered before srgan versions carried theirs); use --model "
                            "models/srgan.pt --srresnet models/srresnet.pt, or drop --alpha")
        return LoadedGenerators(served.generator, served.srresnet, served.default_alpha, model)
    path = Path(model)
    generator = load_generator_file(path)
    base_path = Path(srresnet) if srresnet is not None else path.with_name("srresnet.pt")
    found = None
    if base != "skip":
        if base_path.is_file():
            found = load_generator_file(base_path)
        elif base == "required" or srresnet is not None:
            raise UserError(f"{base_path}: missing; blending (--alpha) needs the SRResNet "
                            f"that {path} was fine-tuned from: pass --srresnet PATH")
    return LoadedGenerators(generator, found, 1.0, str(path))


def upscale_command(inputs: Sequence[str], output: str, *, model: str, tile: int,
                    overlap: int | None, fmt: str, max_pixels: int, device: str,
                    channels_last: bool, alpha: float | None = None,
                    srresnet: str | None = None, precision: str = "auto") -> int:
    """`srgan upscale`: images upscaled with a registered or saved generator; returns the exit
    status, min(failures, 100), so 0 means every image was written.

    Not a pipeline stage: it reads no params.yaml. Bad inputs are reported one by one and the
    rest still run; `model` is models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a .pt.
    `alpha` (0 SRResNet .. 1 SRGAN) blends the SRGAN with the SRResNet it came from; without
    it the generator runs as it is. `precision` (auto | bf16 | fp32) is said once on stderr.
    """
    from srcore.models.interpolate import IncompatibleGenerators
    from srcore.precision import resolve
    from srcore.stages import UserError
    from srcore.training.runtime import resolve_device

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; -o takes a folder for the upscaled images")
    if alpha is not None:
        alpha = _alpha_option(alpha)
    try:
        where = resolve_device(device)
    except RuntimeError as err:
        raise UserError(f"--device cuda: {err}") from None
    loaded = load_generators(model, srresnet, "skip" if alpha is None else "required")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    chosen = resolve(precision, where)
    generator = _placed(loaded.generator, where, memory_format)
    if alpha is not None:  # one blend (exact at 0 and 1); load_generators made sure of the base
        from srcore.models.interpolate import blend

        base = _placed(loaded.srresnet, where, memory_format)
        try:
            generator = blend(base, generator, alpha).eval()
        except IncompatibleGenerators as err:
            raise UserError(f"{loaded.source}: its SRResNet cannot be blended with it: "
                            f"{err}") from None
    generator = for_inference(generator, chosen, memory_format)
    print(f"upscale: {chosen.describe()}", file=sys.stderr)
    try:
        written, failures = upscale_files(
            generator, inputs, out, tile=tile, overlap=overlap, fmt=fmt,
            max_pixels=max_pixels, device=where, memory_format=memory_format,
            precision=chosen)
    except NonFiniteOutput as err:
        raise UserError(f"{loaded.source}: {err}") from None
    total = len(written) + len(failures)
    print(f"srgan upscale: wrote {len(written)} of {total} image(s) to {output}"
          + (f"; {len(failures)} failed: " + ", ".join(f.source for f in failures)
             if failures else ""))
    return min(len(failures), 100)


def _alpha_option(alpha: float) -> float:
    from srcore.stages import UserError

    try:
        return check_alpha(alpha, "--alpha")
    except ValueError as err:
        raise UserError(str(err)) from None


def _placed(model: nn.Module, device: torch.device, fmt: torch.memory_format) -> nn.Module:
    return model.to(device).to(memory_format=fmt).eval()
