"""The A1111 adapter with A1111's call patterns, cond layouts and the real k-diffusion loop."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import tiled_diffusion as td
from tiled_diffusion.hosts import webui

from . import fake_a1111 as fake

W, H = 512, 384  # job size in px; latent 64 x 48


def args(**values):
    return td.Settings(enabled=True, **{"overlap": 0, "tile_batch": 4, "min_tile": 64, **values}).as_args()


def latents(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, H // 8, W // 8, generator=g), torch.randn(
        batch, 4, H // 8, W // 8, generator=g
    )


def run_img2img(
    k_diffusion,
    state,
    p,
    job_args,
    original,
    noise,
    sampler="sample_euler",
    model=None,
    configure=lambda cfg: None,
    run_job=True,
):
    """What A1111 does for one img2img job with the extension's script hooks."""
    model = model or fake.AnalyticSD()
    p.sampler = fake.KDiffusionSampler(k_diffusion, model, state, sampler)
    configure(p.sampler.model_wrap_cfg)
    job = webui.start(p, job_args) if run_job else None
    if job:
        job.before_sampling(p, original)
    cond, uncond = fake.conditioning(original.shape[0])
    out = p.sampler.sample_img2img(p, original, noise, cond, uncond, fake.image_cond(original.shape[0]))
    if job:
        job.finish()
    return out, job


def skipped_mask(plan: td.Plan) -> torch.Tensor:
    mask = torch.zeros(plan.latent_size, dtype=torch.bool)
    for leaf in plan.leaves:
        if leaf.skipped:
            mask[leaf.y : leaf.y + leaf.h, leaf.x : leaf.x + leaf.w] = True
    return mask


@pytest.mark.parametrize("sampler", ["sample_euler", "sample_dpmpp_2m", "sample_euler_ancestral"])
@pytest.mark.parametrize("layout", ["one call", "split calls", "sdxl", "and prompts"])
def test_img2img_keeps_skipped_tiles_and_matches_untiled_elsewhere(
    k_diffusion, state, init_image, sampler, layout
):
    batch = 2
    original, noise = latents(batch, 1)

    def configure(cfg):
        cfg.split_calls = layout == "split calls"
        cfg.sdxl = layout == "sdxl"
        cfg.repeats = [2, 1] if layout == "and prompts" else None

    model = fake.AnalyticSD(sdxl=layout == "sdxl")
    p = fake.processing([init_image], W, H, batch)
    out, job = run_img2img(
        k_diffusion, state, p, args(skip_below=100), original, noise, sampler, model, configure
    )
    torch.manual_seed(0)
    plain_p = fake.processing([init_image], W, H, batch)
    plain, _ = run_img2img(
        k_diffusion,
        state,
        plain_p,
        [False],
        original,
        noise,
        sampler,
        fake.AnalyticSD(sdxl=layout == "sdxl"),
        configure,
    )
    skipped = skipped_mask(job.plan)
    assert 0 < skipped.float().mean() < 1
    torch.testing.assert_close(out[..., skipped], original[..., skipped], atol=1e-4, rtol=0)
    if sampler != "sample_euler_ancestral":  # the ancestral noise draws differ once tiled
        torch.testing.assert_close(out[..., ~skipped], plain[..., ~skipped], atol=1e-4, rtol=1e-4)
    assert max(shape[-1] for shape in model.shapes) < W // 8, "the model saw tiles, not the whole latent"
    assert p.extra_generation_params["Quadtree skip below"] == 100


def test_and_prompt_rows_get_their_own_image_original(k_diffusion, state, init_image):
    original, noise = latents(3, 2)
    p = fake.processing([init_image], W, H, 3)
    out, _ = run_img2img(
        k_diffusion,
        state,
        p,
        args(skip_below=2048),
        original,
        noise,
        configure=lambda cfg: setattr(cfg, "repeats", [1, 3, 2]),
    )
    torch.testing.assert_close(out, original, atol=1e-4, rtol=0)


def test_variable_denoise_runs_the_job_at_the_largest_strength_and_each_tile_at_its_own(
    k_diffusion, state, init_image
):
    original, noise = latents(1, 3)
    p = fake.processing([init_image], W, H, 1, denoising_strength=0.9)
    settings = args(variable_denoise=True, denoise_largest=0.3, denoise_smallest=0.8)
    out, job = run_img2img(k_diffusion, state, p, settings, original, noise)
    assert p.denoising_strength == pytest.approx(job.plan.max_strength) == pytest.approx(0.8)
    strengths = {leaf.strength for leaf in job.plan.leaves}
    assert len(strengths) >= 3
    for strength in strengths:
        torch.manual_seed(0)
        alone, _ = run_img2img(
            k_diffusion,
            state,
            fake.processing([init_image], W, H, 1, denoising_strength=strength),
            [False],
            original,
            noise,
        )
        assert_tiles_of_strength_match(job.plan, strength, out, alone)


def assert_tiles_of_strength_match(plan: td.Plan, strength: float, out: torch.Tensor, alone: torch.Tensor):
    """Every tile of this strength equals the standalone img2img at that strength."""
    for leaf in plan.leaves:
        if leaf.strength == strength:
            region = (..., slice(leaf.y, leaf.y + leaf.h), slice(leaf.x, leaf.x + leaf.w))
            torch.testing.assert_close(out[region], alone[region], atol=1e-4, rtol=1e-4)


def test_timestep_sampler_tiles_in_x0_space(state, init_image):
    original, noise = latents(1, 4)
    p = fake.processing([init_image], W, H, 1, denoising_strength=0.6)
    model = fake.AnalyticSD()
    p.sampler = fake.TimestepSampler(model, state)
    job = webui.start(p, args(skip_below=100))
    job.before_sampling(p, original)
    cond, uncond = fake.conditioning(1)
    tiled = p.sampler.sample_img2img(p, original, noise, cond, uncond, fake.image_cond(1))
    job.finish()
    plain_sampler = fake.TimestepSampler(fake.AnalyticSD(), state)
    plain = plain_sampler.sample_img2img(p, original, noise, cond, uncond, fake.image_cond(1))
    skipped = skipped_mask(job.plan)
    for pred_x0 in p.sampler.pred_x0:  # every step predicts the original for skipped tiles
        torch.testing.assert_close(pred_x0[..., skipped], original[..., skipped], atol=1e-4, rtol=0)
    torch.testing.assert_close(tiled[..., ~skipped], plain[..., ~skipped], atol=1e-4, rtol=1e-4)
    assert max(shape[-1] for shape in model.shapes) < W // 8


def test_hires_pass_uses_the_upscaled_first_pass_as_original(k_diffusion, state):
    upscaled, noise = latents(1, 5)
    p = fake.processing(None, W, H, 1, is_hr_pass=True, denoising_strength=0.5)
    out, job = run_img2img(k_diffusion, state, p, args(skip_below=100, detail_threshold=60), upscaled, noise)
    skipped = skipped_mask(job.plan)
    assert skipped.any()
    torch.testing.assert_close(out[..., skipped], upscaled[..., skipped], atol=1e-4, rtol=0)


def test_txt2img_without_hires_denoises_every_tile_and_says_why(k_diffusion, state):
    p = fake.processing(None, W, H, 1)
    model = fake.AnalyticSD()
    p.sampler = fake.KDiffusionSampler(k_diffusion, model, state)
    job = webui.start(p, args(skip_below=300, variable_denoise=True))
    noise = latents(1, 6)[1]
    job.before_sampling(p, noise)
    hook = job.hooks[0]
    cond, uncond = fake.conditioning(1)
    out = p.sampler.sample(p, noise, cond, uncond, fake.image_cond(1))
    job.finish()
    assert torch.isfinite(out).all()
    assert any("skip and variable denoise" in text for text in p.comments)
    stats = hook.denoiser.stats
    assert stats["calls"] == p.steps
    assert stats["evaluated_pixels"] == p.steps * sum(w.w * w.h for w in job.plan.windows)


def test_controls_that_fail_to_build_never_stop_the_webui(state, monkeypatch):
    shown = []
    gradio = types.ModuleType("gradio")  # no Accordion, Slider, ...: building the controls fails
    gradio.HTML = shown.append
    monkeypatch.setitem(sys.modules, "gradio", gradio)
    script = fake.load_script()
    assert script.ui(True) == []
    assert "could not build its controls" in shown[0] and "AttributeError" in shown[0]
    script.process(fake.processing([Image.new("RGB", (W, H))], W, H, 1))  # no args: the UI had none
    assert script.job is None


@pytest.mark.parametrize("failure", ["exception on step 3", "interrupt"])
def test_no_hook_is_left_behind_after_a_failure(k_diffusion, state, init_image, failure):
    original, noise = latents(1, 7)
    script = fake.load_script()
    p = fake.processing([init_image], W, H, 1)

    def inject(call):
        if call == 3:  # the first of two tile batches in step 2
            if failure == "interrupt":
                state.interrupted = True  # stops at the next tile batch, not the next step
            else:
                raise RuntimeError("CUDA out of memory (simulated)")

    p.sampler = fake.KDiffusionSampler(k_diffusion, fake.AnalyticSD(on_call=inject), state)
    script.process(p, *args(skip_below=100, tile_batch=1))
    script.process_before_every_sampling(p, x=original)
    sampler = p.sampler
    cfg, inner = sampler.model_wrap_cfg, sampler.model_wrap_cfg.inner_model
    assert {"forward"} <= set(vars(inner)) and "get_sigmas" in vars(sampler) and "forward" in vars(cfg)
    cond, uncond = fake.conditioning(1)
    if failure == "interrupt":
        sampler.sample_img2img(p, original, noise, cond, uncond, fake.image_cond(1))
        assert sampler.model_wrap_cfg.inner_model.inner_model.calls == 3, "no model call after it"
        script.postprocess(p, None)  # A1111 finishes the job normally after an interrupt
    else:
        with pytest.raises(RuntimeError, match="out of memory"):
            sampler.sample_img2img(p, original, noise, cond, uncond, fake.image_cond(1))
        # A1111 skips postprocess after an exception: the next job's process() cleans up.
        script.process(fake.processing([init_image], W, H, 1), False)
    assert "forward" not in vars(inner) and "forward" not in vars(cfg) and "get_sigmas" not in vars(sampler)
    state.interrupted = False
    # The next job, with the extension off, is the plain WebUI result.
    torch.manual_seed(0)
    after, _ = run_img2img(
        k_diffusion, state, fake.processing([init_image], W, H, 1), [False], original, noise
    )
    torch.manual_seed(0)
    fresh, _ = run_img2img(
        k_diffusion, state, fake.processing([init_image], W, H, 1), [False], original, noise, run_job=False
    )
    torch.testing.assert_close(after, fresh)


def test_rejected_settings_fail_the_generation_naming_the_argument(k_diffusion, state, init_image):
    original, noise = latents(1, 8)
    p = fake.processing([init_image], W, H, 1)
    with pytest.raises(td.SettingsError, match="enabled: 'false'"):
        run_img2img(k_diffusion, state, p, ["false"], original, noise)


def test_progress_text_counts_tiles_within_a_step(k_diffusion, state, init_image):
    original, noise = latents(1, 9)
    p = fake.processing([init_image], W, H, 1)
    run_img2img(k_diffusion, state, p, args(tile_batch=1, max_tile=256), original, noise)
    assert any(text.startswith("Quadtree Tiled Diffusion: tile 1/") for text in state.textinfos)


def test_keep_pixels_pastes_the_init_image_into_skipped_tiles(init_image):
    p = fake.processing([init_image], W, H, 1)
    job = webui.start(p, td.Settings(enabled=True, skip_below=100, min_tile=64, overlap=32).as_args())
    decoded = Image.new("RGB", (W, H), (128, 128, 128))
    pp = SimpleNamespace(image=decoded)
    job.postprocess_image(p, pp)
    result, init = np.asarray(pp.image).astype(int), np.asarray(init_image).astype(int)
    share = td.blend.kept_share(job.plan)
    for leaf in job.plan.leaves:
        inner = (
            slice(leaf.y * 8 + 4, (leaf.y + leaf.h) * 8 - 4),
            slice(leaf.x * 8 + 4, (leaf.x + leaf.w) * 8 - 4),
        )
        block = share[leaf.y : leaf.y + leaf.h, leaf.x : leaf.x + leaf.w]
        if bool((block == 1).all()):
            assert np.abs(result[inner] - init[inner]).max() <= 1  # the init image's own pixels
        elif bool((block == 0).all()):
            assert (result[inner] == 128).all()  # denoised tiles untouched
    assert ((share > 0) & (share < 1)).any(), "the overlap band blends the two"
    latent_job = webui.start(p, td.Settings(enabled=True, skip_below=100, skip_mode="Keep latent").as_args())
    pp = SimpleNamespace(image=decoded)
    latent_job.postprocess_image(p, pp)
    assert pp.image is decoded


def test_named_api_args_arrive_padded_with_ui_defaults(init_image):
    # The WebUI copies the request's one-dict list over the UI defaults (seen in A1111 and Forge).
    padded = [{"enabled": True, "skip_below": 64}] + td.Settings().as_args()[1:]
    job = webui.start(fake.processing([init_image], W, H, 1), padded)
    assert job.settings == td.Settings(enabled=True, skip_below=64)


def test_small_job_costs_one_whole_image_view_per_step(k_diffusion, state, init_image):
    """The issue's 256 px job, Min tile 64 and Max tile 128: every window's view is the whole
    image, evaluated once per step (A1111: cond and uncond rows in one call)."""
    g = torch.Generator().manual_seed(11)
    original, noise = torch.randn(1, 4, 32, 32, generator=g), torch.randn(1, 4, 32, 32, generator=g)
    model = fake.AnalyticSD()
    p = fake.processing([init_image.resize((256, 256))], 256, 256, 1)
    _, job = run_img2img(
        k_diffusion, state, p, args(min_tile=64, max_tile=128, overlap=32), original, noise, model=model
    )
    assert len(job.plan.windows) > 1
    assert set(model.shapes) == {(2, 4, 32, 32)}
    steps = int(p.denoising_strength * p.steps) + 1  # the WebUI's img2img schedule: t_enc + 1 steps
    assert len(model.shapes) == steps, "one model call per step"
