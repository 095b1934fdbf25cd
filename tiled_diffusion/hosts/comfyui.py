"""ComfyUI: the tiled denoiser as a UNet function wrapper on a clone of the MODEL.

ComfyUI calls the wrapper as `wrapper(apply_model, {"input", "timestep", "c",
"cond_or_uncond"})` with `timestep` the sigma of the call, and `apply_model` returns x0
(the denoised latent), as Forge does (its backend comes from ComfyUI). The rows of
`input` are whole batches of the job's images, one chunk per entry of `cond_or_uncond`.
The schedule the sampler runs is `c["transformer_options"]["sample_sigmas"]`.
ControlNets run per window batch (see comfyui_control).

Nothing here imports ComfyUI at module level: the tests drive it with stand-ins.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from ..denoiser import TiledDenoiser
from ..plan import Plan
from ..settings import PARAMETERS_BY_NAME, TITLE
from ..strength import pixel_starts
from . import families
from .comfyui_control import CALC_COND_BATCH, ComfyChain, without_control


def setting_input(name: str) -> tuple:
    """A parameter as a ComfyUI input: its type, default, range and help as tooltip."""
    p = PARAMETERS_BY_NAME[name]
    options: dict[str, Any] = {"default": p.default, "tooltip": p.help}
    if p.choices:
        return list(p.choices), options
    if p.kind is bool:
        return "BOOLEAN", options
    if p.text:
        return "STRING", {**options, "multiline": True}
    options.update(min=p.minimum, max=p.maximum, step=p.step)
    if p.kind is int:
        return "INT", options
    return "FLOAT", {**options, "round": p.step}


def family_of(model: Any) -> families.Family:
    """The family of a ComfyUI MODEL (a ModelPatcher): its config's name, prediction and
    the patch size of its diffusion model; unknown layouts refused by name."""
    base = model.model
    name = type(getattr(base, "model_config", base)).__name__  # SD15, SDXL, SD3, Flux, ...
    prediction = getattr(getattr(base, "model_type", None), "name", "EPS")
    if prediction.startswith("V_PREDICTION"):
        name += " v-prediction"
    elif prediction.startswith("FLOW") or prediction == "FLUX":
        name += " (flow)"
    return families.with_patch(name, getattr(base, "diffusion_model", None))


def run_strength(plan: Plan) -> float:
    """The strength a KSampler runs a plan at: its largest tile strength with variable
    denoise, else 1 (the KSampler's own denoise is the job's strength)."""
    return plan.max_strength if plan.settings.variable_denoise else 1.0


def run_starts(plan: Plan, sample_sigmas: torch.Tensor) -> Plan:
    """The plan timed by the schedule this sampler run really takes.

    ComfyUI's `denoise` keeps the step count: a KSampler at denoise D with N steps runs the
    last N + 1 sigmas of a schedule of int(N / D) steps. A tile of strength d runs the last
    int(N * d / D) of the run's N steps, so it equals a KSampler run at denoise d with that
    many steps on the same schedule (ComfyUI's own img2img of that tile) and starts where
    that run starts. D is the largest strength of the plan (the node's `denoise` output,
    for the KSampler), or 1 (the run itself) without variable denoise.
    """
    sigmas = torch.as_tensor(sample_sigmas, dtype=torch.float64).flatten().cpu()
    top = run_strength(plan)
    strengths = torch.tensor([leaf.strength for leaf in plan.leaves], dtype=torch.float64)
    starts = pixel_starts(strengths, top, sigmas, rule="run").tolist()  # the rule of grey pixels too
    leaves = [dataclasses.replace(leaf, start_sigma=start) for leaf, start in zip(plan.leaves, starts)]
    return dataclasses.replace(plan, leaves=leaves, sigmas=sigmas, job_strength=top, start_rule="run")


class UnetWrapper:
    """`model_function_wrapper` of a cloned MODEL: the tiled denoiser, chained after any
    wrapper set before it (a wrapper slot holds one function: the earlier one is called
    for each window batch)."""

    def __init__(
        self,
        plan: Plan,
        original: torch.Tensor,
        previous: Callable | None = None,
        log=print,
        window_cond: Callable | None = None,
    ):
        self.plan, self.original, self.previous, self.log = plan, original, previous, log
        self.window_cond = window_cond  # windows with prompts of their own (denoiser.WindowConditioning)
        self.denoiser: TiledDenoiser | None = None
        self.run_sigmas: tuple | None = None  # the schedule of the run the denoiser was timed for
        self.controlnet: ComfyChain | None = None  # the ControlNets of the current call, see take_control
        self._chain: ComfyChain | None = None  # the last chain, kept with its resized hints
        self._chunks = 1  # cond/uncond chunks of the current call
        self._logged: set[str] = set()

    def __deepcopy__(self, memo: dict) -> UnetWrapper:
        return self  # ModelPatcher.clone() deep-copies model options: share the wrapper and its latent

    def __call__(self, apply_model: Callable, params: dict) -> torch.Tensor:
        x, sigma, c = params["input"], params["timestep"], params["c"]
        chunks = list(params["cond_or_uncond"])

        def model(crops: torch.Tensor, sigma_rows: torch.Tensor, **cond: Any) -> torch.Tensor:
            windows = crops.shape[0] // x.shape[0]
            cond = _per_window_options(cond, chunks * windows, sigma_rows)
            if self.controlnet is not None:
                control = self.controlnet.control(crops, sigma_rows, cond, len(chunks) * windows)
                cond = {**cond, "control": control}
            if self.previous is None:
                return apply_model(crops, sigma_rows, **cond)
            inner = {"input": crops, "timestep": sigma_rows, "c": cond, "cond_or_uncond": chunks * windows}
            return self.previous(apply_model, inner)

        if tuple(x.shape[-2:]) != tuple(self.plan.latent_size):
            self._log_once(
                f"{TITLE}: a call of {x.shape[-1]}x{x.shape[-2]} latent px (an area cond) runs untiled"
            )
            return model(x, sigma, **c)
        options = c.get("transformer_options") or {}
        run = options.get("sample_sigmas")
        key = None if run is None else tuple(float(s) for s in torch.as_tensor(run).flatten())
        if self.denoiser is None or key != self.run_sigmas:
            plan = self.plan
            if key is not None:
                plan = run_starts(plan, torch.tensor(key))
            elif plan.uses_original:
                raise RuntimeError(
                    f"{TITLE}: the sampler gave no schedule (sample_sigmas); cannot time the tiles"
                )
            self.run_sigmas = key
            self.denoiser = TiledDenoiser(
                model,
                plan,
                self.original.to(x.device),
                around_batch=self._around,
                window_cond=self.window_cond,
            )
        self.denoiser.model = model
        self._chunks = len(chunks)
        return self.denoiser(x, sigma, **c)

    def take_control(self, executor: Callable, model: Any, conds: list, x_in, timestep, model_options):
        """CALC_COND_BATCH wrapper: runs the call with the conds' ControlNets taken out.

        ComfyUI would compute their control for the whole latent before the model wrapper,
        a pass that tiling throws away (and, at 4K, the memory peak); the tiled model
        computes it per window batch instead, and for any call it passes through untiled.
        """
        head, conds = without_control(conds)
        if head is not None and (self._chain is None or self._chain.head is not head):
            self._chain = ComfyChain(head, self.plan.latent_size)
        self.controlnet = self._chain if head is not None else None
        try:
            return executor(model, conds, x_in, timestep, model_options)
        finally:
            self.controlnet = None

    def _around(self, batch: list, rows: int) -> AbstractContextManager:
        if self.controlnet is None:
            return nullcontext()
        return self.controlnet.around(batch, rows, self._chunks)

    def _log_once(self, text: str) -> None:
        if text not in self._logged:
            self._logged.add(text)
            self.log(text)


def _per_window_options(cond: dict, chunks: list[int], sigma_rows: torch.Tensor) -> dict:
    """transformer_options that describe a window batch's rows (attention patches read them)."""
    options = cond.get("transformer_options")
    if not isinstance(options, dict):
        return cond
    options = {**options, "cond_or_uncond": list(chunks), "sigmas": sigma_rows}
    return {**cond, "transformer_options": options}


def patched(model: Any, plan: Plan, original: torch.Tensor, window_cond: Callable | None = None) -> Any:
    """A clone of the MODEL with the tiled wrapper (the input MODEL is left as it is)."""
    clone = model.clone()
    previous = clone.model_options.get("model_function_wrapper")
    wrapper = UnetWrapper(plan, original, previous, window_cond=window_cond)
    clone.set_model_unet_function_wrapper(wrapper)
    clone.add_wrapper_with_key(CALC_COND_BATCH, "quadtree_tiled_diffusion", wrapper.take_control)
    return clone


def latent_mask(noise_mask: torch.Tensor | None, latent_shape: tuple) -> torch.Tensor | None:
    """The repainted share of each latent pixel ([H, W]) of a LATENT's noise_mask, resized to
    the latent as ComfyUI resizes it for sampling (comfy.utils.reshape_mask: bilinear)."""
    if noise_mask is None:
        return None
    mask = noise_mask.reshape((-1, 1, noise_mask.shape[-2], noise_mask.shape[-1])).float()
    mask = torch.nn.functional.interpolate(mask, size=tuple(latent_shape[-2:]), mode="bilinear")
    if mask.shape[0] > 1 and not torch.equal(mask, mask[:1].expand_as(mask)):
        raise ValueError(f"{TITLE}: a batch of different noise masks is not supported; give one mask")
    return mask[0, 0]
