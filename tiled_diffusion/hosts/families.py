"""Which model family a job runs, and what that asks of the tiling.

Every family the two hosts load returns x0 from the hooked function (k-diffusion's
CompVisDenoiser / CompVisVDenoiser, A1111's SD3Denoiser, Forge's KModel.apply_model for
eps, v and flow predictions alike), so skip and variable denoise need no per-family
maths. What differs is the latent grid: transformers that cut the latent into p x p
patches (Flux, Chroma, SD3) need windows on that grid. A family whose patch size cannot
be told is refused, never tiled on a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PATCH_TWO = ("Flux", "Chroma")  # Forge's transformers with a hard-coded 2x2 patch (no attribute)


@dataclass(frozen=True)
class Family:
    name: str  # for messages: "SDXL", "SD 2.x v-prediction", "Flux", ...
    align: int = 1  # windows start and end on multiples of this many latent pixels
    refused: str | None = None  # why the job cannot be tiled, naming the model type

    @property
    def native_side(self) -> int:
        """The image side in px the model was trained at: SDXL 1024 (A1111 says "SDXL", Forge
        "StableDiffusionXL"), SD 2.x v-prediction 768, the others 512."""
        if "XL" in self.name:
            return 1024
        return 768 if "v-prediction" in self.name else 512

    @property
    def cross_attention(self) -> bool:
        """Whether the model has text cross-attention maps to read (UNets); the patch
        transformers (SD3, Flux, Chroma) attend to text and image jointly."""
        return self.align == 1 and self.refused is None


def of_job(p: Any) -> Family:
    """The family of the model that will run this job (`p.sd_model`, set by both hosts)."""
    model = getattr(p, "sd_model", None)
    if model is None:
        return Family("unknown (no model on the job)")
    if hasattr(model, "forge_objects"):
        return _forge(model)
    return _a1111(model)


def _a1111(model: Any) -> Family:
    if getattr(model, "is_sd3", False):
        name = "SD3"
    elif getattr(model, "is_sdxl", False):
        name = "SDXL"
    elif getattr(model, "is_sd2", False):
        name = "SD 2.x"
    elif getattr(model, "is_sd1", False):
        name = "SD 1.x"
    else:
        name = type(model).__name__
    if getattr(model, "parameterization", "eps") == "v":
        name += " v-prediction"
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    return with_patch(name, inner)


def _forge(model: Any) -> Family:
    unet = model.forge_objects.unet
    kmodel = getattr(unet, "model", None)
    inner = getattr(kmodel, "diffusion_model", None)
    name = type(model).__name__  # Forge's engine: StableDiffusionXL, Flux, StableDiffusion3, ...
    prediction = getattr(getattr(kmodel, "predictor", None), "prediction_type", None)
    if prediction == "const":
        name += " (flow)"
    elif prediction == "v_prediction":
        name += " v-prediction"
    return with_patch(name, inner)


def with_patch(name: str, inner: Any) -> Family:
    """The family with the patch size of its diffusion model, or refused when it is unknown."""
    if inner is None:
        return Family(name)  # nothing to inspect (a stand-in): the UNet layout
    kind = type(inner).__name__
    size = getattr(inner, "patch_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    if isinstance(size, int) and size >= 1:
        return Family(name, align=size)
    if any(word in kind for word in PATCH_TWO):
        return Family(name, align=2)
    if hasattr(inner, "input_blocks") or "UNet" in kind:
        return Family(name)  # convolutional UNet: any window size, no grid
    return Family(
        name,
        refused=(
            f"this model type ({name}, diffusion model {kind}) is not supported: its latent "
            "patch size is unknown, so windows cannot be placed on its grid. "
            "Turn the extension off for this model."
        ),
    )
