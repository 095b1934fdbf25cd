"""ControlNet inputs for a batch of windows: each window's own crop of a whole-image map.

A spatial ControlNet sees the hint under the latent it denoises. When the denoiser calls
the model on a batch of windows, every full-image map (the hint at 8 px per latent pixel,
a region mask at any resolution) is cut to each window's view and laid out in the batch's
rows, window after window, exactly like the latent crops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .plan import Window


def refusal(unit_name: str, whole_image: Sequence[str]) -> str | None:
    """Why a unit with this preprocessor cannot run tile by tile, or None.

    `whole_image`: the host's preprocessors (name parts) that correct each model call
    towards the whole image's latent, which a window does not have."""
    if any(part in unit_name for part in whole_image):
        return (
            f"the ControlNet unit '{unit_name}' cannot run tile by tile: it corrects every model "
            "call towards the whole image's latent. Use its plain form (e.g. tile_resample) or "
            "turn Quadtree Tiled Diffusion off for this job"
        )
    return None


def is_image_map(value: object, latent_size: tuple[int, int]) -> bool:
    """A [N, C, H, W] map with the image's aspect ratio (to within one pixel per side)."""
    if not isinstance(value, torch.Tensor) or value.ndim != 4:
        return False
    height, width = latent_size
    scale = value.shape[-1] / width
    return scale > 0 and abs(value.shape[-2] - height * scale) <= max(scale, 1)


def window_rows(
    full: torch.Tensor,
    windows: Sequence[Window],
    latent_size: tuple[int, int],
    rows: int,
    chunks: int = 1,
) -> torch.Tensor:
    """`full` cut to each window's view, in the rows of a window batch.

    `full` is [N, C, H, W] over the whole image, at any resolution proportional to the
    latent. The batch holds `rows` rows per window (`chunks` cond/uncond chunks of the
    images). N = 1 is broadcast by the model when a single window is called, and repeated
    per row otherwise; N = rows is taken as it is; any other N holds one map per image,
    used in turn for the rows of each chunk (the hosts' own rule for batched hints).
    """
    height, width = latent_size
    scale_y, scale_x = full.shape[-2] / height, full.shape[-1] / width
    crops = []
    for w in windows:
        top, bottom = round(w.y * scale_y), round((w.y + w.h) * scale_y)
        left, right = round(w.x * scale_x), round((w.x + w.w) * scale_x)
        crop = full[:, :, top:bottom, left:right]
        if len(windows) > 1 or crop.shape[0] not in (1, rows):
            crop = _per_row(crop, rows, chunks)
        crops.append(crop)
    return crops[0] if len(crops) == 1 else torch.cat(crops)


def _per_row(maps: torch.Tensor, rows: int, chunks: int) -> torch.Tensor:
    if maps.shape[0] == 1:
        return maps.expand(rows, *maps.shape[1:])
    if maps.shape[0] == rows:
        return maps
    per_chunk = rows // chunks
    images = maps[torch.arange(per_chunk) % maps.shape[0]]
    return torch.cat([images] * chunks)
