"""A small stand-in for ComfyUI's sampling stack (v0.3.x), with its call pattern and cond layout.

Written from ComfyUI's documented behaviour as seen in a real ComfyUI 0.3.77 (no ComfyUI
code copied): a MODEL is a patcher whose `clone()` deep-copies its model options; the
KSampler's denoise keeps the step count and runs the last steps + 1 sigmas of a schedule of
int(steps / denoise) steps; the sampler's model call batches the uncond rows before the cond
rows (`cond_or_uncond` [1, 0]), hands the wrapper `timestep` = sigma and `c` with
`c_crossattn` and `transformer_options` (`sample_sigmas`, `cond_or_uncond`, `sigmas`), and
`apply_model` returns x0; with a noise mask every call re-noises the kept area from the
original before the model and puts the original back after it. Latents enter sampling
through `process_latent_in` and leave through `process_latent_out`.
"""

from __future__ import annotations

import copy
import enum

import torch

from .fake_a1111 import karras

SCALE = 0.18215  # SD 1.x latent scale factor


class ModelType(enum.Enum):
    EPS = 1
    V_PREDICTION = 2
    FLOW = 6


class SD15:
    """Stands for ComfyUI's supported_models.SD15 (the family's name is the config's class name)."""


class UNetModel:
    input_blocks: list = []


class Flux:
    """A patch transformer without a patch_size attribute (the family's name tells it is 2x2)."""


class BaseModel:
    """x0 is the pixel-wise posterior mean of N(mu + text, spread^2) data, `text` the first value
    of each row's cross-attention: cond and uncond rows differ, a misplaced row shows."""

    def __init__(self, mu: float = 0.2, spread: float = 0.5, config=None, diffusion_model=None):
        self.mu, self.spread = mu, spread
        self.model_config = config or SD15()
        self.diffusion_model = diffusion_model or UNetModel()
        self.model_type = ModelType.EPS
        self.calls: list[tuple] = []  # (x shape, cond_or_uncond) per call

    def process_latent_in(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * SCALE

    def process_latent_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / SCALE

    def apply_model(self, x, t, c_crossattn, transformer_options, c_concat=None, **kwargs):
        chunks = transformer_options["cond_or_uncond"]
        assert x.shape[0] == c_crossattn.shape[0] == t.shape[0] == transformer_options["sigmas"].shape[0]
        assert x.shape[0] % len(chunks) == 0
        if c_concat is not None:
            assert c_concat.shape[0] == x.shape[0] and c_concat.shape[-2:] == x.shape[-2:]
        self.calls.append((tuple(x.shape), list(chunks)))
        centre = self.mu + c_crossattn[:, :1, :1].unsqueeze(-1)
        s2 = self.spread**2
        return centre + s2 / (s2 + t.view(-1, 1, 1, 1) ** 2) * (x - centre)


class ModelPatcher:
    def __init__(self, model: BaseModel):
        self.model = model
        self.model_options: dict = {"transformer_options": {}}

    def clone(self) -> ModelPatcher:
        twin = ModelPatcher(self.model)
        twin.model_options = copy.deepcopy(self.model_options)
        return twin

    def set_model_unet_function_wrapper(self, wrapper) -> None:
        self.model_options["model_function_wrapper"] = wrapper


def schedule(steps: int, denoise: float) -> torch.Tensor:
    """KSampler's sigmas: the last steps + 1 of a schedule of int(steps / denoise) steps."""
    if denoise > 0.9999:
        return karras(steps)
    return karras(int(steps / denoise))[-(steps + 1) :]


def conditioning(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 77, 16, generator=g) * 0.3, torch.zeros(batch, 77, 16)


def ksampler(
    k_diffusion,
    patcher: ModelPatcher,
    samples: torch.Tensor,
    noise: torch.Tensor,
    steps: int = 20,
    denoise: float = 1.0,
    cfg: float = 5.0,
    sampler: str = "sample_euler",
    noise_mask: torch.Tensor | None = None,
    sigmas: torch.Tensor | None = None,
    c_concat: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """A KSampler run on a LATENT's samples (raw), returning raw samples."""
    sigmas = schedule(steps, denoise) if sigmas is None else sigmas
    model = patcher.model
    latent = model.process_latent_in(samples)
    positive, negative = conditioning(samples.shape[0])
    mask = None
    if noise_mask is not None:
        mask = torch.nn.functional.interpolate(
            noise_mask.reshape(-1, 1, *noise_mask.shape[-2:]).float(),
            size=samples.shape[-2:],
            mode="bilinear",
        )

    def calc(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        chunks = [1, 0] if cfg != 1.0 else [0]
        texts = {0: positive, 1: negative}
        rows = len(chunks)
        sigma_rows = torch.cat([sigma] * rows)
        options = {
            **patcher.model_options["transformer_options"],
            "sample_sigmas": sigmas,
            "cond_or_uncond": chunks,
            "sigmas": sigma_rows,
        }
        c = {"c_crossattn": torch.cat([texts[k] for k in chunks]), "transformer_options": options}
        if c_concat is not None:
            c["c_concat"] = torch.cat([c_concat] * rows)
        x_in = torch.cat([x] * rows)
        wrapper = patcher.model_options.get("model_function_wrapper")
        if wrapper is None:
            out = model.apply_model(x_in, sigma_rows, **c)
        else:
            out = wrapper(
                model.apply_model, {"input": x_in, "timestep": sigma_rows, "c": c, "cond_or_uncond": chunks}
            )
        parts = dict(zip(chunks, out.chunk(rows)))
        if cfg == 1.0:
            return parts[0]
        return parts[1] + (parts[0] - parts[1]) * cfg

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, **_) -> torch.Tensor:
        if mask is None:
            return calc(x, sigma)
        kept = 1 - mask
        x = x * mask + (latent + noise * sigma.view(-1, 1, 1, 1)) * kept
        return calc(x, sigma) * mask + latent * kept

    torch.manual_seed(seed)
    x = latent + noise * sigmas[0]
    out = getattr(k_diffusion.sampling, sampler)(denoiser, x, sigmas, disable=True)
    return model.process_latent_out(out)
