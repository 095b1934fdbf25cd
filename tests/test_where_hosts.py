"""Where the picture may change, in both hosts: the inpaint mask as the WebUI prepares it
(`p.nmask`, "Only masked" crops) and the strength map sent through the API."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import tiled_diffusion as td
from tiled_diffusion.hosts import webui
from tiled_diffusion.settings import PARAMETERS_BY_NAME

from . import fake_a1111 as fake
from .images import png_base64
from .test_hosts_a1111 import H, W, args, latents, run_img2img
from .test_hosts_forge import forge_processing, run_forge
from .test_strength import computing_every_window


def corner_nmask(blur: bool = False) -> torch.Tensor:
    """p.nmask of a 96 px square in the top-left corner (A1111's [C, H, W] latent-grid mask)."""
    mask = torch.zeros(H // 8, W // 8)
    mask[1:13, 2:14] = 1
    if blur:  # the mask blur's soft edge, kept soft (soft inpainting does not round it)
        mask = torch.nn.functional.conv2d(mask[None, None], torch.ones(1, 1, 3, 3) / 9, padding=1)[0, 0]
    return mask[None].expand(4, -1, -1).clone()


def inpaint(p, nmask: torch.Tensor):
    p.image_mask = Image.new("L", (W, H))  # the user's mask: only its presence matters here
    p.nmask, p.mask = nmask, 1 - nmask
    return p


def touching(plan: td.Plan, nmask: torch.Tensor) -> list:
    return [
        w
        for w in plan.windows
        if any((nmask[0, b.y : b.y + b.h, b.x : b.x + b.w] > 0).any() for b in w.bands)
    ]


def every_window(job) -> None:
    """Make the installed hook compute every window (the same plan without its pixel strengths)."""
    hook = job.hooks[0]
    hook.plan = computing_every_window(hook.plan)


@pytest.mark.parametrize("blur", [False, True], ids=["rounded mask", "soft mask"])
@pytest.mark.parametrize("sampler", ["sample_euler", "sample_dpmpp_2m"])
def test_a1111_inpaint_evaluates_only_windows_over_the_mask_and_changes_nothing(
    k_diffusion, state, init_image, blur, sampler
):
    original, noise = latents(2, 21)
    nmask = corner_nmask(blur)
    settings = args(tile_batch=1, max_tile=256, overlap=16)
    model = fake.AnalyticSD()
    p = inpaint(fake.processing([init_image], W, H, 2), nmask)
    out, job = run_img2img(k_diffusion, state, p, settings, original, noise, sampler, model=model)
    plan = job.plan
    assert plan.pixel_strength is not None and 0 < len(touching(plan, nmask)) < len(plan.windows)
    rows_masked = sum(s[0] * s[2] * s[3] for s in model.shapes)

    # The same job with every window computed: bit for bit the same result.
    everything = fake.AnalyticSD()
    p2 = inpaint(fake.processing([init_image], W, H, 2), nmask)
    p2.sampler = fake.KDiffusionSampler(k_diffusion, everything, state, sampler)
    job2 = webui.start(p2, settings)
    job2.before_sampling(p2, original)
    every_window(job2)
    cond, uncond = fake.conditioning(2)
    full = p2.sampler.sample_img2img(p2, original, noise, cond, uncond, fake.image_cond(2))
    job2.finish()
    assert torch.equal(out, full)
    assert rows_masked < 0.5 * sum(s[0] * s[2] * s[3] for s in everything.shapes)
    kept = nmask == 0
    torch.testing.assert_close(out[:, kept], original[:, kept], atol=1e-6, rtol=0)


def test_forge_inpaint_evaluates_only_windows_over_the_mask(k_diffusion, init_image):
    original, noise = latents(1, 22)
    nmask = corner_nmask()
    p = inpaint(forge_processing(k_diffusion, init_image), nmask)
    out, job = run_forge(p, args(max_tile=256, overlap=16), original, noise)
    windows = touching(job.plan, nmask)
    assert 0 < len(windows) < len(job.plan.windows)
    shapes = p.sd_model.forge_objects_original.model.shapes
    p_plain = inpaint(forge_processing(k_diffusion, init_image), nmask)
    plain, _ = run_forge(p_plain, [False], original, noise)
    plain_shapes = p_plain.sd_model.forge_objects_original.model.shapes
    assert sum(s[0] * s[2] * s[3] for s in shapes) < 0.5 * sum(s[0] * s[2] * s[3] for s in plain_shapes)
    kept = nmask == 0
    torch.testing.assert_close(out[:, kept], original[:, kept], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, kept], plain[:, kept], atol=1e-5, rtol=0)


def test_only_masked_plans_over_the_webuis_crop(k_diffusion, state, init_image):
    p = inpaint(fake.processing([init_image], W, H, 1), corner_nmask())
    p.paste_to = (64, 48, 256, 192)  # the WebUI's crop around the mask, resized to the job
    out, job = run_img2img(k_diffusion, state, p, args(skip_below=100), *latents(1, 23))
    crop = init_image.crop((64, 48, 320, 240)).resize((W, H), Image.Resampling.LANCZOS)
    expected = td.build_plan(crop, job.settings, (H // 8, W // 8), pixel_strength=job.plan.pixel_strength)
    assert [dataclasses.astuple(leaf)[:4] for leaf in job.plan.leaves] == [
        dataclasses.astuple(leaf)[:4] for leaf in expected.leaves
    ]
    whole = td.build_plan(init_image, job.settings, (H // 8, W // 8))
    assert [leaf.w for leaf in whole.leaves] != [leaf.w for leaf in job.plan.leaves]
    pp = SimpleNamespace(image=Image.new("RGB", (W, H), (128, 128, 128)))
    job.postprocess_image(p, pp)  # Keep pixels pastes the crop, which is what the job denoised
    kept = np.asarray(pp.image)[400 // 8 * 8 - 40 : 380, 480:500].astype(int)
    assert np.abs(kept - np.asarray(crop)[400 // 8 * 8 - 40 : 380, 480:500].astype(int)).max() <= 1


def half_black_map(size=(W, H)) -> Image.Image:
    picture = Image.new("L", size, 255)
    picture.paste(0, (0, 0, size[0] // 2, size[1]))
    return picture


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_a_strength_map_from_the_api_keeps_its_black_half_and_pastes_it_back(
    k_diffusion, state, init_image, host
):
    original, noise = latents(1, 24)
    job_args = [
        {
            "enabled": True,
            "min_tile": 64,
            "overlap": 16,
            "strength_map": png_base64(half_black_map((256, 192))),
        }
    ]
    if host == "a1111":
        model = fake.AnalyticSD()
        p = fake.processing([init_image], W, H, 1)
        out, job = run_img2img(k_diffusion, state, p, job_args, original, noise, model=model)
        plain, _ = run_img2img(
            k_diffusion, state, fake.processing([init_image], W, H, 1), [False], original, noise
        )
        pixels = sum(s[0] * s[2] * s[3] for s in model.shapes)
        assert pixels < 0.75 * 2 * (W // 8) * (H // 8) * len(model.shapes) and model.shapes
    else:
        p = forge_processing(k_diffusion, init_image)
        out, job = run_forge(p, job_args, original, noise)
        plain, _ = run_forge(forge_processing(k_diffusion, init_image), [False], original, noise)
    left = slice(0, W // 16 - 1)  # the boundary latent pixel is grey once the map is stretched
    torch.testing.assert_close(out[..., left], original[..., left], atol=1e-6, rtol=0)
    far_right = slice(W // 16 + 4, None)  # beyond the blend band: as the job without the extension
    torch.testing.assert_close(out[..., far_right], plain[..., far_right], atol=1e-4, rtol=1e-4)
    assert job.pasting, "Keep pixels pastes the black half's pixels back"
    pp = SimpleNamespace(image=Image.new("RGB", (W, H), (128, 128, 128)))
    job.postprocess_image(p, pp)
    result = np.asarray(pp.image).astype(int)
    init = np.asarray(init_image).astype(int)
    assert np.abs(result[:, : W // 2 - 16] - init[:, : W // 2 - 16]).max() <= 1  # outside the band
    assert (result[:, W // 2 + 8 :] == 128).all()
    key = PARAMETERS_BY_NAME["strength_map"].infotext_key
    assert p.extra_generation_params[key] == f"{job.settings.strength_map.digest} (256x192 px)"


def test_a_map_of_another_aspect_than_the_init_image_fails_the_job_naming_it(k_diffusion, state, init_image):
    job_args = [{"enabled": True, "strength_map": png_base64(Image.new("L", (100, 100), 255))}]
    # Refused in process(): the WebUI swallows errors of process_before_every_sampling and
    # would run the job untiled (seen in A1111 1.10.1), so the sampler fails the job instead.
    assert isinstance(webui.start(fake.processing([init_image], W, H, 1), job_args), webui.RejectedJob)
    with pytest.raises(
        td.SettingsError, match="strength_map: 100x100 px .* does not fit the init image of 512x384"
    ):
        run_img2img(k_diffusion, state, fake.processing([init_image], W, H, 1), job_args, *latents(1, 25))
