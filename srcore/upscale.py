"""Inference on images of any size: whole-image or tiled with overlap, shared by eval, the CLI
(`srgan upscale`) and the served model; srcore/serving.py holds their shared defaults.

Tiling bounds memory by the tile, not the image. It is exact, not approximate, once every tile
carries at least the generator's receptive-field radius of context on each inner edge: each
tile's output is then cropped to its core, whose pixels saw the same inputs (and the same zero
padding at true image borders) as whole-image inference.
"""

from __future__ import annotations

import contextlib
import glob
import io
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from tqdm import tqdm

from srcore.data.images import IMAGE_SUFFIXES, ImageError, list_images, to_rgb
from srcore.serving import DEFAULT_MAX_PIXELS, DEFAULT_OVERLAP, DEFAULT_TILE, OUTPUT_FORMATS


def lr_to_tensor(lr: np.ndarray, device: torch.device | str = "cpu",
                 memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 HxW(x3) -> float (1,3,H,W) in [0, 1], the generator's input range."""
    rgb = np.require(to_rgb(lr), requirements=["C", "W"])  # torch refuses read-only arrays
    t = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    return t.to(device, memory_format=memory_format)


def _to_uint8(sr: torch.Tensor, grey: bool) -> np.ndarray:
    """(1,3,H,W) in [-1, 1] -> uint8 HxWx3, or HxW luma; converted on the model's device so
    only uint8 crosses to the host."""
    img = ((sr[0].detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
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
                  out: np.ndarray | None = None) -> np.ndarray:
    """uint8 LR -> uint8 SR, tile by tile; a grey input gives a grey output.

    Each tile is converted to float on the device and its core back to uint8 before the next
    one runs, so memory holds one tile's activations plus the uint8 result: a float32 SR of a
    4000x3000 input alone would be 2.3 GB, its uint8 576 MB. `out` (a view of the right shape,
    e.g. the colour channels of an RGBA buffer) receives the result instead of a new array.
    Tile, overlap and eval mode as in `upscale_tensor`, whose pixels this matches exactly.
    """
    grey = lr.ndim == 2
    h, w = lr.shape[:2]
    shape = (h * scale, w * scale) if grey else (h * scale, w * scale, 3)
    if out is None:
        out = np.empty(shape, np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {shape}, got {out.dtype} {out.shape}")
    with _eval_mode(model):
        for core, window in _tiles(h, w, tile, overlap):
            y0, y1, x0, x1 = window
            sr = model(lr_to_tensor(lr[y0:y1, x0:x1], device, memory_format))
            y, ye, x, xe = core
            out[y * scale:ye * scale, x * scale:xe * scale] = _to_uint8(
                _core(sr, core, window, scale), grey)
            del sr  # free this tile's output before the next tile allocates its own
    return out


# ------------------------------------------------------------------- files and encodings


@dataclass(frozen=True)
class Picture:
    """A decoded image as the generator takes it: colour (HxWx3 RGB or HxW grey) and alpha."""

    pixels: np.ndarray
    alpha: np.ndarray | None = None


def decode_image(source: Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                 name: str | None = None) -> Picture:
    """Decode a file or encoded bytes (PNG, JPEG, WebP, ...) into colour and alpha.

    The size is checked against `max_pixels` from the header, before any pixel is decoded, so
    a huge or hostile file costs nothing; Pillow's decompression-bomb guard stays on above it.
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
                raise ImageError(
                    f"{label}: {w}x{h} = {w * h:,} pixels is over the limit of "
                    f"{max_pixels:,}; split it or raise the limit (srgan upscale "
                    f"--max-pixels; its x4 RGB output alone is {w * h * 48 / 1e9:.1f} GB)")
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            return _split_alpha(im)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"{label}: cannot be decoded as an image ({err})") from None


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
                    memory_format: torch.memory_format = torch.contiguous_format) -> np.ndarray:
    """Upscale colour with G and alpha bicubically into one uint8 buffer: HxW (grey), HxWx2
    (grey + alpha), HxWx3 (RGB) or HxWx4 (RGBA), the layouts Pillow writes as L/LA/RGB/RGBA."""
    lr, alpha = picture.pixels, picture.alpha
    if alpha is None:
        return upscale_image(model, lr, scale, tile, overlap, device, memory_format)
    grey = lr.ndim == 2
    h, w = lr.shape[:2]
    buf = np.empty((h * scale, w * scale, 2 if grey else 4), np.uint8)
    upscale_image(model, lr, scale, tile, overlap, device, memory_format,
                  out=buf[..., 0] if grey else buf[..., :3])
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
                  progress: bool | None = None,
                  report: Callable[[str], None] = _say) -> tuple[list[Path], list[Failure]]:
    """Upscale every input image into out_dir/<input stem>.<fmt>; one bad file never stops the
    rest. Returns (written, failures); each failure also goes to `report` as it happens.

    `overlap` None means `default_overlap(model)`. Two inputs that would write the same
    output, or an output that would overwrite an input, fail. `progress` None shows the bar
    only on a terminal.
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
            image = upscale_picture(model, picture, scale, tile, overlap, device, memory_format)
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


def upscale_command(inputs: Sequence[str], output: str, *, model: str, tile: int,
                    overlap: int | None, fmt: str, max_pixels: int, device: str,
                    channels_last: bool) -> int:
    """`srgan upscale`: images upscaled with a registered or saved generator; returns the exit
    status, min(failures, 100), so 0 means every image was written.

    Not a pipeline stage: it reads no params.yaml. Bad inputs are reported one by one and the
    rest still run; `model` is models:/NAME@ALIAS, models:/NAME/VERSION, runs:/... or a .pt.
    """
    from srcore import tracking
    from srcore.stages import UserError
    from srcore.training.checkpoints import load_generator_file
    from srcore.training.runtime import resolve_device

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; -o takes a folder for the upscaled images")
    if model.startswith(("models:/", "runs:/")):
        uri = tracking.tracking_uri()
        if uri == tracking.DEFAULT_URI and not Path("mlflow.db").is_file():
            raise UserError(f"{model}: no mlflow.db here; run from the project root, set "
                            "MLFLOW_TRACKING_URI, or pass --model models/srgan.pt")
        try:
            generator = tracking.load_generator(model)
        except tracking.RegistryError as err:
            raise UserError(str(err)) from None
    else:
        generator = load_generator_file(Path(model))
    try:
        where = resolve_device(device)
    except RuntimeError as err:
        raise UserError(f"--device cuda: {err}") from None
    generator = generator.to(where).eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    generator = generator.to(memory_format=memory_format)
    written, failures = upscale_files(
        generator, inputs, out, tile=tile, overlap=overlap, fmt=fmt, max_pixels=max_pixels,
        device=where, memory_format=memory_format)
    total = len(written) + len(failures)
    print(f"srgan upscale: wrote {len(written)} of {total} image(s) to {output}"
          + (f"; {len(failures)} failed: " + ", ".join(f.source for f in failures)
             if failures else ""))
    return min(len(failures), 100)
