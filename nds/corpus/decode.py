"""Image bytes -> pixels, the one way server and client both do it (no torch).

``decode_image`` turns an object's bytes into an RGB ``PIL.Image`` at its native size, refusing
what cannot be used with a typed error (``UnusableImageError`` and its subclasses carry the
``reason`` a registration counts); ``to_array`` brings any image to a square ``uint8`` array.
Registration checks every object with ``decode_image``; extraction and the client's
``nds.client.images`` both go through ``decode_image`` + ``to_array``, so a client image and
a source image of the same bytes become the same pixels.

The rules:

- the first frame of an animation; the EXIF orientation applied (phone photos store it there);
- 16-bit grey keeps its range (divided by 257), alpha is composited on white, any other mode
  converted to RGB;
- ``to_array``: an image already ``size`` x ``size`` is used pixel for pixel (so a corpus image
  hashes to its catalog ``sha256``); any other size is resized with Pillow ``BILINEAR``
  (antialiased when shrinking) so its longer side is ``size``, keeping the aspect ratio, then
  centred on a white square canvas.
"""

from __future__ import annotations

import io

import numpy as np

from nds.errors import InvalidInputError

#: File name extensions taken as images in a folder or a bucket (lower case, as torchvision's ImageFolder).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
#: Largest width * height decoded. 50 MP covers any camera; a larger header is far more
#: likely a decompression bomb (a few KB of PNG that inflates to gigabytes) than a photo.
MAX_PIXELS = 50_000_000
#: Colour that alpha is composited on and that non-square images are padded with.
BACKGROUND = (255, 255, 255)


class UnusableImageError(InvalidInputError):
    """Bytes that cannot be used as an image; ``reason`` names the kind (counted per source)."""

    reason = "corrupt"


class NotAnImageError(UnusableImageError):
    """Empty, or not in any image format Pillow reads."""

    reason = "not_image"


class CorruptImageError(UnusableImageError):
    """An image format whose data is truncated or damaged."""

    reason = "corrupt"


class ImageTooLargeError(UnusableImageError):
    """More pixels than allowed: a possible decompression bomb, refused before decoding."""

    reason = "too_large"


def decode_image(data: bytes, *, max_pixels: int = MAX_PIXELS):
    """The bytes of one image file -> an RGB ``PIL.Image`` at its native size (rules in the module doc).

    The size in the header is checked against ``max_pixels`` before any pixel is decoded.
    Raises NotAnImageError, CorruptImageError or ImageTooLargeError (all UnusableImageError).
    Thread-safe: Pillow's global pixel limit is neither read nor changed.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise NotAnImageError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            w, h = im.size
            if w * h > max_pixels:
                raise ImageTooLargeError(f"{w}x{h} pixels exceeds max_pixels={max_pixels} (possible decompression bomb)")
            im.seek(0)  # first frame of an animation
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    except UnusableImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError:
        raise NotAnImageError("not a readable image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise CorruptImageError(f"corrupt image ({type(exc).__name__}: {exc})") from exc


def to_rgb(image):
    """A PIL image of any mode -> RGB: 16-bit grey rescaled, alpha composited on white."""
    from PIL import Image

    if image.mode.startswith("I;16"):
        # 16-bit grey: keep the top 8 bits' worth of range instead of clipping at 255.
        grey = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    ) or (image.mode in ("L", "RGB") and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def to_array(image, size: int) -> np.ndarray:
    """A PIL image of any mode and size -> ``(size, size, 3) uint8`` (rules in the module doc)."""
    from PIL import Image

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidInputError(f"image size must be a positive integer, got {size!r}")
    image = to_rgb(image)
    if image.size != (size, size):
        w, h = image.size
        scale = size / max(w, h)
        fitted = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = image.resize(fitted, Image.Resampling.BILINEAR)
        canvas = Image.new("RGB", (size, size), BACKGROUND)
        canvas.paste(small, ((size - fitted[0]) // 2, (size - fitted[1]) // 2))
        image = canvas
    return np.asarray(image, dtype=np.uint8)
