"""Where the picture may change in a WebUI job: the inpaint mask and the strength map.

Both are read from `p` once the WebUI has prepared the job (`p.init` has run: the mask
is blurred, rounded, inverted and cropped, and `p.nmask` is on the latent grid), that is
at `process_before_every_sampling`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from ..settings import Settings
from ..strength import check_fits, fit_to_job, on_latent_grid, repainted_latent, with_inpaint_mask


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
    from modules import images

    return images.resize_image(2, flattened(image).crop(crop), p.width, p.height)


def flattened(image: Image.Image) -> Image.Image:
    """An init image in RGB as the WebUI reads it: an RGBA image's transparency filled with
    the img2img background colour (modules/images.py flatten), not dropped to black."""
    from modules import images, shared

    return images.flatten(image, shared.opts.img2img_background_color)


def check(p: Any, settings: Settings) -> None:
    """Refuse a strength map that does not fit the job's init image (SettingsError)."""
    init_images = getattr(p, "init_images", None)
    if settings.strength_map is not None and init_images:
        check_fits(settings.strength_map, init_images[0].size)


def pixel_strength(
    p: Any, settings: Settings, latent_size: tuple[int, int]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The job's strength per latent pixel ([H, W] in 0..1): the strength map placed as the
    init image is, times the inpaint mask (0 where the WebUI keeps the original), or None
    when the job has neither; and the inpaint mask's repainted share ([H, W]), or None."""
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
    nmask = getattr(p, "nmask", None)
    repainted = None if nmask is None else repainted_latent(nmask, latent_size)
    return with_inpaint_mask(strengths, nmask, latent_size), repainted


# The img2img tabs, as both WebUIs number them (img2img_selected_tab).
INPAINT_TAB, INPAINT_SKETCH_TAB, INPAINT_UPLOAD_TAB = 2, 3, 4


def inpaint_preview(names: list[str], *values) -> dict | None:
    """What Preview tiles shows of the open inpaint tab: {"image", "mask", "blur", "invert",
    "only_masked"} for `preview_tiles`, or None when no inpaint tab is open.

    names: the inpaint components the host has, in the order of `values` (see the script):
    "tab", "inpaint" (A1111's sketch editor: {"image", "mask"}), "inpaint_background" and
    "inpaint_foreground" (Forge's canvas: the picture, the painted layer whose opacity is
    the mask), "sketch" / "sketch_background" / "sketch_foreground" (inpaint sketch),
    "upload_image", "upload_mask", "mask_blur", "mask_mode" (1 = inpaint not masked),
    "inpaint_area" (1 = only masked).
    """
    known = dict(zip(names, values))
    tab = int(known.get("tab") or 0)
    image = mask = None
    if tab == INPAINT_TAB:
        editor = known.get("inpaint")
        if isinstance(editor, dict):  # A1111
            image, mask = editor.get("image"), editor.get("mask")
        else:  # Forge
            image, mask = known.get("inpaint_background"), _opacity(known.get("inpaint_foreground"))
    elif tab == INPAINT_SKETCH_TAB:
        # Forge's mask is the painted layer; A1111 derives it from the colours painted over the
        # picture, known only when the job runs.
        image = known.get("sketch_background", known.get("sketch"))
        if isinstance(image, dict):
            image = image.get("image")
        mask = _opacity(known.get("sketch_foreground"))
    elif tab == INPAINT_UPLOAD_TAB:
        image, mask = known.get("upload_image"), known.get("upload_mask")
    else:
        return None
    return {
        "image": image,
        "mask": _as_image(mask),
        "blur": int(known.get("mask_blur") or 0),
        "invert": known.get("mask_mode") in (1, "Inpaint not masked"),
        "only_masked": known.get("inpaint_area") in (1, "Only masked"),
    }


def _as_image(value) -> Image.Image | None:
    if value is None or isinstance(value, Image.Image):
        return value
    return Image.fromarray(np.asarray(value))


def _opacity(layer) -> Image.Image | None:
    """The painted pixels of a layer (its alpha), as a greyscale mask; None when nothing is painted."""
    layer = _as_image(layer)
    if layer is None or layer.mode not in ("RGBA", "LA"):
        return None
    alpha = layer.getchannel("A")
    return alpha if alpha.getextrema()[1] > 0 else None
