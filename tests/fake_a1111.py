"""A small stand-in for A1111 1.10's sampling stack, with its call patterns and cond layouts.

Written from DESIGN.md section 4 and the behaviour of the real WebUI: the CFG denoiser
stacks cond rows (repeated per AND sub-prompt) then uncond rows, calls the inner model
in one call or in split calls, and the samplers compute their schedule with
`get_sigmas` / `get_timesteps` inside `sample_img2img` and set `init_latent` there.
The inner model is k-diffusion's real `CompVisDenoiser` around an analytic eps model.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

from tiled_diffusion.settings import TITLE

from .conftest import InterruptedException  # noqa: F401 - the hosts' interrupt


def sd15_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


class AnalyticSD:
    """An eps model whose x0 is the pixel-wise posterior mean of N(mu + text, spread^2) data.

    `text` is the first value of each row's cross-attention tensor, so cond and uncond
    rows differ and a row given the wrong image or prompt shows in the result.
    """

    parameterization = "eps"

    def __init__(
        self, mu: float = 0.2, spread: float = 0.5, sdxl: bool = False, on_call=None, v: bool = False
    ):
        self.parameterization = "v" if v else "eps"  # SD 2.x 768-v: A1111 wraps it in CompVisVDenoiser
        self.alphas_cumprod = sd15_alphas_cumprod()
        self.log_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt().log()
        self.mu, self.spread, self.sdxl = mu, spread, sdxl
        self.calls, self.on_call, self.shapes = 0, on_call, []
        self.control = None  # ControlNet's UNet hook: x -> a shift of each pixel's prior mean

    def sigma_of(self, t: torch.Tensor) -> torch.Tensor:
        low = t.float().floor().long().clamp(0, 998)
        w = t.float() - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[low + 1]).exp()

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        self.calls += 1
        self.shapes.append(tuple(x.shape))
        if self.on_call:
            self.on_call(self.calls)  # a failure injected by a test
        text = cond["crossattn"] if self.sdxl else cond["c_crossattn"][0]
        assert text.shape[0] == x.shape[0] == cond["c_concat"][0].shape[0]
        if self.sdxl:
            assert cond["vector"].shape[0] == x.shape[0]
        sigma = self.sigma_of(t).view(-1, 1, 1, 1)
        x_k = x * (sigma**2 + 1).sqrt()
        centre = self.mu + text[:, :1, :1].unsqueeze(-1)
        if self.control:
            centre = centre + self.control(x)
        s2 = self.spread**2
        x0 = centre + s2 / (s2 + sigma**2) * (x_k - centre)
        if self.parameterization == "v":  # what CompVisVDenoiser turns back into x0
            return (x0 - x_k / (sigma**2 + 1)) * -((sigma**2 + 1).sqrt()) / sigma
        return (x_k - x0) / sigma


class CFGDenoiser(torch.nn.Module):
    """Classifier-free guidance in A1111's row layout (cond rows first, then uncond)."""

    def __init__(self, inner_model: torch.nn.Module, state: SimpleNamespace, timesteps: bool = False):
        super().__init__()
        self.inner_model, self.state, self.timesteps = inner_model, state, timesteps
        self.init_latent = None
        self.mask = self.nmask = None  # inpainting: kept and repainted share, [C, H, W] (p.mask, p.nmask)
        self.split_calls = False  # prompts of different token lengths: cond and uncond apart
        self.repeats: list[int] | None = None  # AND sub-prompts per image
        self.sdxl = False

    def condition(self, text: torch.Tensor, image_cond: torch.Tensor) -> dict:
        if self.sdxl:
            return {"crossattn": text, "vector": text[:, 0, :8].clone(), "c_concat": [image_cond]}
        return {"c_crossattn": [text], "c_concat": [image_cond]}

    def forward(self, x, sigma, uncond, cond, cond_scale, image_cond):
        if self.state.interrupted:
            raise InterruptedException
        batch = x.shape[0]
        repeats = self.repeats or [1] * batch
        rows = [i for i, n in enumerate(repeats) for _ in range(n)]
        x_in = torch.cat([x[rows], x])
        sigma_in = torch.cat([sigma[rows], sigma])
        image_in = torch.cat([image_cond[rows], image_cond])
        cond_rows = torch.cat([cond[i : i + 1] + 0.01 * k for i, n in enumerate(repeats) for k in range(n)])
        text_in = torch.cat([cond_rows, uncond])
        if self.split_calls:
            c = len(rows)
            out = torch.cat(
                [
                    self.inner_model(x_in[:c], sigma_in[:c], cond=self.condition(text_in[:c], image_in[:c])),
                    self.inner_model(x_in[c:], sigma_in[c:], cond=self.condition(text_in[c:], image_in[c:])),
                ]
            )
        else:
            out = self.inner_model(x_in, sigma_in, cond=self.condition(text_in, image_in))
        denoised_uncond = out[len(rows) :]
        result = denoised_uncond.clone()
        for row, image in enumerate(rows):
            weight = 1 / repeats[image]
            result[image] += (out[row] - denoised_uncond[image]) * cond_scale * weight
        if self.mask is not None and not self.timesteps:  # the inpaint blend after denoising
            result = result * self.nmask + self.init_latent * self.mask
        return result


def karras(steps: int, sigma_min: float = 0.0292, sigma_max: float = 14.6146) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps)
    low, high = sigma_min ** (1 / 7), sigma_max ** (1 / 7)
    return torch.cat([(high + ramp * (low - high)) ** 7, torch.zeros(1)])


class KDiffusionSampler:
    def __init__(self, k_diffusion, model: AnalyticSD, state: SimpleNamespace, sampler: str = "sample_euler"):
        external = k_diffusion.external
        v = getattr(model, "parameterization", "eps") == "v"
        inner = (external.CompVisVDenoiser if v else external.CompVisDenoiser)(model)
        self.model_wrap_cfg = CFGDenoiser(inner, state)
        self.func = getattr(k_diffusion.sampling, sampler)
        self.last_latent = None
        self.sigmas = karras
        self.add_noise_to_latent = None  # SD3: shared.sd_model.add_noise_to_latent (flow noise)

    def get_sigmas(self, p, steps):
        return self.sigmas(steps)

    def launch_sampling(self, func):
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def _args(self, p, cond, uncond, image_cond):
        return {"cond": cond, "uncond": uncond, "cond_scale": p.cfg_scale, "image_cond": image_cond}

    def sample_img2img(self, p, x, noise, cond, uncond, image_cond):
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        sigmas = self.get_sigmas(p, steps)
        schedule = sigmas[steps - t_enc - 1 :]
        add_noise = self.add_noise_to_latent or (lambda x, noise, sigma: x + noise * sigma)
        xi = add_noise(x, noise, schedule[0])
        self.model_wrap_cfg.init_latent = x
        self.model_wrap_cfg.mask, self.model_wrap_cfg.nmask = (
            getattr(p, "mask", None),
            getattr(p, "nmask", None),
        )
        self.last_latent = x
        extra = self._args(p, cond, uncond, image_cond)
        return self.launch_sampling(
            lambda: self.func(
                self.model_wrap_cfg, xi, schedule, extra_args=extra, disable=True, callback=self._callback
            )
        )

    def sample(self, p, noise, cond, uncond, image_cond):
        sigmas = self.get_sigmas(p, p.steps)
        extra = self._args(p, cond, uncond, image_cond)
        return self.launch_sampling(
            lambda: self.func(
                self.model_wrap_cfg,
                noise * sigmas[0],
                sigmas,
                extra_args=extra,
                disable=True,
                callback=self._callback,
            )
        )

    def _callback(self, d):
        self.last_latent = d["denoised"]


class TimestepsDenoiser(torch.nn.Module):
    """A1111's CompVisTimestepsDenoiser: forward(x_t, t) is the model's eps."""

    def __init__(self, model: AnalyticSD):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class TimestepSampler:
    """DDIM (eta 0) the way A1111 runs it for img2img."""

    def __init__(self, model: AnalyticSD, state: SimpleNamespace):
        self.model_wrap_cfg = CFGDenoiser(TimestepsDenoiser(model), state, timesteps=True)
        self.alphas = model.alphas_cumprod
        self.pred_x0: list[torch.Tensor] = []

    def get_timesteps(self, p, steps):
        return torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)

    def sample_img2img(self, p, x, noise, cond, uncond, image_cond):
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        timesteps = self.get_timesteps(p, steps)
        a = self.alphas[timesteps[t_enc]]
        xi = x * a.sqrt() + noise * (1 - a).sqrt()
        self.model_wrap_cfg.init_latent = x
        schedule = timesteps[:t_enc]
        alphas = self.alphas[schedule]
        alphas_prev = self.alphas[torch.nn.functional.pad(schedule[:-1], (1, 0))]
        ones = xi.new_ones(xi.shape[0])
        for index in range(len(schedule) - 1, 0, -1):
            eps = self.model_wrap_cfg(
                xi, schedule[index].item() * ones, uncond, cond, p.cfg_scale, image_cond
            )
            a_t, a_prev = alphas[index], alphas_prev[index]
            pred_x0 = (xi - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            self.pred_x0.append(pred_x0)
            xi = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps
        return xi


def processing(init_images=None, width=512, height=384, batch=1, **fields) -> SimpleNamespace:
    """The fields of A1111's processing object `p` that the extension reads and writes."""
    p = SimpleNamespace(
        width=width,
        height=height,
        steps=12,
        cfg_scale=5.0,
        denoising_strength=0.75,
        resize_mode=0,
        extra_generation_params={},
        comments={},
        batch_index=0,
        is_hr_pass=False,
        batch_size=batch,
    )
    if init_images is not None:
        p.init_images = init_images
    p.comment = lambda text: p.comments.setdefault(text, 1)
    for key, value in fields.items():
        setattr(p, key, value)
    return p


def conditioning(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(batch, 77, 16, generator=g) * 0.3
    uncond = torch.zeros(batch, 77, 16)
    return cond, uncond


def image_cond(batch: int) -> torch.Tensor:
    return torch.zeros(batch, 5, 1, 1)  # A1111's dummy for non-inpainting SD1 models


def load_script(scripts_data=None):
    """The real scripts/ file, imported beside stand-ins for the WebUI modules it uses.

    Needs the `state` fixture's `modules`; its ui() builds with whatever sys.modules holds
    as gradio (an empty stand-in when nothing does). scripts_data: the WebUI's loaded
    scripts (`modules.scripts.scripts_data`, e.g. the X/Y/Z plot); the callbacks registered
    with `on_before_ui` are in `sys.modules["modules.script_callbacks"].before_ui`."""
    modules = sys.modules["modules"]
    modules.scripts = types.ModuleType("modules.scripts")

    class Script:
        def on_after_component(self, callback, *, elem_id):
            pass

    modules.scripts.Script, modules.scripts.AlwaysVisible = Script, object()
    modules.scripts.scripts_data = list(scripts_data or [])
    modules.script_callbacks = types.ModuleType("modules.script_callbacks")
    modules.script_callbacks.on_app_started = lambda callback: None
    modules.script_callbacks.before_ui = []
    modules.script_callbacks.on_before_ui = modules.script_callbacks.before_ui.append
    sys.modules.update(
        {"modules.scripts": modules.scripts, "modules.script_callbacks": modules.script_callbacks}
    )
    if "gradio" not in sys.modules:
        sys.modules["gradio"] = types.ModuleType("gradio")
    path = Path(__file__).parent.parent / "scripts" / "quadtree_tiled_diffusion.py"
    spec = importlib.util.spec_from_file_location("quadtree_script_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.IMPORT_ERROR is None, module.IMPORT_ERROR
    assert module.TITLE == TITLE  # the API name WebUI callers use
    return module.Script()
