"""Forge 2.x: the tiled denoiser as a UNet function wrapper.

Forge restores `p.sd_model.forge_objects` at the start of every job and before the
hires pass, so a wrapper set on a clone of the UNet patcher lives exactly one pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch

from ..denoiser import TiledDenoiser
from ..plan import Plan
from ..prompts import WindowPrompt
from ..settings import TITLE
from .controlnet import ForgeChain, forge_refusal
from .patches import InstancePatches, ScheduleRecorder
from .prompts import WindowConds, cond_parts

NO_SCHEDULE_NOTE = (
    "Quadtree Tiled Diffusion: variable denoise needs a k-diffusion sampler in Forge; "
    "with this sampler every tile starts with the job."
)


class UnetWrapper:
    """`model_function_wrapper` for Forge's UNet patcher.

    Forge calls it as `wrapper(model_function, {"input", "timestep", "c", "cond_or_uncond"})`
    where `timestep` is sigma and `model_function` returns x0. Each chunk of rows
    (cond or uncond) holds the batch's B images in order.
    """

    def __init__(
        self,
        plan: Plan,
        original: torch.Tensor | None,
        previous: Callable | None = None,
        schedule: ScheduleRecorder | None = None,
        patches: InstancePatches | None = None,
        progress: Callable[[int, int], None] | None = None,
        on_note: Callable[[str], None] | None = None,
        window_conds: Callable[[], WindowConds] | None = None,
        cfg: Any = None,
    ):
        self.plan, self.original, self.previous, self.schedule = plan, original, previous, schedule
        self.patches = patches or InstancePatches()  # the schedule recorder's, on the sampler
        self.progress, self.on_note = progress, on_note
        self.denoiser: TiledDenoiser | None = None
        self.error: Exception | None = None  # raised at the first call: rejected settings
        self.controlnet: ForgeChain | None = None  # this step's ControlNets, see take_control
        self._chunks: list[int] = [0]  # cond_or_uncond of the current call
        # Windows with prompts of their own: the pass's WindowConds (it encodes on first use),
        # the CFG denoiser whose step picks their rows, and the step's cond entries.
        has_prompts = plan is not None and any(leaf.prompt for leaf in plan.leaves)
        self.window_conds: WindowConds | None = window_conds() if has_prompts and window_conds else None
        self.cfg = cfg
        self.job_conds: list[torch.Tensor] = []  # crossattn of each cond entry (AND part), in order
        self._chains: dict[int, ForgeChain] = {}  # one per ControlNet chain, kept for the pass
        self._noted: set[str] = set()

    def remove(self) -> None:
        """Undo what was patched outside the UNet (Forge restores the UNet itself)."""
        self.patches.remove()

    def __deepcopy__(self, memo: dict) -> UnetWrapper:
        # UnetPatcher.clone() deep-copies model options: share this wrapper, not its latent.
        return self

    def __call__(self, model_function: Callable, params: dict) -> torch.Tensor:
        if self.error is not None:
            raise self.error
        x, sigma, c = params["input"], params["timestep"], params["c"]
        chunks = params["cond_or_uncond"]

        def model(crops: torch.Tensor, sigma_rows: torch.Tensor, **cond: Any) -> torch.Tensor:
            windows = crops.shape[0] // x.shape[0]
            cond = _per_window_options(cond, chunks * windows, sigma_rows)
            if self.controlnet is not None:
                control = self.controlnet.control(crops, sigma_rows, cond, len(chunks) * windows)
                cond = {**cond, "control": control, "control_model": self.controlnet.head}
            if self.previous is None:
                return model_function(crops, sigma_rows, **cond)
            inner = {"input": crops, "timestep": sigma_rows, "c": cond, "cond_or_uncond": chunks * windows}
            return self.previous(model_function, inner)

        if tuple(x.shape[-2:]) != tuple(self.plan.latent_size):
            self._note("Quadtree Tiled Diffusion: an area-conditioned call is passed through untiled.")
            return model(x, sigma, **c)
        if self.denoiser is None:
            self.denoiser = TiledDenoiser(
                model,
                self._timed_plan(),
                self.original,
                progress=self.progress,
                around_batch=self._around,
                window_cond=self._window_cond if self.window_conds else None,
            )
            for note in self.denoiser.notes:
                self._note(note)
        self.denoiser.model = model
        self._chunks = list(chunks)
        return self.denoiser(x, sigma, **c)

    def take_control(self, model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        """A conditioning modifier: takes the ControlNets out of this step's conditions.

        Forge would compute their control for the whole latent before calling the wrapper,
        a pass that tiling then throws away (and, at 4K and more, the memory peak); the
        wrapper computes it per window batch instead, and for any call it passes through.
        """
        if self.error is not None:
            raise self.error  # before Forge evaluates any ControlNet on the whole latent
        self.controlnet = None
        if self.window_conds is not None:
            self.job_conds = [entry["model_conds"]["c_crossattn"].cond for entry in cond]
        if self.plan is not None:
            heads = {id(h): h for entry in [*cond, *(uncond or [])] if (h := entry.pop("control", None))}
            if len(heads) > 1:
                raise RuntimeError(f"{TITLE}: conditions with different ControlNets are not supported")
            for key, head in heads.items():
                if key not in self._chains:
                    self._chains[key] = ForgeChain(head, self.plan.latent_size)
                self.controlnet = self._chains[key]
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    def _around(self, batch: list, rows: int):
        if self.controlnet is None:
            return nullcontext()
        return self.controlnet.around(batch, rows, len(self._chunks))

    def _window_cond(self, prompt: WindowPrompt, cond: dict, rows: int) -> dict:
        """The call's conditioning with each cond chunk's rows made from the window's prompt.

        A cond chunk holds one AND part of every image (Forge batches the parts as separate
        conditions); rows of different token lengths are repeated to their least common
        multiple, as Forge concatenates conditions (exact for attention).
        """
        conds_list, window = self.window_conds.at_step(prompt, self.cfg.step)
        parts = cond_parts(window)
        per_chunk = rows // len(self._chunks)
        crossattn, pooled = cond["c_crossattn"], cond.get("y")
        if pooled is not None and "vector" in parts:
            pooled = pooled.clone()
        pieces = []
        for j, kind in enumerate(self._chunks):
            own = slice(j * per_chunk, (j + 1) * per_chunk)
            if kind != 0:
                pieces.append(crossattn[own])
                continue
            part = self._and_part(crossattn[own])
            feed = [conds_list[i][part][0] for i in range(per_chunk)]
            pieces.append(parts["crossattn"][feed].to(crossattn))
            if pooled is not None and "vector" in parts:
                pooled[own] = parts["vector"][feed].to(pooled)
        length = math.lcm(*(piece.shape[1] for piece in pieces))
        new = {**cond, "c_crossattn": torch.cat([p.repeat(1, length // p.shape[1], 1) for p in pieces])}
        if pooled is not None:
            new["y"] = pooled
        return new

    def _and_part(self, rows: torch.Tensor) -> int:
        """Which AND part of the prompt a cond chunk holds: the step's condition whose
        crossattn it equals (repeated to the call's length)."""
        if len(self.job_conds) <= 1:
            return 0
        for part, own in enumerate(self.job_conds):
            own = own.to(rows)
            if rows.shape[1] % own.shape[1] == 0 and torch.equal(
                rows, own.repeat(1, rows.shape[1] // own.shape[1], 1)
            ):
                return part
        raise RuntimeError(f"{TITLE}: a cond chunk matches no AND part of the prompt")

    def _timed_plan(self) -> Plan:
        """The plan with start sigmas from the sampler's schedule, where variable denoise needs them."""
        if self.original is None or not (
            self.plan.settings.variable_denoise or self.plan.pixel_strength is not None
        ):
            return self.plan
        if self.schedule is None or self.schedule.sigmas is None:
            self._note(NO_SCHEDULE_NOTE)
            return dataclasses.replace(
                self.plan,
                leaves=[
                    dataclasses.replace(leaf, start_sigma=math.inf if not leaf.skipped else 0.0)
                    for leaf in self.plan.leaves
                ],
                # grey pixels cannot be timed either: they start with the job, black ones never do
                pixel_strength=None
                if self.plan.pixel_strength is None
                else (self.plan.pixel_strength > 0).float(),
            )
        return self.plan.with_sigmas(self.schedule.sigmas)

    def _note(self, note: str) -> None:
        if note not in self._noted and self.on_note:
            self._noted.add(note)
            self.on_note(note)


def _per_window_options(cond: dict, chunks: list[int], sigma_rows: torch.Tensor) -> dict:
    """transformer_options that describe the rows of a batch of windows, as Forge lays them out."""
    options = cond.get("transformer_options")
    if not isinstance(options, dict) or "cond_or_uncond" not in options:
        return cond
    rows = sigma_rows.shape[0] // len(chunks)
    marks = [chunk for chunk in chunks for _ in range(rows)]
    options = {
        **options,
        "cond_or_uncond": list(chunks),
        "cond_mark": torch.tensor(marks).to(sigma_rows),
        "cond_indices": [i for i, mark in enumerate(marks) if mark == 0],
        "uncond_indices": [i for i, mark in enumerate(marks) if mark != 0],
    }
    return {**cond, "transformer_options": options}


def install(p: Any, plan: Plan | None, original: torch.Tensor | None, **callbacks: Any) -> UnetWrapper:
    """Clone the pass's UNet patcher and set the tiled wrapper on it, chaining any earlier one."""
    unet = p.sd_model.forge_objects.unet.clone()
    previous = unet.model_options.get("model_function_wrapper")
    patches = InstancePatches()
    sampler = getattr(p, "sampler", None)
    schedule = ScheduleRecorder(sampler, patches) if sampler is not None else None
    cfg = getattr(sampler, "model_wrap_cfg", None)
    wrapper = UnetWrapper(
        plan, original, previous=previous, schedule=schedule, patches=patches, cfg=cfg, **callbacks
    )
    if plan is not None:
        wrapper.error = forge_refusal(p)
    unet.set_model_unet_function_wrapper(wrapper)
    unet.model_options.setdefault("conditioning_modifiers", []).append(wrapper.take_control)
    p.sd_model.forge_objects.unet = unet
    return wrapper
