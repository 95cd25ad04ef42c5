"""What `srgan upscale` and the served model accept and answer: the size limit, the tiling
defaults, the output formats and the base64 wire format of one image.

Light on purpose (no torch, no mlflow at import): the CLI's parser shows these defaults, and
`srgan --help` should not pay two seconds of torch import for them. The MLflow side of serving
(the pyfunc flavor that `mlflow models serve` loads) is in srcore/tracking.py, the only module
that imports mlflow; the pixels are computed by srcore/upscale.py.
"""

from __future__ import annotations

import base64
import binascii
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


def upscale_base64(model: Any, text: str, name: str, tile: int = DEFAULT_TILE,
                   overlap: int | None = None, device: str = "cpu",
                   memory_format: Any = None) -> str:
    """One base64 image (PNG, JPEG, WebP, ...) in, the base64 PNG `srgan upscale` would write
    out. Raises ImageError, naming `name`, for anything that is not a usable image.
    `memory_format` is the model's (torch.channels_last or, when None, contiguous)."""
    import torch

    from srcore.data.images import ImageError
    from srcore.upscale import (
        decode_image,
        default_overlap,
        encode_image,
        model_scale,
        upscale_picture,
    )

    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError) as err:
        raise ImageError(f"{name}: not base64 ({err})") from None
    picture = decode_image(raw, DEFAULT_MAX_PIXELS, name=name)
    overlap = default_overlap(model) if overlap is None else overlap
    image = upscale_picture(model, picture, model_scale(model), tile, overlap, device,
                            memory_format or torch.contiguous_format)
    return base64.b64encode(encode_image(image)).decode("ascii")
