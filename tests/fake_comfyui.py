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

ControlNets: a cond entry carries its chain's head under "control"; the sampler's
`calc_cond_batch` runs the patcher's CALC_COND_BATCH wrappers around it, batches entries
with the same ControlNet into one call and computes the control for that call's whole
input before the model wrapper, as ComfyUI's `_calc_cond_batch` does.
"""

from __future__ import annotations

import copy
import enum
import types

import torch

from .fake_a1111 import karras
from .fake_controlnet import PointwiseControl, adaptive_resize, broadcast_image_to

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

    def apply_model(self, x, t, c_crossattn, transformer_options, c_concat=None, control=None, **kwargs):
        chunks = transformer_options["cond_or_uncond"]
        assert x.shape[0] == c_crossattn.shape[0] == t.shape[0] == transformer_options["sigmas"].shape[0]
        assert x.shape[0] % len(chunks) == 0
        if c_concat is not None:
            assert c_concat.shape[0] == x.shape[0] and c_concat.shape[-2:] == x.shape[-2:]
        self.calls.append((tuple(x.shape), list(chunks)))
        centre = self.mu + c_crossattn[:, :1, :1].unsqueeze(-1)
        s2 = self.spread**2
        x0 = centre + s2 / (s2 + t.view(-1, 1, 1, 1) ** 2) * (x - centre)
        if control is not None:  # the UNet adds the control it is given: a shift per latent pixel
            x0 = x0 + control["middle"][0]
        return x0


class ModelPatcher:
    def __init__(self, model: BaseModel):
        self.model = model
        self.model_options: dict = {"transformer_options": {}}
        self.wrappers: dict[str, dict[str, list]] = {}  # type -> key -> functions

    def clone(self) -> ModelPatcher:
        twin = ModelPatcher(self.model)
        twin.model_options = copy.deepcopy(self.model_options)
        twin.wrappers = {
            kind: {key: list(fns) for key, fns in keys.items()} for kind, keys in self.wrappers.items()
        }
        return twin

    def set_model_unet_function_wrapper(self, wrapper) -> None:
        self.model_options["model_function_wrapper"] = wrapper

    def add_wrapper_with_key(self, kind: str, key: str, fn) -> None:
        self.wrappers.setdefault(kind, {}).setdefault(key, []).append(fn)

    def wrapped(self, kind: str, original):
        """`original` called through this patcher's wrappers of a kind, the first added outermost."""
        fns = [fn for fns in self.wrappers.get(kind, {}).values() for fn in fns]

        def call(i, *args):
            if i == len(fns):
                return original(*args)
            return fns[i](lambda *a: call(i + 1, *a), *args)

        return lambda *args: call(0, *args)


class ControlNet:
    """ComfyUI's ControlNet as sampling uses it, with a pointwise control model.

    `get_control` builds `cond_hint` from `cond_hint_original` (center crop and resize to
    the call's size) only when it is None or of another size, and keeps it; it records the
    input and hint shapes of each call.
    """

    def __init__(self, hint: torch.Tensor | None = None, strength: float = 1.0, control_model=None):
        self.control_model = control_model or PointwiseControl()
        self.cond_hint_original, self.cond_hint, self.strength = hint, None, strength
        self.compression_ratio, self.upscale_algorithm, self.vae = 8, "nearest-exact", None
        self.extra_concat_orig: list = []
        self.previous_controlnet: ControlNet | None = None
        self.calls: list[tuple[tuple, tuple]] = []  # (x_noisy shape, cond_hint shape)

    def copy(self) -> ControlNet:
        return ControlNet(self.cond_hint_original, self.strength, self.control_model)

    def set_cond_hint(self, hint: torch.Tensor, strength: float = 1.0) -> ControlNet:
        self.cond_hint_original, self.strength = hint, strength
        return self

    def set_previous_controlnet(self, net: ControlNet | None) -> ControlNet:
        self.previous_controlnet = net
        return self

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        previous = self.previous_controlnet
        control_prev = previous and previous.get_control(
            x_noisy, t, cond, batched_number, transformer_options
        )
        height, width = (side * self.compression_ratio for side in x_noisy.shape[-2:])
        if self.cond_hint is None or tuple(self.cond_hint.shape[-2:]) != (height, width):
            self.cond_hint = common_upscale(
                self.cond_hint_original, width, height, self.upscale_algorithm, "center"
            )
            self.cond_hint = self.cond_hint.to(x_noisy)
        if x_noisy.shape[0] != self.cond_hint.shape[0]:
            self.cond_hint = broadcast_image_to(self.cond_hint, x_noisy.shape[0], batched_number)
        self.calls.append((tuple(x_noisy.shape), tuple(self.cond_hint.shape)))
        control = self.control_model(self.cond_hint) * self.strength
        if control_prev is not None:
            control = control + control_prev["middle"][0]
        return {"input": [], "middle": [control], "output": []}


common_upscale = adaptive_resize  # comfy.utils.common_upscale with "center" crop, as far as hints go


def comfy_modules() -> dict[str, types.ModuleType]:
    """The ComfyUI modules the adapter imports, for sys.modules."""
    comfy, utils = types.ModuleType("comfy"), types.ModuleType("comfy.utils")
    utils.common_upscale = common_upscale
    comfy.utils = utils
    return {"comfy": comfy, "comfy.utils": utils}


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
    control: ControlNet | None = None,
) -> torch.Tensor:
    """A KSampler run on a LATENT's samples (raw), returning raw samples; `control`: the
    head of a ControlNet chain applied to the positive and the negative."""
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

    def calc_cond_batch(model_, conds, x, sigma, model_options):
        """x0 per cond; entries with the same ControlNet batched in one call, uncond first."""
        present = [i for i, cond in enumerate(conds) if cond]
        outputs: list = [None] * len(conds)
        for head in {id(conds[i][0].get("control")): conds[i][0].get("control") for i in present}.values():
            chunks = [i for i in reversed(present) if conds[i][0].get("control") is head]
            rows = len(chunks)
            sigma_rows = torch.cat([sigma] * rows)
            options = {
                **model_options["transformer_options"],
                "sample_sigmas": sigmas,
                "cond_or_uncond": chunks,
                "sigmas": sigma_rows,
            }
            c = {
                "c_crossattn": torch.cat([conds[k][0]["cross"] for k in chunks]),
                "transformer_options": options,
            }
            if c_concat is not None:
                c["c_concat"] = torch.cat([c_concat] * rows)
            x_in = torch.cat([x] * rows)
            if head is not None:
                c["control"] = head.get_control(x_in, sigma_rows, c, rows, options)
            wrapper = model_options.get("model_function_wrapper")
            if wrapper is None:
                out = model_.apply_model(x_in, sigma_rows, **c)
            else:
                out = wrapper(
                    model_.apply_model,
                    {"input": x_in, "timestep": sigma_rows, "c": c, "cond_or_uncond": chunks},
                )
            for k, part in zip(chunks, out.chunk(rows)):
                outputs[k] = part
        return outputs

    def calc(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        entries = [{"cross": positive}, {"cross": negative} if cfg != 1.0 else None]
        conds = [None if e is None else [{**e, "control": control} if control else e] for e in entries]
        run = patcher.wrapped("calc_cond_batch", calc_cond_batch)
        cond_x0, uncond_x0 = run(model, conds, x, sigma, patcher.model_options)
        if cfg == 1.0:
            return cond_x0
        return uncond_x0 + (cond_x0 - uncond_x0) * cfg

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
