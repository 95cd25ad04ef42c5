"""What `srgan upscale` and the served model accept and answer: the size limit, the tiling
defaults, the output formats, the base64 wire format of one image, and the server's admission
defaults (`srgan serve`).

Light on purpose (no torch, no mlflow at import): the CLI's parser shows these defaults, and
`srgan --help` should not pay two seconds of torch import for them. The MLflow side of serving
(the pyfunc flavor that `mlflow models serve` loads) is in srcore/tracking.py, the only module
that imports mlflow; `srgan serve` is srcore/server.py; the pixels are computed by
srcore/upscale.py.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any

#: Largest input accepted, in LR pixels (4096 x 4096; the x4 output is then 805 MB as uint8
#: RGB). Pillow's own decompression-bomb guard stays on above it.
DEFAULT_MAX_PIXELS = 4096 * 4096
#: LR tile side: bounds memory by the tile, not the image (0 = whole image).
DEFAULT_TILE = 256
#: LR context per tile side. Exactness needs the receptive radius (40 for the paper's 16
#: blocks), but a pixel's dependence on far context decays fast: on Set14 with the paper-size
#: generator, 16 leaves a few pixels per megapixel one grey level off (mean |diff| ~1e-8 of
#: the range), and tile 256 then costs 1.27x the whole-image compute instead of 1.72x.
DEFAULT_OVERLAP = 16
#: Output formats of `srgan upscale` and their file suffixes; PNG is lossless and the default.
OUTPUT_FORMATS = {"png": ".png", "webp": ".webp", "jpeg": ".jpg"}
#: The served model's input and output column: base64-encoded images in, base64 PNGs out.
IMAGE_COLUMN = "image"
#: srcore.precision.SETTINGS, here so the CLI can list them without importing torch.
PRECISIONS = ("auto", "bf16", "fp32")
#: Blended generators (distinct alphas) a served model keeps; each is one network's weights
#: (6 MB for the paper's generator), and a request never re-blends one of these.
BLEND_CACHE_SIZE = 4
#: `srgan serve`: forwards at once. One forward already uses every CPU core, so a second
#: only splits them and doubles peak memory.
DEFAULT_SLOTS = 1
#: `srgan serve`: admitted requests that may wait for a slot; beyond slots + queue a request
#: is refused at once (503 + Retry-After) instead of waiting past its client's patience.
DEFAULT_QUEUE = 2
#: `srgan serve`: seconds from arrival (waiting included) after which a request is answered
#: 504 and its work stops at the next tile. MLflow's gunicorn/uvicorn default is 60.
DEFAULT_TIMEOUT_S = 60.0
#: `srgan serve`: largest request body: a base64 PNG of a DEFAULT_MAX_PIXELS RGB image that
#: does not compress at all, plus JSON.
DEFAULT_MAX_BODY_BYTES = (DEFAULT_MAX_PIXELS * 3 + (1 << 20)) * 4 // 3


def decode_base64(text: Any, name: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                  limit_hint: str | None = None) -> Any:
    """One base64 image (PNG, JPEG, WebP, ...) -> srcore.upscale.Picture, its size checked
    from the header first. Raises ImageError, naming `name`, for anything unusable."""
    from srcore.data.images import ImageError
    from srcore.upscale import LIMIT_HINT, decode_image

    if not isinstance(text, str | bytes):
        raise ImageError(f"{name}: expected a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError) as err:
        raise ImageError(f"{name}: not base64 ({err})") from None
    return decode_image(raw, max_pixels, name=name, limit_hint=limit_hint or LIMIT_HINT)


def upscale_to_png_base64(model: Any, picture: Any, tile: int = DEFAULT_TILE,
                          overlap: int | None = None, device: str = "cpu",
                          memory_format: Any = None, *, precision: Any = None,
                          before_tile: Any = None) -> bytes:
    """A decoded Picture -> the base64 (ASCII bytes) of the PNG `srgan upscale` would write.
    Each full-size buffer is dropped as soon as the next exists: the uint8 output (576 MB for
    a 4000x3000 input) before the base64 copy of its PNG is made."""
    import torch

    from srcore.upscale import default_overlap, encode_image, model_scale, upscale_picture

    overlap = default_overlap(model) if overlap is None else overlap
    image = upscale_picture(model, picture, model_scale(model), tile, overlap, device,
                            memory_format or torch.contiguous_format, precision=precision,
                            before_tile=before_tile)
    encoded = encode_image(image)
    del image
    return base64.b64encode(encoded)


def upscale_base64(model: Any, text: str, name: str, tile: int = DEFAULT_TILE,
                   overlap: int | None = None, device: str = "cpu",
                   memory_format: Any = None, *, precision: Any = None) -> str:
    """One base64 image (PNG, JPEG, WebP, ...) in, the base64 PNG `srgan upscale` would write
    out. Raises ImageError, naming `name`, for anything that is not a usable image.
    `memory_format` is the model's (torch.channels_last or, when None, contiguous);
    `precision` (srcore.precision.Precision; None = fp32) as in upscale_image."""
    picture = decode_base64(text, name)
    return upscale_to_png_base64(model, picture, tile, overlap, device, memory_format,
                                 precision=precision).decode("ascii")


def request_params(params: Any) -> tuple[float | None, int]:
    """(alpha, tile) from a request's `params`, checked as a hostile client's would be: alpha
    a number in [0, 1] or absent (the model's default), tile a whole number >= 0.
    Raises ValueError with the parameter's name."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ValueError(f"params must be an object such as {{\"alpha\": 0.5, \"tile\": "
                         f"{DEFAULT_TILE}}}, got {type(params).__name__}")
    alpha = params.get("alpha")
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) \
                or not math.isfinite(alpha) or not 0 <= alpha <= 1:
            raise ValueError(f"params.alpha must be a number from 0 (SRResNet) to 1 (SRGAN), "
                             f"got {alpha!r}")
        alpha = float(alpha)
    tile = params.get("tile", DEFAULT_TILE)
    if isinstance(tile, float) and tile.is_integer():
        tile = int(tile)
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0:
        raise ValueError(f"params.tile must be a whole number >= 0 (0 = whole image), "
                         f"got {tile!r}")
    return alpha, tile


class BodyTooLarge(Exception):
    """A request body over its limit; `size` is what it declared or what was read so far."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.size = size


async def read_limited_body(request: Any, limit: int, *,
                            refuse_bad_length: bool = False) -> bytes:
    """A request's body (srgan serve, srgan rate), refused from its Content-Length before any
    byte is read when that is over `limit`, and again while reading, since a client may send
    more than it declares. `refuse_bad_length`: a Content-Length that is no number is refused
    too (size -1)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(int(declared))
        if refuse_bad_length and not declared.isdigit():
            raise BodyTooLarge(-1)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size)
        chunks.append(chunk)
    return b"".join(chunks)
