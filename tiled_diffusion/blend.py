"""Blending weight maps of the windows' bands."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .quadtree import LATENT_SCALE


def window_weights(method: str, height: int, width: int) -> torch.Tensor:
    """Weight map [height, width] of one window's band (float32, strictly positive).

    MultiDiffusion averages overlapping windows evenly. Mixture of Diffusers weights each
    by a Gaussian centred on the window (standard deviation 0.15 of its side), so a pixel
    is mostly decided by the window it lies deepest in and each window fades out towards
    its edge (0.4% of the centre's weight there: small enough to hide the edge, far from
    underflow, so the weights still divide exactly).
    """
    if method == "MultiDiffusion":
        return torch.ones(height, width)
    return torch.outer(_gaussian(height), _gaussian(width))


def _gaussian(size: int) -> torch.Tensor:
    centre = (size - 1) / 2
    position = torch.arange(size, dtype=torch.float64)
    spread = 0.15 * size
    return torch.exp(-((position - centre) ** 2) / (2 * spread**2)).float()


def weight_sum(plan, keep=lambda leaf: True) -> torch.Tensor:
    """Sum over the windows whose leaves pass `keep` of their band weights, [H, W]."""
    total = torch.zeros(plan.latent_size)
    for window in plan.windows:
        if keep(plan.leaves[window.leaves[0]]):
            for band in window.bands:
                weights = window_weights(plan.settings.method, band.h, band.w)
                total[band.y : band.y + band.h, band.x : band.x + band.w] += weights
    return total


def kept_share(plan) -> torch.Tensor:
    """Share of the original each latent pixel keeps at the end of the job, [H, W] in 0..1.

    1 inside skipped tiles and on pixels of strength 0 (a black strength map, outside an
    inpaint mask), 0 where only denoised windows reach, and the blend of the two across
    the overlap band: exactly the mix the denoiser produced there.
    """
    share = weight_sum(plan, lambda leaf: leaf.skipped) / weight_sum(plan)
    if plan.pixel_strength is not None:
        share[plan.pixel_strength <= 0] = 1.0
    return share


def paste_kept_pixels(decoded: Image.Image, original: Image.Image, plan) -> Image.Image:
    """The decoded image with the original pixels pasted back where tiles were skipped.

    The VAE round trip blurs exactly the fine detail that skipping was meant to keep, so
    skipped tiles take the init image's own pixels, faded in across the overlap band.
    """
    share = kept_share(plan)
    if not (share > 0).any():
        return decoded
    size = decoded.size
    mask = torch.nn.functional.interpolate(
        share[None, None], scale_factor=LATENT_SCALE, mode="bilinear", align_corners=False
    )[0, 0]
    mask = Image.fromarray(np.uint8(mask.clamp(0, 1).numpy() * 255 + 0.5))
    mask = mask.resize(size, Image.Resampling.BILINEAR)
    original = original.convert(decoded.mode)
    if all(0 <= o - d < LATENT_SCALE for o, d in zip(original.size, size)):
        # A job size that is not a multiple of 8 px: the latent, and so the decoded image,
        # covers the init image's top-left part; its pixels are pasted where they were.
        original = original.crop((0, 0, *size))
    else:
        original = original.resize(size)
    return Image.composite(original, decoded, mask)
