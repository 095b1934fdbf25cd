"""Model families in Forge: SDXL, SD 2.x v, SD3 and Flux, each in Forge's own layout.

The stand-ins follow Forge's code (backend/sampling/sampling_function.py, modules/k_model.py,
modules/k_prediction.py, nn/flux.py, nn/mmditx.py, diffusion_engine/*.py):

- KModel.apply_model(x, sigma, c_crossattn=..., transformer_options=..., **extra) scales the
  input with the predictor, calls the diffusion model and returns x0 through
  `calculate_denoised` (eps, v and flow alike); the wrapper gets `timestep` = sigma.
- SDXL: `y` [rows, 2816]; SD3: 16 channels, `y` [rows, 2048], 2x2 patches, odd sizes fail;
  Flux: 16 channels, `y` [rows, 768], distilled `guidance` [rows], 2x2 patches padded
  circularly when odd, CFG 1 so only cond rows (`cond_or_uncond == [0]`).
- Flow models: sigma in [0, 1], img2img noise `sigma * n + (1 - sigma) * x`, shifted schedules.

The diffusion models are analytic: the posterior mean of N(centre, spread^2) data for the
family's noise form, coupled within each 2x2 patch for the patch models, so a window off the
patch grid gives another answer than the whole latent does.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import tiled_diffusion as td
from tiled_diffusion.hosts import families, webui

from . import fake_a1111 as fake
from .test_hosts_a1111 import H, W
from .test_hosts_forge import COND, UNCOND, UnetPatcher


class Predictor:
    """Forge's k_prediction: how the model's output becomes x0 and how img2img adds noise."""

    def __init__(self, kind: str):
        self.kind = kind
        self.prediction_type = {"eps": "epsilon", "v": "v_prediction", "flow": "const"}[kind]

    def calculate_input(self, sigma, x):
        if self.kind == "flow":
            return x
        return x / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5

    def calculate_denoised(self, sigma, output, x):
        sigma = sigma.view(-1, 1, 1, 1)
        if self.kind == "v":
            return x / (sigma**2 + 1) - output * sigma / (sigma**2 + 1) ** 0.5
        return x - output * sigma

    def noise_scaling(self, sigma, noise, latent):
        if self.kind == "flow":
            return sigma * noise + (1.0 - sigma) * latent
        return latent + sigma * noise


class AnalyticDiffusionModel:
    """A diffusion model whose x0 is the posterior mean, per pixel or per 2x2 patch.

    `centre` takes each row's text, pooled vector and guidance, so a row given another
    row's conditioning shows in the result.
    """

    patch = 1
    pad_odd = False  # Flux pads odd sizes circularly; SD3 fails on them

    def __init__(self, kind: str, spread: float = 0.5):
        self.kind, self.spread, self.shapes = kind, spread, []

    def __call__(self, xc, sigma, context, control=None, transformer_options=None, y=None, guidance=None):
        self.shapes.append(tuple(xc.shape))
        rows = xc.shape[0]
        assert context.shape[0] == rows and (y is None or y.shape[0] == rows)
        marks = transformer_options["cond_mark"]
        assert marks.shape[0] == rows == sigma.shape[0]
        s = sigma.view(-1, 1, 1, 1)
        x = xc if self.kind == "flow" else xc * (s**2 + 1) ** 0.5
        centre = 0.2 + context[:, :1, :1].unsqueeze(-1)
        if y is not None:
            centre = centre + 0.1 * y[:, :1, None, None]
        if guidance is not None:
            centre = centre + 0.01 * guidance.view(-1, 1, 1, 1)
        s2 = self.spread**2
        if self.kind == "flow":
            x0 = centre + (1 - s) * s2 / ((1 - s) ** 2 * s2 + s**2) * (x - (1 - s) * centre)
        else:
            x0 = centre + s2 / (s2 + s**2) * (x - centre)
        x0 = self._coupled(x0)
        if self.kind == "v":
            return (x / (s**2 + 1) - x0) * (s**2 + 1) ** 0.5 / s
        return (x - x0) / s

    def _coupled(self, x0):
        if self.patch == 1:
            return x0
        h, w = x0.shape[-2:]
        if self.pad_odd:
            x0 = torch.nn.functional.pad(x0, (0, w % 2, 0, h % 2), mode="circular")
        assert x0.shape[-2] % 2 == 0 and x0.shape[-1] % 2 == 0, "SD3's patch embedding needs even sizes"
        means = torch.nn.functional.avg_pool2d(x0, 2).repeat_interleave(2, -2).repeat_interleave(2, -1)
        return (x0 + 0.5 * (means - x0))[..., :h, :w]


# Class names as Forge's; the family detection reads them and `patch_size`.
class IntegratedUNet2DConditionModel(AnalyticDiffusionModel):
    input_blocks = ()


class IntegratedFluxTransformer2DModel(AnalyticDiffusionModel):
    patch, pad_odd = 2, True


class MMDiTX(AnalyticDiffusionModel):
    patch = patch_size = 2


class NextDiT(AnalyticDiffusionModel):
    """A transformer the extension does not know (no patch size to read)."""


class KModel:
    """Forge's KModel.apply_model (the wrapper's `model_function`); the diffusion model
    gets sigma as its timestep here, to compute its analytic answer."""

    def __init__(self, diffusion_model, predictor):
        self.diffusion_model, self.predictor = diffusion_model, predictor

    def apply_model(
        self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw
    ):
        xc = self.predictor.calculate_input(t, x)
        out = self.diffusion_model(
            xc, t, context=c_crossattn, control=control, transformer_options=transformer_options, **kw
        )
        return self.predictor.calculate_denoised(t, out, x)


def flux_sigmas(steps: int) -> torch.Tensor:
    """Forge's PredictionFlux (mu 1.15) with the Simple scheduler."""
    t = torch.linspace(1, 0, steps + 1)[:-1]
    return torch.cat([math.exp(1.15) / (math.exp(1.15) + (1 / t - 1)), torch.zeros(1)])


def sd3_sigmas(steps: int) -> torch.Tensor:
    """Forge's PredictionDiscreteFlow (shift 3) with the Simple scheduler."""
    t = torch.linspace(1, 0, steps + 1)[:-1]
    return torch.cat([3 * t / (1 + 2 * t), torch.zeros(1)])


FAMILIES = {
    # engine class, diffusion model, prediction, channels, cond per row, sigmas, CFG
    "SDXL": ("StableDiffusionXL", IntegratedUNet2DConditionModel, "eps", 4, {"y": 2816}, fake.karras, 5.0),
    "SD2-v": ("StableDiffusion2", IntegratedUNet2DConditionModel, "v", 4, {}, fake.karras, 5.0),
    "SD3": ("StableDiffusion3", MMDiTX, "flow", 16, {"y": 2048}, sd3_sigmas, 4.0),
    "Flux": (
        "Flux",
        IntegratedFluxTransformer2DModel,
        "flow",
        16,
        {"y": 768, "guidance": 0},
        flux_sigmas,
        1.0,
    ),
}


def conditioning(family: str, batch: int) -> tuple[dict, dict]:
    """The compiled `model_conds` of Forge for the cond and uncond prompts (B rows each)."""
    extra = FAMILIES[family][4]
    g = torch.Generator().manual_seed(3)

    def one(scale):
        c = {"c_crossattn": torch.randn(batch, 77, 16, generator=g) * scale}
        for name, width in extra.items():
            c[name] = (
                torch.full((batch,), 3.5) if name == "guidance" else torch.randn(batch, width, generator=g)
            )
        return c

    return one(0.3), one(0.0)


def cfg_denoise(p, x, sigma, cond, uncond):
    """Forge's sampling_function_inner / calc_cond_uncond_batch for one step."""
    unet = p.sd_model.forge_objects.unet
    chunks = [(COND, cond)] if math.isclose(p.cfg_scale, 1.0) else [(UNCOND, uncond), (COND, cond)]
    kinds = [kind for kind, _ in chunks]
    marks = [kind for kind in kinds for _ in range(x.shape[0])]
    options = {
        **unet.model_options["transformer_options"],
        "cond_or_uncond": kinds,
        "sigmas": sigma,
        "cond_mark": torch.tensor(marks, dtype=torch.float32),
        "cond_indices": [i for i, m in enumerate(marks) if m == COND],
        "uncond_indices": [i for i, m in enumerate(marks) if m == UNCOND],
    }
    c = {name: torch.cat([chunk[name] for _, chunk in chunks]) for name in cond}
    c["transformer_options"] = options
    input_x, timestep = torch.cat([x] * len(chunks)), torch.cat([sigma] * len(chunks))
    wrapper = unet.model_options.get("model_function_wrapper")
    if wrapper:
        params = {"input": input_x, "timestep": timestep, "c": c, "cond_or_uncond": kinds}
        result = wrapper(unet.model.apply_model, params)
    else:
        result = unet.model.apply_model(input_x, timestep, **c)
    out = dict(zip(kinds, result.chunk(len(chunks))))
    if len(chunks) == 1:
        return out[COND]
    return out[UNCOND] + (out[COND] - out[UNCOND]) * p.cfg_scale


class Sampler:
    """Forge's KDiffusionSampler.sample_img2img and sample, with k-diffusion's Euler."""

    def __init__(self, k_diffusion, sigmas):
        self.k_diffusion, self.sigmas = k_diffusion, sigmas

    def get_sigmas(self, p, steps):
        return self.sigmas(steps)

    def sample_img2img(self, p, x, noise, cond, uncond):
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        schedule = self.get_sigmas(p, steps)[steps - t_enc - 1 :]
        xi = p.sd_model.forge_objects.unet.model.predictor.noise_scaling(schedule[0], noise, x)
        return self.k_diffusion.sampling.sample_euler(
            lambda x, sigma: cfg_denoise(p, x, sigma, cond, uncond), xi, schedule, disable=True
        )


def forge_job(k_diffusion, family, image, batch=1, **fields):
    engine, model_class, kind, channels, _, sigmas, cfg = FAMILIES[family]
    p = fake.processing([image] if image else None, W, H, batch, cfg_scale=cfg, **fields)
    unet = UnetPatcher(KModel(model_class(kind), Predictor(kind)))
    p.sd_model = type(engine, (), {})()
    p.sd_model.forge_objects = SimpleNamespace(unet=unet)
    p.sd_model.forge_objects_original = unet
    p.sampler = Sampler(k_diffusion, sigmas)
    return p


def latents(family: str, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    channels = FAMILIES[family][3]
    return tuple(torch.randn(batch, channels, H // 8, W // 8, generator=g) for _ in range(2))


def run(p, job_args, original, noise, family):
    """One Forge job: forge_objects restored, the script's hooks, then the sampler."""
    p.sd_model.forge_objects.unet = p.sd_model.forge_objects_original
    job = webui.start(p, job_args)
    if job:
        job.before_sampling(p, original)
    cond, uncond = conditioning(family, original.shape[0])
    try:
        out = p.sampler.sample_img2img(p, original, noise, cond, uncond)
    finally:
        if job:
            job.finish()
    return out, job


def args(**values):
    # An overlap of 3 latent px and a view of 25: off the 2x2 grid unless the plan aligns them.
    base = {"overlap": 24, "min_window": 200, "tile_batch": 3, "min_tile": 64, "max_tile": 256}
    base.update(skip_below=100, detail_threshold=100)  # two windows skipped, two of one shape denoised
    return td.Settings(enabled=True, **{**base, **values}).as_args()


def own_mask(plan: td.Plan, keep) -> torch.Tensor:
    """Pixels of the tiles that pass `keep`, outside every band of a window that does not:
    there the result is that of those tiles alone, with no blend across the overlap."""
    mask = torch.zeros(plan.latent_size, dtype=torch.bool)
    for leaf in plan.leaves:
        if keep(leaf):
            mask[leaf.y : leaf.y + leaf.h, leaf.x : leaf.x + leaf.w] = True
    for window in plan.windows:
        if not keep(plan.leaves[window.leaves[0]]):
            for band in window.bands:
                mask[band.y : band.y + band.h, band.x : band.x + band.w] = False
    return mask


def kept_mask(plan: td.Plan, skipped: bool = True) -> torch.Tensor:
    return own_mask(plan, lambda leaf: leaf.skipped == skipped)


def diffusion_model(p):
    return p.sd_model.forge_objects_original.model.diffusion_model


@pytest.mark.parametrize(
    "family, name, align",
    [
        ("SDXL", "StableDiffusionXL", 1),
        ("SD2-v", "StableDiffusion2 v-prediction", 1),
        ("SD3", "StableDiffusion3 (flow)", 2),
        ("Flux", "Flux (flow)", 2),
    ],
)
def test_forge_family_and_patch_grid_are_read_from_the_model(k_diffusion, init_image, family, name, align):
    assert families.of_job(forge_job(k_diffusion, family, init_image)) == families.Family(name, align)


@pytest.mark.parametrize("method", td.settings.METHODS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forge_family_keeps_skipped_tiles_and_matches_untiled_elsewhere(
    k_diffusion, init_image, family, method
):
    original, noise = latents(family, 2, 21)
    p = forge_job(k_diffusion, family, init_image, batch=2)
    out, job = run(p, args(method=method), original, noise, family)
    plain, _ = run(forge_job(k_diffusion, family, init_image, 2), [False], original, noise, family)
    kept, denoised = kept_mask(job.plan), kept_mask(job.plan, skipped=False)
    assert kept.any() and denoised.any()
    torch.testing.assert_close(out[..., kept], original[..., kept], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[..., denoised], plain[..., denoised], atol=1e-4, rtol=1e-4)
    shapes = diffusion_model(p).shapes
    assert shapes and max(s[-1] for s in shapes) < W // 8, "the model saw tiles"
    rows = 2 if math.isclose(p.cfg_scale, 1.0) else 4  # Flux: cond rows only
    assert any(s[0] > rows for s in shapes), "several windows per model call"
    align = FAMILIES[family][1].patch
    assert all(s[-1] % align == 0 and s[-2] % align == 0 for s in shapes)


@pytest.mark.parametrize("family", ["SD3", "Flux"])
def test_windows_off_the_patch_grid_would_change_the_result(k_diffusion, init_image, family, monkeypatch):
    """The check above has teeth: the same plan without alignment differs (Flux) or fails (SD3)."""
    monkeypatch.setattr(families, "of_job", lambda p: families.Family(family, align=1))
    original, noise = latents(family, 1, 22)
    p = forge_job(k_diffusion, family, init_image)
    if family == "SD3":
        with pytest.raises(AssertionError, match="even sizes"):
            run(p, args(), original, noise, family)
        return
    out, job = run(p, args(), original, noise, family)
    plain, _ = run(forge_job(k_diffusion, family, init_image), [False], original, noise, family)
    assert any(w.w % 2 or w.x % 2 for w in job.plan.windows)
    denoised = kept_mask(job.plan, skipped=False)
    assert (out[..., denoised] - plain[..., denoised]).abs().max() > 1e-3


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forge_family_variable_denoise_equals_standalone_img2img_per_tile(k_diffusion, init_image, family):
    original, noise = latents(family, 1, 23)
    p = forge_job(k_diffusion, family, init_image, denoising_strength=0.9)
    settings = args(variable_denoise=True, denoise_largest=0.3, denoise_smallest=0.8, skip_below=0)
    out, job = run(p, settings, original, noise, family)
    assert p.denoising_strength == pytest.approx(0.8)
    strengths = {leaf.strength for leaf in job.plan.leaves}
    assert len(strengths) >= 3
    for strength in strengths:
        single = forge_job(k_diffusion, family, init_image, denoising_strength=strength)
        alone, _ = run(single, [False], original, noise, family)
        own = own_mask(job.plan, lambda leaf, strength=strength: leaf.strength == strength)
        assert own.any()
        torch.testing.assert_close(out[..., own], alone[..., own], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["SDXL", "Flux"])
def test_forge_family_hires_pass_keeps_skipped_tiles_of_the_upscaled_latent(k_diffusion, family):
    upscaled, noise = latents(family, 1, 24)
    upscaled[..., : W // 16] = torch.linspace(-1, 1, W // 16)  # a flat left half: large tiles there
    p = forge_job(k_diffusion, family, None, is_hr_pass=True, enable_hr=True, denoising_strength=0.5)
    out, job = run(p, args(detail_threshold=60), upscaled, noise, family)
    kept = kept_mask(job.plan)
    assert kept.any() and not kept.all()
    torch.testing.assert_close(out[..., kept], upscaled[..., kept], atol=1e-4, rtol=0)
    assert torch.isfinite(out).all()
    align = FAMILIES[family][1].patch
    assert all(w.x % align == 0 and w.w % align == 0 for w in job.plan.windows)


def test_forge_unknown_transformer_is_refused_naming_the_model_type(k_diffusion, init_image):
    original, noise = latents("Flux", 1, 25)
    p = forge_job(k_diffusion, "Flux", init_image)
    p.sd_model = type("Lumina2", (), {"forge_objects": p.sd_model.forge_objects})()
    p.sd_model.forge_objects_original = p.sd_model.forge_objects.unet
    p.sd_model.forge_objects.unet.model.diffusion_model = NextDiT("flow")
    with pytest.raises(td.SettingsError, match=r"Lumina2 \(flow\), diffusion model NextDiT"):
        run(p, args(), original, noise, "Flux")
    out, _ = run(p, [False], original, noise, "Flux")  # the job without the extension still runs
    assert torch.isfinite(out).all()


# A1111 1.10: SD 2.x v through k-diffusion's real CompVisVDenoiser, SDXL's crossattn/vector
# layout, and SD3 (SD3Denoiser.forward -> SD3Inferencer.apply_model, which returns x0 of a
# flow model; img2img noise from add_noise_to_latent).


class UNetModel:
    input_blocks = ()


class MMDiT:
    patch_size = 2


class SD3Inferencer:
    """A1111's SD3Inferencer.apply_model(x, sigma, cond) -> x0, with an analytic flow model."""

    is_sd3, parameterization = True, "eps"

    def __init__(self):
        self.model = SimpleNamespace(diffusion_model=MMDiT())
        self.flow = MMDiTX("flow")
        self.shapes = self.flow.shapes

    def apply_model(self, x, sigma, cond):
        assert cond["crossattn"].shape[0] == cond["vector"].shape[0] == x.shape[0]
        rows = x.shape[0]
        options = {"cond_mark": torch.zeros(rows)}
        out = self.flow(x, sigma, cond["crossattn"], transformer_options=options, y=cond["vector"])
        return x - out * sigma.view(-1, 1, 1, 1)

    @staticmethod
    def add_noise_to_latent(x, noise, amount):
        return x * (1 - amount) + noise * amount


class SD3Denoiser(torch.nn.Module):
    def __init__(self, inner_model):
        super().__init__()
        self.inner_model = inner_model

    def forward(self, input, sigma, **kwargs):
        return self.inner_model.apply_model(input, sigma, **kwargs)


def a1111_job(k_diffusion, state, family, image, batch, **fields):
    p = fake.processing([image] if image else None, W, H, batch, **fields)
    if family == "SD3":
        model = SD3Inferencer()
        p.sampler = fake.KDiffusionSampler(k_diffusion, fake.AnalyticSD(), state)
        p.sampler.model_wrap_cfg.inner_model = SD3Denoiser(model)
        p.sampler.sigmas, p.sampler.add_noise_to_latent = sd3_sigmas, model.add_noise_to_latent
        p.sd_model = model
    else:
        model = fake.AnalyticSD(sdxl=family == "SDXL", v=family == "SD2-v")
        p.sampler = fake.KDiffusionSampler(k_diffusion, model, state)
        flags = {"SDXL": "is_sdxl", "SD2-v": "is_sd2"}
        p.sd_model = SimpleNamespace(
            parameterization=model.parameterization, model=SimpleNamespace(diffusion_model=UNetModel())
        )
        setattr(p.sd_model, flags[family], True)
    p.sampler.model_wrap_cfg.sdxl = family in ("SDXL", "SD3")  # the crossattn/vector dict
    return p, model


def run_a1111(k_diffusion, state, family, job_args, original, noise, batch=None, image=None, **fields):
    p, model = a1111_job(k_diffusion, state, family, image, batch or original.shape[0], **fields)
    job = webui.start(p, job_args)
    if job:
        job.before_sampling(p, original)
    g = torch.Generator().manual_seed(4)
    cond = torch.randn(original.shape[0], 77, 16, generator=g) * 0.3
    uncond = torch.zeros_like(cond)
    try:
        out = p.sampler.sample_img2img(p, original, noise, cond, uncond, fake.image_cond(original.shape[0]))
    finally:
        if job:
            job.finish()
    return out, job, p, model


@pytest.mark.parametrize(
    "family, name, align", [("SDXL", "SDXL", 1), ("SD2-v", "SD 2.x v-prediction", 1), ("SD3", "SD3", 2)]
)
def test_a1111_family_and_patch_grid_are_read_from_the_model(k_diffusion, state, family, name, align):
    p, _ = a1111_job(k_diffusion, state, family, None, 1)
    assert families.of_job(p) == families.Family(name, align)


@pytest.mark.parametrize("method", td.settings.METHODS)
@pytest.mark.parametrize("family", ["SDXL", "SD2-v", "SD3"])
def test_a1111_family_keeps_skipped_tiles_and_matches_untiled_elsewhere(
    k_diffusion, state, init_image, family, method
):
    original, noise = latents("SD3" if family == "SD3" else "SDXL", 2, 31)
    out, job, p, model = run_a1111(
        k_diffusion, state, family, args(method=method), original, noise, image=init_image
    )
    plain, *_ = run_a1111(k_diffusion, state, family, [False], original, noise, image=init_image)
    if family == "SD2-v":
        assert isinstance(p.sampler.model_wrap_cfg.inner_model, k_diffusion.external.CompVisVDenoiser)
    kept, denoised = kept_mask(job.plan), kept_mask(job.plan, skipped=False)
    assert kept.any() and denoised.any()
    torch.testing.assert_close(out[..., kept], original[..., kept], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[..., denoised], plain[..., denoised], atol=1e-4, rtol=1e-4)
    assert max(s[-1] for s in model.shapes) < W // 8 and any(s[0] > 4 for s in model.shapes)
    assert all(s[-1] % 2 == 0 and s[-2] % 2 == 0 for s in model.shapes) or family != "SD3"


@pytest.mark.parametrize("family", ["SDXL", "SD2-v", "SD3"])
def test_a1111_family_variable_denoise_equals_standalone_img2img_per_tile(
    k_diffusion, state, init_image, family
):
    original, noise = latents("SD3" if family == "SD3" else "SDXL", 1, 32)
    settings = args(variable_denoise=True, denoise_largest=0.3, denoise_smallest=0.8, skip_below=0)
    out, job, p, _ = run_a1111(k_diffusion, state, family, settings, original, noise, image=init_image)
    assert p.denoising_strength == pytest.approx(0.8)
    strengths = {leaf.strength for leaf in job.plan.leaves}
    assert len(strengths) >= 3
    for strength in strengths:
        alone, *_ = run_a1111(
            k_diffusion,
            state,
            family,
            [False],
            original,
            noise,
            image=init_image,
            denoising_strength=strength,
        )
        own = own_mask(job.plan, lambda leaf, strength=strength: leaf.strength == strength)
        torch.testing.assert_close(out[..., own], alone[..., own], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["SDXL", "SD2-v"])
def test_a1111_family_hires_pass_keeps_skipped_tiles_of_the_upscaled_latent(k_diffusion, state, family):
    upscaled, noise = latents("SDXL", 1, 33)
    upscaled[..., : W // 16] = torch.linspace(-1, 1, W // 16)
    out, job, *_ = run_a1111(
        k_diffusion,
        state,
        family,
        args(detail_threshold=60),
        upscaled,
        noise,
        is_hr_pass=True,
        denoising_strength=0.5,
    )
    kept = kept_mask(job.plan)
    assert kept.any() and not kept.all()
    torch.testing.assert_close(out[..., kept], upscaled[..., kept], atol=1e-4, rtol=0)
