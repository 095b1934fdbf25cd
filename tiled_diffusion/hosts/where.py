"""Where the picture may change in a WebUI job: the inpaint mask and the strength map.

Both are read from `p` once the WebUI has prepared the job (`p.init` has run: the mask
is blurred, rounded, inverted and cropped, and `p.nmask` is on the latent grid), that is
at `process_before_every_sampling`.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from ..settings import Settings
from ..strength import fit_to_job, on_latent_grid, with_inpaint_mask


def only_masked_crop(p: Any) -> tuple[int, int, int, int] | None:
    """The init image's box (x0, y0, x1, y1) that an "Only masked" inpaint job denoises, or None.

    The WebUI sets `p.paste_to` (x, y, width, height) when it crops to the mask."""
    box = getattr(p, "paste_to", None) if getattr(p, "image_mask", None) is not None else None
    if not box:
        return None
    x, y, width, height = box
    return x, y, x + width, y + height


def cropped(p: Any, image: Image.Image, crop: tuple[int, int, int, int]) -> Image.Image:
    """The init image as an "Only masked" job sees it: the crop, resized to the job as the
    WebUI resizes it (processing.py: crop, then "resize and fill")."""
    from modules import images, shared

    flat = images.flatten(image, shared.opts.img2img_background_color)
    return images.resize_image(2, flat.crop(crop), p.width, p.height)


def pixel_strength(p: Any, settings: Settings, latent_size: tuple[int, int]) -> torch.Tensor | None:
    """The job's strength per latent pixel ([H, W] in 0..1): the strength map placed as the
    init image is, times the inpaint mask (0 where the WebUI keeps the original); None
    when the job has neither."""
    strengths = None
    init_images = getattr(p, "init_images", None)
    if settings.strength_map is not None and init_images:
        height, width = latent_size
        fitted = fit_to_job(
            settings.strength_map,
            init_images[0].size,
            (p.width, p.height),
            resize_mode=getattr(p, "resize_mode", 0),
            crop=only_masked_crop(p),
        )
        strengths = on_latent_grid(fitted, (height, width))
    return with_inpaint_mask(strengths, getattr(p, "nmask", None), latent_size)
