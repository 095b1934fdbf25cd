"""AUTOMATIC1111 WebUI 1.10: the tiled denoiser on one sampler instance.

The hook replaces `forward` on the sampler's own `model_wrap_cfg.inner_model` (an
instance attribute, never a class or module function). A1111 makes a new sampler, and
so a new inner model, for every sampling pass, so nothing can outlive the job; `remove`
also undoes it explicitly when the job ends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..denoiser import TiledDenoiser
from ..plan import Plan
from ..prompts import WindowPrompt
from .controlnet import A1111Units
from .patches import InstancePatches, ScheduleRecorder
from .prompts import WindowConds, cond_parts


class SamplerHook:
    """The tiled denoiser installed on one A1111 sampler (k-diffusion or timestep sampler).

    The clean original is the sampler's `init_latent`, read at the first call (it is set by
    `sample_img2img`, also in the hires pass, and is None in a txt2img first pass).
    """

    def __init__(
        self,
        sampler: Any,
        plan: Plan,
        progress: Callable[[int, int], None] | None = None,
        on_note: Callable[[str], None] | None = None,
        controlnet: Callable[[], A1111Units | None] = lambda: None,
        window_conds: Callable[[], WindowConds] | None = None,
    ):
        self.sampler, self.plan, self.progress, self.on_note = sampler, plan, progress, on_note
        self.controlnet = controlnet  # the job's ControlNet units, looked up at the first call
        # Windows with prompts of their own: the pass's WindowConds (it encodes on first use).
        told = window_conds is not None and any(leaf.prompt for leaf in plan.leaves)
        self.window_conds: WindowConds | None = window_conds() if told else None
        self.rows_seen = 0  # rows of the CFG denoiser's batch handed to the inner model this step
        self.cond_rows: int | None = None  # how many of them are cond rows (they come first)
        self.call_rows = range(0)  # the batch rows of the inner call being evaluated
        self.cfg = sampler.model_wrap_cfg
        self.inner = self.cfg.inner_model
        self.denoiser: TiledDenoiser | None = None
        self.step_x: torch.Tensor | None = None
        self.patches = InstancePatches()
        self.timesteps = not hasattr(sampler, "get_sigmas")

    def install(self) -> SamplerHook:
        model = self.inner.forward  # the class's bound forward, called for every window batch
        if self.timesteps:
            self.patches.set(
                self.inner, "forward", lambda x, t, **kw: self._by_rows(self._eps_forward, model, x, t, **kw)
            )
        else:
            self.patches.set(
                self.inner,
                "forward",
                lambda x, sigma, **kw: self._by_rows(
                    lambda m, x, s, **k: self._denoiser(m)(x, s, **k), model, x, sigma, **kw
                ),
            )
        self.schedule = ScheduleRecorder(
            self.sampler, self.patches, self._sigmas_of_timesteps if self.timesteps else None
        )
        cfg_forward = self.cfg.forward

        def remember_x(x, *args, **kwargs):
            self.step_x = x  # the B rows of this step: inner-model rows are copies of them
            # The inner calls of this step take the batch's rows in order, cond rows (one per
            # image and AND part) first; count them to tell cond rows from uncond rows.
            cond = kwargs.get("cond", args[2] if len(args) > 2 else None)
            self.rows_seen = 0
            self.cond_rows = sum(len(parts) for parts in cond.batch) if hasattr(cond, "batch") else None
            return cfg_forward(x, *args, **kwargs)

        self.patches.set(self.cfg, "forward", remember_x)
        return self

    def remove(self) -> None:
        self.patches.remove()

    def _denoiser(self, model: Callable) -> TiledDenoiser:
        """The pass's denoiser, made at the first call (when init_latent and the schedule exist)."""
        if self.denoiser is None:
            original = getattr(self.cfg, "init_latent", None)
            plan = self.plan
            if original is not None and (plan.settings.variable_denoise or plan.pixel_strength is not None):
                if self.schedule.sigmas is None:
                    raise RuntimeError("Quadtree Tiled Diffusion: the sampler's schedule was not seen")
                plan = plan.with_sigmas(self.schedule.sigmas)
            units = self.controlnet()  # raises for a unit that cannot run per tile
            self.denoiser = TiledDenoiser(
                model,
                plan,
                original=original,
                progress=self.progress,
                row_images=self._row_images,
                around_batch=units.around if units else None,
                window_cond=self._window_cond if self.window_conds else None,
            )
            if units and units.one_window_per_call:
                self.denoiser.tile_batch = 1
            for note in self.denoiser.notes:
                if self.on_note:
                    self.on_note(note)
        self.denoiser.model = model  # timestep samplers give a model bound to this call's step
        return self.denoiser

    def _by_rows(self, forward: Callable, model: Callable, x: torch.Tensor, level, **kwargs) -> torch.Tensor:
        """Evaluate one inner call, knowing which rows of the step's batch it holds.

        Where windows have their own prompts and a window's cond rows would not have the
        length of the call's uncond rows, the call's cond and uncond rows are evaluated
        apart, as A1111 itself evaluates a cond and an uncond of different lengths.
        """
        first = self.rows_seen
        self.rows_seen += x.shape[0]
        rows = range(first, first + x.shape[0])
        cond_count = self._cond_count(rows)
        if 0 < cond_count < len(rows) and self._lengths_differ(kwargs["cond"]):
            parts = [(0, cond_count), (cond_count, len(rows))]
            return torch.cat(
                [self._with_rows(forward, model, x, level, rows, a, b, **kwargs) for a, b in parts]
            )
        self.call_rows = rows
        return forward(model, x, level, **kwargs)

    def _with_rows(self, forward, model, x, level, rows, a, b, **kwargs) -> torch.Tensor:
        self.call_rows = rows[a:b]
        n = x.shape[0]
        return forward(model, x[a:b], _row_slice(level, n, a, b), **_row_slice(kwargs, n, a, b))

    def _cond_count(self, rows: range) -> int:
        """How many of these batch rows are cond rows (0 when windows keep the job's prompt)."""
        if self.window_conds is None:
            return 0
        if self.cond_rows is None:
            raise RuntimeError("Quadtree Tiled Diffusion: the step's conditioning was not seen")
        return sum(1 for row in rows if row < self.cond_rows)

    def _lengths_differ(self, cond: dict) -> bool:
        """Whether some window prompt's rows have another token length than this call's."""
        length = _crossattn(cond).shape[1]
        return any(
            cond_parts(self.window_conds.at_step(prompt, self.cfg.step)[1])["crossattn"].shape[1] != length
            for prompt in {leaf.prompt for leaf in self.plan.leaves if leaf.prompt}
        )

    def _window_cond(self, prompt: WindowPrompt, kwargs: dict, rows: int) -> dict:
        """The call's conditioning with each cond row made from the window's prompt."""
        cond = kwargs["cond"]
        picks = [(i, row) for i, row in enumerate(self.call_rows) if row < self.cond_rows]
        if not picks:  # uncond rows only: nothing of the window's own
            return kwargs
        _, window = self.window_conds.at_step(prompt, self.cfg.step)
        new = dict(cond)
        for name, rows_of_prompt in cond_parts(window).items():
            key = "c_crossattn" if name == "crossattn" and "c_crossattn" in cond else name
            old = cond[key][0] if key == "c_crossattn" else cond[key]
            chosen = rows_of_prompt[[row for _, row in picks]].to(old)
            if len(picks) == old.shape[0]:
                value = chosen
            else:  # cond and uncond rows in one call: the lengths agree (see _by_rows)
                value = old.clone()
                value[[i for i, _ in picks]] = chosen
            new[key] = [value] if key == "c_crossattn" else value
        return {**kwargs, "cond": new}

    def _row_images(self, x: torch.Tensor, images: int) -> torch.Tensor:
        """Which image each row is a copy of (AND prompts repeat an image's cond rows)."""
        step_x = self.step_x
        if step_x is None or step_x.shape[0] != images or step_x.shape[1:] != x.shape[1:]:
            return torch.arange(x.shape[0], device=x.device) % images
        rows = x.flatten(1).float()
        distance = torch.stack([(rows - image.flatten().float()).abs().amax(1) for image in step_x], dim=1)
        return distance.argmin(dim=1)  # [rows]: nearest image (copies match exactly)

    def _alphas(self) -> torch.Tensor:
        return self.inner.inner_model.alphas_cumprod

    def _sigmas_of_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """A sigma schedule equivalent to a timestep sampler's, for the start sigmas.

        At img2img strength d such a sampler runs timesteps[:t_enc] from the top, so a tile
        of strength d first meets timesteps[t_enc - 1]; this schedule is laid out so that the
        k-diffusion rule `sigmas[N - t_enc - 1]` picks exactly that level.
        """
        alphas = self._alphas().double().cpu()
        levels = ((1 - alphas) / alphas).sqrt()[timesteps.long().cpu()]
        n = len(timesteps)
        return torch.cat([levels[[max(n - k - 2, 0) for k in range(n)]], torch.zeros(1, dtype=levels.dtype)])

    def _eps_forward(self, model: Callable, x: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        """Timestep samplers (DDIM, PLMS, UniPC) want eps: tile in x0 space, convert back.

        x_t = sqrt(a) x0 + sqrt(1 - a) eps is x_t / sqrt(a) = x0 + sigma eps in k-diffusion
        terms, with sigma = sqrt((1 - a) / a).
        """
        alpha = self._alphas()[t.long()].to(x.device, torch.float32).view(-1, 1, 1, 1)
        scale, sigma = alpha.sqrt(), ((1 - alpha) / alpha).sqrt()
        step = t.flatten()[:1]

        def x0_model(x_scaled, sigma_rows, **kw):
            eps = model(x_scaled * scale[:1], step.expand(x_scaled.shape[0]), **kw)
            return x_scaled - sigma[:1] * eps

        x0 = self._denoiser(x0_model)(x / scale, sigma.flatten(), **kwargs)
        return (x - scale * x0) / (1 - alpha).sqrt()


def _crossattn(cond: dict) -> torch.Tensor:
    return cond["c_crossattn"][0] if "c_crossattn" in cond else cond["crossattn"]


def _row_slice(value: Any, rows: int, a: int, b: int) -> Any:
    """Rows a:b of every per-row tensor (first dimension `rows`) in a conditioning structure."""
    if isinstance(value, dict):
        return {k: _row_slice(v, rows, a, b) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_row_slice(v, rows, a, b) for v in value)
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == rows:
        return value[a:b]
    return value


class FailingHook:
    """Makes the pass fail with `error` at its first model call (rejected settings)."""

    def __init__(self, sampler: Any, error: Exception, before_failing: Callable[[], None] = lambda: None):
        self.inner, self.error = sampler.model_wrap_cfg.inner_model, error
        self.before_failing = before_failing  # undo what other extensions expect a job's end to undo
        self.patches = InstancePatches()

    def install(self) -> FailingHook:
        def fail(*args, **kwargs):
            self.before_failing()
            raise self.error

        self.patches.set(self.inner, "forward", fail)
        return self

    def remove(self) -> None:
        self.patches.remove()
