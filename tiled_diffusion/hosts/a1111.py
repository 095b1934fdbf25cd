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
from .controlnet import A1111Units
from .patches import InstancePatches, ScheduleRecorder


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
    ):
        self.sampler, self.plan, self.progress, self.on_note = sampler, plan, progress, on_note
        self.controlnet = controlnet  # the job's ControlNet units, looked up at the first call
        self.cfg = sampler.model_wrap_cfg
        self.inner = self.cfg.inner_model
        self.denoiser: TiledDenoiser | None = None
        self.step_x: torch.Tensor | None = None
        self.patches = InstancePatches()
        self.timesteps = not hasattr(sampler, "get_sigmas")

    def install(self) -> SamplerHook:
        model = self.inner.forward  # the class's bound forward, called for every window batch
        if self.timesteps:
            self.patches.set(self.inner, "forward", lambda x, t, **kw: self._eps_forward(model, x, t, **kw))
        else:
            self.patches.set(
                self.inner, "forward", lambda x, sigma, **kw: self._denoiser(model)(x, sigma, **kw)
            )
        self.schedule = ScheduleRecorder(
            self.sampler, self.patches, self._sigmas_of_timesteps if self.timesteps else None
        )
        cfg_forward = self.cfg.forward

        def remember_x(x, *args, **kwargs):
            self.step_x = x  # the B rows of this step: inner-model rows are copies of them
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
            if original is not None and plan.settings.variable_denoise:
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
            )
            if units and units.one_window_per_call:
                self.denoiser.tile_batch = 1
            for note in self.denoiser.notes:
                if self.on_note:
                    self.on_note(note)
        self.denoiser.model = model  # timestep samplers give a model bound to this call's step
        return self.denoiser

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
