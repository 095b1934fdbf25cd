"""ComfyUI nodes: VAE decode and encode in tiles, normalised with the whole image's statistics.

ComfyUI's own "VAE Decode (Tiled)" and "VAE Encode (Tiled)" normalise every tile with the
GroupNorm statistics of that tile alone, which shows as seams and colour shifts. These nodes
run the core's tiled VAE (tiled_diffusion/vae.py) on the VAE's `first_stage_model`: exact
but for the attention at the lowest resolution, which sees a tile plus ATTENTION_OVERLAP px.
Images up to `vae_tile_above` squared go through ComfyUI's own untiled `vae.decode` and
`vae.encode`.

Only the 2-D VAEs built from ComfyUI's ldm Encoder and Decoder are tiled (SD1, SD2, SDXL,
and the 16-channel VAEs of SD3 and Flux); any other (video, TAESD, Cascade, Flux 2's with a
latent BatchNorm, ...) is refused with an error that names its classes: ComfyUI's own tiled
nodes serve those.

ComfyUI imports these nodes through the pack's NODE_CLASS_MAPPINGS; nothing here imports
ComfyUI at module level.
"""

from __future__ import annotations

from typing import Any

import torch

from ..vae import ATTENTION_OVERLAP, should_tile, tiled_decode, tiled_encode
from .comfyui import setting_input

CATEGORY = "latent/quadtree"

# The Encoder and Decoder classes whose layout the core tiles (module.name).
TILED_CLASSES = frozenset(
    {"comfy.ldm.modules.diffusionmodules.model.Encoder", "comfy.ldm.modules.diffusionmodules.model.Decoder"}
)


def tile_inputs() -> dict[str, tuple]:
    return {name: setting_input(name) for name in ("vae_tile", "vae_tile_above")}


def _qualified(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__name__}"


def check_tileable(vae: Any) -> None:
    """Raise a ValueError naming the VAE's classes unless the core can tile it exactly."""
    model = vae.first_stage_model
    encoder, decoder = getattr(model, "encoder", None), getattr(model, "decoder", None)
    regularizer = getattr(model, "regularization", None)
    if (
        vae.latent_dim == 2
        and {_qualified(encoder), _qualified(decoder)} <= TILED_CLASSES
        and getattr(model, "bn", None) is None  # Flux 2: a BatchNorm over 2x2 latent patches
        and type(regularizer).__name__ == "DiagonalGaussianRegularizer"
        and not regularizer.sample  # ComfyUI's latent is the posterior's mean
    ):
        return
    raise ValueError(
        f"Quadtree tiled VAE: cannot tile this VAE ({type(model).__name__} with "
        f"{_qualified(encoder)} and {_qualified(decoder)}); it tiles the image VAEs of "
        "SD1/SD2/SDXL/SD3/Flux. Use ComfyUI's VAE Decode (Tiled) / VAE Encode (Tiled) for it."
    )


def load_for_tiles(vae: Any, memory_required: float) -> None:
    """Load the whole VAE onto its device with room for one tile. Fully: the synced GroupNorms
    read their weights directly, which a partial (lowvram) load would leave elsewhere."""
    from comfy import model_management

    model_management.load_models_gpu([vae.patcher], memory_required=memory_required, force_full_load=True)


class QuadtreeVAEDecodeTiled:
    """LATENT -> IMAGE, tile by tile with the whole image's GroupNorm statistics."""

    DESCRIPTION = (
        "Decodes a large latent tile by tile with bounded memory. Unlike VAE Decode (Tiled), "
        "every tile is normalised with the statistics of the whole image: no seams or colour "
        "shifts between tiles. Images up to vae_tile_above squared are decoded untiled."
    )
    CATEGORY = CATEGORY
    FUNCTION = "decode"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded image.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "samples": ("LATENT", {"tooltip": "The latent to decode."}),
                "vae": ("VAE", {"tooltip": "The VAE that decodes it."}),
                **tile_inputs(),
            }
        }

    def decode(self, vae: Any, samples: dict, vae_tile: int, vae_tile_above: int) -> tuple[torch.Tensor]:
        check_tileable(vae)
        latent, ratio = samples["samples"], vae.upscale_ratio
        if not should_tile(latent.shape[-1] * ratio, latent.shape[-2] * ratio, vae_tile_above):
            return (vae.decode(latent),)
        side = (vae_tile + 2 * ATTENTION_OVERLAP) // ratio  # a tile and its attention window
        load_for_tiles(vae, vae.memory_used_decode((1, latent.shape[1], side, side), vae.vae_dtype))
        latent = latent.to(device=vae.device, dtype=vae.vae_dtype)
        images = [
            tiled_decode(vae.first_stage_model, row[None], tile=vae_tile, attention_overlap=ATTENTION_OVERLAP)
            .to(vae.output_device)
            .float()
            for row in latent  # one image at a time: the whole-image buffers grow with the batch
        ]
        return (vae.process_output(torch.cat(images)).movedim(1, -1),)


class QuadtreeVAEEncodeTiled:
    """IMAGE -> LATENT, tile by tile with the whole image's GroupNorm statistics."""

    DESCRIPTION = (
        "Encodes a large image tile by tile with bounded memory. Unlike VAE Encode (Tiled), "
        "every tile is normalised with the statistics of the whole image: no seams or colour "
        "shifts between tiles. Images up to vae_tile_above squared are encoded untiled."
    )
    CATEGORY = CATEGORY
    FUNCTION = "encode"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The latent: the mean of the VAE's posterior, as VAE Encode gives it.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "pixels": ("IMAGE", {"tooltip": "The image to encode."}),
                "vae": ("VAE", {"tooltip": "The VAE that encodes it."}),
                **tile_inputs(),
            }
        }

    def encode(self, vae: Any, pixels: torch.Tensor, vae_tile: int, vae_tile_above: int) -> tuple[dict]:
        check_tileable(vae)
        pixels = vae.vae_encode_crop_pixels(pixels[..., :3])  # centred, to a multiple of the ratio
        height, width = pixels.shape[1:3]
        if not should_tile(width, height, vae_tile_above):
            return ({"samples": vae.encode(pixels)},)
        side = vae_tile + 2 * ATTENTION_OVERLAP
        load_for_tiles(vae, vae.memory_used_encode((1, 3, side, side), vae.vae_dtype))
        latents = []
        for row in pixels:  # one image at a time: the whole-image buffers grow with the batch
            x = vae.process_input(row[None].movedim(-1, 1)).to(device=vae.device, dtype=vae.vae_dtype)
            moments = tiled_encode(
                vae.first_stage_model, x, tile=vae_tile, attention_overlap=ATTENTION_OVERLAP
            )
            latents.append(moments.chunk(2, dim=1)[0].to(vae.output_device).float())  # the mean
        return ({"samples": torch.cat(latents)},)


VAE_NODE_CLASS_MAPPINGS = {
    "QuadtreeVAEDecodeTiled": QuadtreeVAEDecodeTiled,
    "QuadtreeVAEEncodeTiled": QuadtreeVAEEncodeTiled,
}
VAE_NODE_DISPLAY_NAME_MAPPINGS = {
    "QuadtreeVAEDecodeTiled": "Quadtree VAE Decode (Tiled)",
    "QuadtreeVAEEncodeTiled": "Quadtree VAE Encode (Tiled)",
}
