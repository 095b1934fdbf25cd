"""Init image -> quadtree leaves on the latent grid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

LATENT_SCALE = 8  # image pixels per latent pixel


@dataclass(frozen=True)
class Region:
    """A rectangle on the latent grid, in latent pixels."""

    x: int
    y: int
    w: int
    h: int


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


def detail_map(image, latent_size: tuple[int, int]) -> np.ndarray:
    """The image as float64 RGB on the latent grid (one value per latent pixel).

    Detail is measured at this 1/8 resolution: pixel noise and JPEG grain average out,
    so the threshold reads the same for a 512 px and a 4096 px image.
    """
    height, width = latent_size
    rgb = Image.fromarray(to_rgb_array(image))
    downscaling = rgb.width >= width and rgb.height >= height
    resample = Image.Resampling.BOX if downscaling else Image.Resampling.BILINEAR
    return np.asarray(rgb.resize((width, height), resample), dtype=np.float64)


def colour_deviation(pixels: np.ndarray) -> float:
    """RMS colour distance from the region's mean colour: sqrt(var_R + var_G + var_B)."""
    flat = pixels.reshape(-1, 3)
    return float(np.sqrt(((flat - flat.mean(axis=0)) ** 2).sum(axis=1).mean()))


def _halves(size: int, align: int) -> tuple[int, int]:
    first = (size // 2) // align * align
    return first, size - first


# Tiles whose colour deviation is below this (0-255 scale) are flat whatever the threshold:
# it keeps sensor noise and JPEG grain on an almost uniform image from splitting it.
FLAT_DEVIATION = 2.0


def build_quadtree(
    detail: np.ndarray,
    threshold_percent: float,
    min_side: int,
    max_side: int,
    align: int = 1,
) -> list[tuple[Region, float]]:
    """Leaves (with their colour deviation) that partition the latent grid of `detail`.

    A node is split while its deviation exceeds `threshold_percent` of the whole image's
    deviation and both halves keep at least `min_side`; a node longer than `max_side` is
    always split. The threshold is relative because photographs differ more in overall
    contrast than in how their detail is spread: an absolute threshold that makes an
    adaptive tree on a low-contrast photo splits a high-contrast one down to the minimum
    everywhere. A node at least twice as long as it is wide is split across its long
    side only, so strips and wide images get square-ish leaves.
    """
    height, width = detail.shape[:2]
    threshold = max(threshold_percent / 100 * colour_deviation(detail), FLAT_DEVIATION)
    leaves: list[tuple[Region, float]] = []
    stack = [Region(0, 0, width, height)]
    while stack:
        node = stack.pop()
        deviation = colour_deviation(detail[node.y : node.y + node.h, node.x : node.x + node.w])
        split_x = _split_axis(node.w, node.h, deviation, threshold, min_side, max_side, align)
        split_y = _split_axis(node.h, node.w, deviation, threshold, min_side, max_side, align)
        if not (split_x or split_y):
            leaves.append((node, deviation))
            continue
        xs = (
            list(zip((node.x, node.x + _halves(node.w, align)[0]), _halves(node.w, align)))
            if split_x
            else [(node.x, node.w)]
        )
        ys = (
            list(zip((node.y, node.y + _halves(node.h, align)[0]), _halves(node.h, align)))
            if split_y
            else [(node.y, node.h)]
        )
        # Pushed in reverse so leaves come out in reading order within each node.
        stack.extend(Region(x, y, w, h) for y, h in reversed(ys) for x, w in reversed(xs))
    return leaves


def _split_axis(
    side: int, other: int, deviation: float, threshold: float, min_side: int, max_side: int, align: int
) -> bool:
    """Whether a node splits across this side."""
    first, second = _halves(side, align)
    if first < max(align, 1):
        return False
    if side > max_side:
        return True
    if 2 * side <= other or min(first, second) < min_side:
        return False  # a short side of an elongated node, or halves below the minimum
    return deviation > threshold


def latent_as_image(latent) -> np.ndarray:
    """A stand-in picture of a latent [C, H, W] (C >= 3) for measuring detail, HxWx3 uint8.

    Used where no decoded image exists (the hires-fix pass starts from a latent). The
    first three channels of SD-family latents carry most of the luminance and colour, and
    the threshold is relative to the whole picture, so their own scale does not matter.
    """
    if hasattr(latent, "detach"):
        latent = latent.detach().float().cpu()
    channels = np.asarray(latent, dtype=np.float64)
    if channels.ndim != 3 or channels.shape[0] < 3:
        raise ValueError(f"latent: expected [C, H, W] with C >= 3, got shape {channels.shape}")
    rgb = channels[:3].transpose(1, 2, 0)
    low, high = rgb.min(), rgb.max()
    return np.uint8(np.round((rgb - low) / max(high - low, 1e-12) * 255))
