"""Blending weight maps of the model windows."""

from __future__ import annotations

import torch


def window_weights(method: str, height: int, width: int) -> torch.Tensor:
    """Weight map [height, width] of one window (float32, strictly positive).

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
