"""Screenshots as the model sees them: scaled down, encoded, and mapped back to the screen.

A full-size PNG is hundreds of KB of base64 per step; the model gets the
screen scaled to fit a configured box, as JPEG or PNG, and its coordinates
(pixels of that image, or a 0..N grid for models trained on one) are mapped
back to screen pixels and clamped to the screen. Decoding and encoding take
tens of milliseconds, so they run in a worker thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import io

import attrs
from PIL import Image

from agent.model import ModelConfig
from sandboxes.base import png_size

#: The box a step's thumbnail fits in (a few KiB of JPEG for the session's log).
THUMBNAIL_BOX = (160, 160)
JPEG_QUALITY = 80
THUMBNAIL_QUALITY = 45


@attrs.frozen(kw_only=True)
class Frame:
    """One screenshot as sent to the model, and how to map its coordinates back."""

    #: ``data:`` URL of the image the model sees.
    url: str
    width: int
    height: int
    screen_width: int
    screen_height: int
    #: ``data:`` URL of a small JPEG for the step's log event (None if the PNG could not be read).
    thumbnail: str | None
    #: 0: coordinates are pixels of the image; N: a 0..N grid over it.
    grid: int = 0

    def to_screen(self, x: float, y: float) -> tuple[int, int]:
        """Screen pixel for the model's (x, y), clamped to the screen."""
        return (
            _map(x, self.grid or self.width, self.screen_width),
            _map(y, self.grid or self.height, self.screen_height),
        )

    def describe(self) -> str:
        """How the model should give coordinates on this image."""
        if self.grid:
            return f"Give coordinates on a 0-{self.grid} grid over the image, (0, 0) at its top left."
        if self.width:
            return f"It is {self.width}x{self.height} pixels."
        return ""


def _map(value: float, scale: int, screen: int) -> int:
    if scale <= 0 or screen <= 0:
        return max(0, round(value))
    return min(max(0, round(value * screen / scale)), screen - 1)


async def frame(png: bytes, model: ModelConfig) -> Frame:
    """*png* scaled and encoded for *model*, off the event loop."""
    return await asyncio.to_thread(make_frame, png, model)


def make_frame(png: bytes, model: ModelConfig) -> Frame:
    """*png* scaled to fit the model's box and encoded as it asks; as-is if Pillow cannot read it."""
    try:
        with Image.open(io.BytesIO(png)) as image:
            image.load()
            screen = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        width, height = png_size(png)
        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        return Frame(
            url=url,
            width=width,
            height=height,
            screen_width=width,
            screen_height=height,
            thumbnail=None,
            grid=model.coordinate_grid,
        )
    shown = _fit(screen, (model.image_width, model.image_height))
    if shown is screen and model.image_format == "png" and png.startswith(b"\x89PNG"):
        url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")  # no need to encode again
    else:
        url = _data_url(shown, model.image_format, JPEG_QUALITY)
    return Frame(
        url=url,
        width=shown.width,
        height=shown.height,
        screen_width=screen.width,
        screen_height=screen.height,
        thumbnail=_data_url(_fit(shown, THUMBNAIL_BOX), "jpeg", THUMBNAIL_QUALITY),
        grid=model.coordinate_grid,
    )


def _fit(image: Image.Image, box: tuple[int, int]) -> Image.Image:
    if image.width <= box[0] and image.height <= box[1]:
        return image
    scaled = image.copy()
    scaled.thumbnail(box, Image.Resampling.LANCZOS)
    return scaled


def _data_url(image: Image.Image, kind: str, quality: int) -> str:
    out = io.BytesIO()
    if kind == "jpeg":
        image.save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format="PNG", optimize=False)
    return f"data:image/{kind};base64," + base64.b64encode(out.getvalue()).decode("ascii")
