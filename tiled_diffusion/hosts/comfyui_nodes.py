"""The ComfyUI nodes: their inputs come from `settings.PARAMETERS` (names, defaults, ranges,
tooltips), their work from the same core as the WebUI script.

ComfyUI imports the repository's root `__init__.py`, which exports NODE_CLASS_MAPPINGS
from here. Nothing here imports ComfyUI at module level.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..blend import paste_kept_pixels
from ..plan import Plan, build_plan
from ..quadtree import LATENT_SCALE
from ..settings import Settings, SettingsError
from ..strength import StrengthMap, fit_to_job, on_latent_grid, with_inpaint_mask
from ..ui import preview_tiles
from . import comfyui
from .comfyui_prompts import RegionConditioning, encode_regions
from .comfyui_vae import VAE_NODE_CLASS_MAPPINGS, VAE_NODE_DISPLAY_NAME_MAPPINGS

CATEGORY = "sampling/quadtree"
PLAN = "QUADTREE_PLAN"  # the plan, from the tiled model to Paste Kept

# The settings of the tiling, as node inputs (the WebUI's other parameters have ComfyUI
# counterparts: the upscale, VAE and prompt nodes).
TILING = (
    "method",
    "detail_threshold",
    "min_tile",
    "max_tile",
    "overlap",
    "tile_batch",
    "min_window",
    "skip_below",
    "skip_mode",
    "variable_denoise",
    "denoise_largest",
    "denoise_smallest",
)

STRENGTH_MAP_TIP = (
    "Optional: where the picture may change, painted over the init image (a MASK: 1 = full "
    "strength, 0 = keep the original, between = a proportionally lower strength that starts "
    "later). With variable denoise a pixel's strength is its tile's times the map."
)


def tiling_inputs() -> dict[str, tuple]:
    return {name: comfyui.setting_input(name) for name in TILING}


def checked_settings(**values: Any) -> Settings:
    """The settings of a node's widget values (SettingsError names what is wrong)."""
    return Settings(enabled=True, **{name: values[name] for name in (*TILING, "regions") if name in values})


def validate(**values: Any) -> bool | str:
    """VALIDATE_INPUTS: True, or the message ComfyUI shows (HTTP 400 from /prompt). The nodes
    check what ComfyUI does not: the 8 px steps of min_tile, max_tile, overlap and min_window,
    max_tile >= 2 min_tile, the regions text (an input a node checks loses ComfyUI's own range
    check, so Settings checks those ranges too). Inputs fed by a link arrive as None and are
    checked when the node runs."""
    given = {name: value for name, value in values.items() if value is not None}
    try:
        Settings(**given)
    except SettingsError as error:
        return str(error)
    return True


def to_pil(images: torch.Tensor, index: int = 0) -> Image.Image:
    """Image `index` of a ComfyUI IMAGE ([B, H, W, C] floats in 0..1) as an RGB picture."""
    array = images[min(index, images.shape[0] - 1)].detach().cpu().float().numpy()
    array = np.clip(np.round(array[..., :3] * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(array, "RGB")


def to_image(pictures: list[Image.Image]) -> torch.Tensor:
    """Pictures as a ComfyUI IMAGE."""
    return torch.stack(
        [torch.from_numpy(np.asarray(p.convert("RGB"), dtype=np.float32) / 255) for p in pictures]
    )


def _map_of(mask: torch.Tensor | None) -> StrengthMap | None:
    """A ComfyUI MASK ([B, H, W] or [H, W] in 0..1; the first) as a strength map."""
    if mask is None:
        return None
    values = mask.reshape((-1, mask.shape[-2], mask.shape[-1]))[0].detach().cpu().float().numpy()
    if values.size == 0:
        raise SettingsError("strength_map: the mask is empty")
    return StrengthMap.of(np.clip(np.round(values * 255), 0, 255))


class QuadtreeTiledDiffusion:
    """MODEL + init IMAGE + init LATENT -> the MODEL denoising tile by tile."""

    DESCRIPTION = (
        "Tiles the model's denoiser along an adaptive quadtree of the init image: small tiles "
        "where it is detailed, large ones where it is flat, with skip and a strength per tile "
        "(variable denoise) exact in x0 space. Connect the same LATENT the KSampler gets (its "
        "noise_mask, from Set Latent Noise Mask or VAE Encode (for Inpainting), keeps the "
        "unmasked windows free), and `denoise` to the KSampler's denoise."
    )
    CATEGORY = CATEGORY
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL", PLAN, "FLOAT")
    RETURN_NAMES = ("model", "plan", "denoise")
    OUTPUT_TOOLTIPS = (
        "The model, tiled (a clone: the input model is unchanged).",
        "The tiles, for Quadtree Paste Kept.",
        "The strength the KSampler must run at: the largest tile strength with variable "
        "denoise (1.0 without: then the KSampler's own denoise is the job's strength).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to tile."}),
                "image": ("IMAGE", {"tooltip": "The init image: the tiles follow its detail."}),
                "latent": ("LATENT", {"tooltip": "The init latent, the same the KSampler gets."}),
                **tiling_inputs(),
            },
            "optional": {
                "strength_map": ("MASK", {"tooltip": STRENGTH_MAP_TIP}),
                "regions": comfyui.setting_input("regions"),
                "clip": (
                    "CLIP",
                    {"tooltip": "The CLIP that encoded the prompt: it encodes the regions' prompts."},
                ),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, min_tile, max_tile, overlap, min_window, regions=""):  # noqa: N802 - ComfyUI's name
        return validate(
            min_tile=min_tile, max_tile=max_tile, overlap=overlap, min_window=min_window, regions=regions
        )

    def patch(self, model, image, latent, strength_map=None, regions="", clip=None, **values):
        settings = checked_settings(regions=regions or "", **values)
        window_cond = None
        if settings.regions.strip():
            if clip is None:
                raise ValueError(
                    "Quadtree Tiled Diffusion: regions need the CLIP input (to encode their prompts)"
                )
            window_cond = RegionConditioning(encode_regions(clip, settings.regions))
        family = comfyui.family_of(model)
        if family.refused:
            raise ValueError(f"Quadtree Tiled Diffusion: {family.refused}")
        samples = latent["samples"]
        latent_size = tuple(samples.shape[-2:])
        job_size = (latent_size[1] * LATENT_SCALE, latent_size[0] * LATENT_SCALE)
        picture = to_pil(image)
        strengths = None
        painted = _map_of(strength_map)
        if painted is not None:  # fit_to_job refuses a map of another aspect ratio
            strengths = on_latent_grid(fit_to_job(painted, picture.size, job_size), latent_size)
        repainted = comfyui.latent_mask(latent.get("noise_mask"), samples.shape)
        strengths = with_inpaint_mask(strengths, repainted, latent_size)
        if picture.size != job_size:
            picture = picture.resize(job_size, Image.Resampling.LANCZOS)
        plan = build_plan(
            picture,
            settings,
            latent_size,
            align=family.align,
            pixel_strength=strengths,
            inpaint_mask=repainted,
        )
        print(f"Quadtree Tiled Diffusion: {plan.summary()}", flush=True)
        original = model.model.process_latent_in(samples.float())
        top = comfyui.run_strength(plan)
        return comfyui.patched(model, plan, original, window_cond=window_cond), plan, top


class QuadtreePreview:
    """The plan drawn over the image, as the WebUI's Preview tiles draws it."""

    DESCRIPTION = "The tiles of an image drawn over it (or over its detail map), with their summary below."
    CATEGORY = CATEGORY
    FUNCTION = "preview"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("preview",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The init image."}),
                **tiling_inputs(),
                "show_detail": ("BOOLEAN", {"default": False, "tooltip": "Draw over the detail map."}),
            },
            "optional": {
                "strength_map": ("MASK", {"tooltip": STRENGTH_MAP_TIP}),
                "mask": (
                    "MASK",
                    {"tooltip": "Optional inpaint mask (1 = repaint): what it keeps is hatched."},
                ),
                "regions": comfyui.setting_input("regions"),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, min_tile, max_tile, overlap, min_window, regions=""):  # noqa: N802
        return validate(
            min_tile=min_tile, max_tile=max_tile, overlap=overlap, min_window=min_window, regions=regions
        )

    def preview(self, image, show_detail, strength_map=None, mask=None, regions="", **values):
        settings = checked_settings(regions=regions or "", **values)
        settings = dataclasses.replace(settings, strength_map=_map_of(strength_map))
        picture = to_pil(image)
        inpaint = None
        if mask is not None:
            repaint = _map_of(mask).pixels  # 1 = repaint, as white in the WebUI's masks
            inpaint = {"image": picture, "mask": Image.fromarray(repaint, "L")}
        drawn, summary = preview_tiles(
            picture,
            picture.width,
            picture.height,
            *settings.as_args(),
            show_detail=show_detail,
            inpaint=inpaint,
        )
        if drawn is None:
            raise ValueError(f"Quadtree Preview: {summary}")
        return {"ui": {"text": [summary]}, "result": (to_image([drawn]),)}


class QuadtreePasteKept:
    """Keep pixels: the init image's own pixels pasted into skipped tiles after decoding."""

    DESCRIPTION = (
        "Pastes the init image's pixels back where the plan kept the original (skipped tiles, "
        "black in the strength map), faded across the overlap: the VAE round trip blurs exactly "
        "the detail that skipping keeps. Does nothing with skip_mode 'Keep latent'."
    )
    CATEGORY = CATEGORY
    FUNCTION = "paste"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("image",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The decoded result."}),
                "init_image": ("IMAGE", {"tooltip": "The init image the plan was made from."}),
                "plan": (PLAN, {"tooltip": "The plan from Quadtree Tiled Diffusion."}),
            }
        }

    def paste(self, image, init_image, plan: Plan):
        if plan.settings.skip_mode != "Keep pixels":
            return (image,)
        pictures = [
            paste_kept_pixels(to_pil(image, i), to_pil(init_image, i), plan) for i in range(image.shape[0])
        ]
        return (to_image(pictures).to(image),)


NODE_CLASS_MAPPINGS = {
    "QuadtreeTiledDiffusion": QuadtreeTiledDiffusion,
    "QuadtreePreview": QuadtreePreview,
    "QuadtreePasteKept": QuadtreePasteKept,
    **VAE_NODE_CLASS_MAPPINGS,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "QuadtreeTiledDiffusion": "Quadtree Tiled Diffusion",
    "QuadtreePreview": "Quadtree Preview",
    "QuadtreePasteKept": "Quadtree Paste Kept",
    **VAE_NODE_DISPLAY_NAME_MAPPINGS,
}
