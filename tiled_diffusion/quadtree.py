"""Init image -> detail map -> quadtree over the latent grid."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

LATENT_SCALE = 8  # image pixels per latent pixel

# A pixel's detail is how much its grey level differs from its four neighbours (mean
# absolute difference, 0-255 scale, after the contrast stretch below): up to DETAIL_RAMP[0]
# is flat (sensor noise, JPEG grain, smooth gradients), from DETAIL_RAMP[1] on it is fully
# detailed, linear in between. Chosen by measurement on 14 photographs and on text and
# a face pasted on a sky (benchmarks/bench_detail.py).
DETAIL_RAMP = (6.0, 20.0)
# The contrast stretch maps the 1st..99th percentile of the luminance to 0..255, at most
# this many times: a low-contrast (hazy, dark) photo reads like a crisp one, while an
# almost uniform picture does not have its noise amplified into "detail".
MAX_STRETCH = 4.0
# A tile splits only if it holds more detailed pixels than this many lines of pixels across
# it, whatever the threshold: a sharp step between two flat areas is detailed along a line
# about 2 px wide (4-6 px once upscaled), so a few steps or a smooth gradient never split
# a tile, while a face or text gives 10-40 such lines even in a 512 px tile.
FLAT_LINES = 8.0
ROWS_AT_ONCE = 128  # the detail map is computed in bands of rows so temporaries stay in cache


@dataclass(frozen=True)
class Region:
    """A rectangle on the latent grid, in latent pixels."""

    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class Node:
    """A quadtree node: its region, its detail (share of detailed pixels, 0..1) and children."""

    region: Region
    detail: float
    children: tuple[Node, ...] = ()

    def leaves(self) -> Iterator[Node]:
        """The leaves below this node, in reading order within each node."""
        if not self.children:
            yield self
        for child in self.children:
            yield from child.leaves()


def to_rgb_array(image) -> np.ndarray:
    """A PIL image or an array of any common layout as HxWx3 uint8."""
    if isinstance(image, Image.Image):
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            array = np.asarray(image, dtype=np.float64)
            image = Image.fromarray(_to_uint8(array))
        array = np.asarray(image.convert("RGB"))
    else:
        array = np.asarray(image)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(f"image: expected HxW, HxWx3 or HxWx4, got shape {array.shape}")
        if array.dtype != np.uint8:
            array = _to_uint8(array.astype(np.float64))
        array = np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[..., :3]
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image: it is empty ({array.shape[1]}x{array.shape[0]} px)")
    return np.ascontiguousarray(array)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Floats in 0..1 or 16-bit/other integers scaled to 0..255."""
    if not np.isfinite(array).all():
        raise ValueError("image: it contains NaN or infinite values")
    top = array.max(initial=0.0)
    scale = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
    return np.clip(np.round(array / scale * 255.0), 0, 255).astype(np.uint8)


def detail_density(image) -> np.ndarray:
    """Per-pixel fine detail of an image at its own resolution, HxW float32 in 0..1.

    Measured on the full-resolution luminance, so structure finer than a latent pixel
    (letters, hair, foliage, fabric) counts. A step between two flat areas is detailed
    only along its line, so a tile's share of detailed pixels stays small there, while
    texture, text and faces fill whole areas with it.
    """
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    sample = _luminance(rgb[:: max(1, height // 512), :: max(1, width // 512)])
    low, high = np.percentile(sample, [1, 99])
    gain = min(255.0 / max(high - low, 1e-6), MAX_STRETCH)
    density = np.empty((height, width), dtype=np.float32)
    for top in range(0, height, ROWS_AT_ONCE):  # in bands of rows: the temporaries stay in cache
        first, last = max(top - 1, 0), min(top + ROWS_AT_ONCE + 1, height)
        change = _change(_luminance(rgb[first:last]) * np.float32(gain))
        density[top : top + ROWS_AT_ONCE] = change[top - first : top - first + ROWS_AT_ONCE]
    low, high = DETAIL_RAMP
    density -= low
    density *= 1 / (high - low)
    return np.clip(density, 0.0, 1.0, out=density)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _change(luma: np.ndarray) -> np.ndarray:
    """A quarter of the absolute differences of each pixel to its four neighbours summed (a
    neighbour beyond the image border counts as no difference)."""
    change = np.zeros_like(luma)
    across, down = np.abs(np.diff(luma, axis=1)), np.abs(np.diff(luma, axis=0))
    change[:, :-1] += across
    change[:, 1:] += across
    change[:-1] += down
    change[1:] += down
    change *= 0.25
    return change


def detail_grid(image, latent_size: tuple[int, int]) -> np.ndarray:
    """The detail density averaged onto the latent grid, [h, w] float64.

    The image may have any size: its own pixels are measured and the map is then scaled
    to the grid, so an init image smaller than the job (an upscale) is measured at its
    native sharpness rather than after the resize has softened it.
    """
    height, width = latent_size
    density = Image.fromarray(detail_density(image), mode="F")
    shrinking = density.width >= width and density.height >= height
    resample = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(density.resize((width, height), resample), dtype=np.float64)


def _halves(size: int, align: int) -> tuple[int, int]:
    first = (size // 2) // align * align
    return first, size - first


def build_quadtree(
    detail: np.ndarray,
    threshold_percent: float,
    min_side: int,
    max_side: int,
    align: int = 1,
) -> Node:
    """The quadtree over the latent grid of `detail` (a detail_grid), as its root node.

    A node splits while its detail exceeds `threshold_percent` of the whole image's (and
    FLAT_LINES lines across it) and both halves keep at least `min_side`; a node longer than `max_side`
    always splits. Relative, so that a busy photo and a sparse one both get an adaptive
    tree, and a child that is flatter than the image stops splitting at once even when
    its sibling is detailed. A node at least twice as long as it is wide splits across
    its long side only, so strips and wide images get square-ish tiles.
    """
    height, width = detail.shape[:2]
    table = np.zeros((height + 1, width + 1))
    table[1:, 1:] = detail.cumsum(0).cumsum(1)  # summed-area table: any node's mean in O(1)

    def mean(r: Region) -> float:
        total = table[r.y + r.h, r.x + r.w] - table[r.y, r.x + r.w] - table[r.y + r.h, r.x] + table[r.y, r.x]
        return float(total / (r.w * r.h))

    root = Region(0, 0, width, height)
    relative = threshold_percent / 100 * mean(root)

    def grow(r: Region) -> Node:
        d = mean(r)
        threshold = max(relative, FLAT_LINES / (LATENT_SCALE * (r.w * r.h) ** 0.5))
        split_x = _split_axis(r.w, r.h, d, threshold, min_side, max_side, align)
        split_y = _split_axis(r.h, r.w, d, threshold, min_side, max_side, align)
        if not (split_x or split_y):
            return Node(r, d)
        xs = list(zip((r.x, r.x + _halves(r.w, align)[0]), _halves(r.w, align))) if split_x else [(r.x, r.w)]
        ys = list(zip((r.y, r.y + _halves(r.h, align)[0]), _halves(r.h, align))) if split_y else [(r.y, r.h)]
        return Node(r, d, tuple(grow(Region(x, y, w, h)) for y, h in ys for x, w in xs))

    return grow(root)


def _split_axis(
    side: int, other: int, detail: float, threshold: float, min_side: int, max_side: int, align: int
) -> bool:
    """Whether a node splits across this side."""
    first, second = _halves(side, align)
    if first < max(align, 1):
        return False
    if side > max_side:
        return True
    if 2 * side <= other or min(first, second) < min_side:
        return False  # a short side of an elongated node, or halves below the minimum
    return detail > threshold


def latent_as_image(latent) -> np.ndarray:
    """A stand-in picture of a latent [C, H, W] (C >= 3) for measuring detail, HxWx3 uint8.

    Used where no decoded image exists (the hires-fix pass starts from a latent). The
    first three channels of SD-family latents carry most of the luminance and colour;
    the picture has one pixel per latent pixel, so only detail at the latent scale shows.
    """
    if hasattr(latent, "detach"):
        latent = latent.detach().float().cpu()
    channels = np.asarray(latent, dtype=np.float64)
    if channels.ndim != 3 or channels.shape[0] < 3:
        raise ValueError(f"latent: expected [C, H, W] with C >= 3, got shape {channels.shape}")
    rgb = channels[:3].transpose(1, 2, 0)
    low, high = rgb.min(), rgb.max()
    return np.uint8(np.round((rgb - low) / max(high - low, 1e-12) * 255))
