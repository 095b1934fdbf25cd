"""Where the picture may change: strength maps and inpaint masks, per pixel, in the core."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from PIL import Image

import tiled_diffusion as td
from tiled_diffusion.hosts.where import inpaint_preview
from tiled_diffusion.plan import estimated_work, start_sigma
from tiled_diffusion.strength import (
    StrengthMap,
    fit_to_job,
    on_latent_grid,
    pixel_starts,
    read_strength_map,
    repainted_share,
    with_inpaint_mask,
)
from tiled_diffusion.ui import preview_tiles

from .images import png_base64
from .test_core_denoiser import (
    SAMPLERS,
    ConvModel,
    H,
    W,
    latent,
    make_plan,
    position_cond,
    posterior_mean,
    run_sampler,
    window_mask,
)
from .test_core_plan import karras, photo

STEPS = 20


@pytest.fixture(scope="module")
def image():
    return photo("astronaut", longest=512).resize((W * 8, H * 8))


def flat_regions() -> torch.Tensor:
    """A map of four flat vertical stripes on the latent grid: keep, 0.3, 0.6 and full strength."""
    values = torch.zeros(H, W)
    for i, value in enumerate((0.0, 0.3, 0.6, 1.0)):
        values[:, i * W // 4 : (i + 1) * W // 4] = value
    return values


def mapped_plan(image, values, job_strength, sigmas=None, inpaint_mask=None, **settings) -> td.Plan:
    """A plan with these pixel strengths ([H, W] on the latent grid)."""
    base = {"min_tile": 64, "max_tile": 256, "overlap": 32, "tile_batch": 4, **settings}
    return td.build_plan(
        image,
        td.Settings(**base),
        (H, W),
        sigmas,
        pixel_strength=values,
        job_strength=job_strength,
        inpaint_mask=inpaint_mask,
    )


def computing_every_window(plan: td.Plan) -> td.Plan:
    """The same windows, every one evaluated and blended (no pixel strengths, every tile changing)."""
    leaves = [dataclasses.replace(leaf, changes=True) for leaf in plan.leaves]
    return dataclasses.replace(plan, pixel_strength=None, leaves=leaves)


def img2img(k_diffusion, sampler, model, original, noise, sigmas, strength):
    """A standalone img2img at this strength (the WebUI rule: the tail of the full schedule)."""
    t_enc = int(min(strength, 0.999) * STEPS)
    schedule = sigmas[STEPS - t_enc - 1 :]
    return run_sampler(k_diffusion, sampler, model, original + noise * schedule[0], schedule, position_cond())


@pytest.mark.parametrize("job_strength", [0.5, 0.9])
def test_flat_regions_of_a_map_equal_standalone_img2img_at_their_strength_with_euler(
    k_diffusion, image, job_strength
):
    sigmas = karras(STEPS)
    values = flat_regions()
    plan = mapped_plan(image, values, job_strength, sigmas, method="MultiDiffusion")
    original, mu, noise = latent(1), latent(2), latent(3)
    model = posterior_mean(mu, 0.5)
    den = td.TiledDenoiser(model, plan, original=original)
    out = img2img(k_diffusion, "sample_euler", den, original, noise, sigmas, job_strength)
    checked = 0
    for value in (0.0, 0.3, 0.6, 1.0):
        region = values == value  # the denoiser is pixel-wise: every pixel of a region is its own
        assert region.sum() > 100
        if value == 0:  # black keeps the original (the WebUI would still run its last step at 0)
            expected = original
        else:
            expected = img2img(
                k_diffusion, "sample_euler", model, original, noise, sigmas, job_strength * value
            )
        torch.testing.assert_close(
            out[..., region], expected[..., region], atol=1e-4 if value else 1e-6, rtol=0
        )
        checked += int(region.sum())
    assert checked > 0.6 * H * W


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_black_keeps_the_original_and_white_is_the_job_with_every_sampler(k_diffusion, image, sampler):
    """Grey starts late, like a tile of variable denoise: exact with Euler (above). Samplers
    with history or fresh noise carry the kept original into their first step there, so for
    them the ends are what is exact."""
    sigmas = karras(STEPS)
    values = flat_regions()
    plan = mapped_plan(image, values, 0.6, sigmas)
    original, mu, noise = latent(1), latent(2), latent(3)
    model = posterior_mean(mu, 0.5)
    den = td.TiledDenoiser(model, plan, original=original)
    out = img2img(k_diffusion, sampler, den, original, noise, sigmas, 0.6)
    black, white = values == 0, values == 1
    torch.testing.assert_close(out[..., black], original[..., black], atol=1e-6, rtol=0)
    expected = img2img(k_diffusion, sampler, model, original, noise, sigmas, 0.6)
    torch.testing.assert_close(out[..., white], expected[..., white], atol=1e-4, rtol=0)


def test_a_pixels_strength_is_its_tiles_times_the_map_with_variable_denoise(k_diffusion, image):
    sigmas = karras(STEPS)
    settings = {"variable_denoise": True, "denoise_largest": 0.8, "denoise_smallest": 0.4}
    plan = mapped_plan(image, torch.full((H, W), 0.5), 0.8, sigmas, method="MultiDiffusion", **settings)
    assert plan.max_strength == 0.8
    original, mu, noise = latent(1), latent(2), latent(3)
    model = posterior_mean(mu, 0.5)
    den = td.TiledDenoiser(model, plan, original=original)
    out = img2img(k_diffusion, "sample_euler", den, original, noise, sigmas, plan.max_strength)
    strengths = sorted({leaf.strength for leaf in plan.leaves})
    for strength in strengths:
        only = window_mask(plan, lambda leaf, s=strength: leaf.strength == s) & ~window_mask(
            plan, lambda leaf, s=strength: leaf.strength != s
        )
        expected = img2img(k_diffusion, "sample_euler", model, original, noise, sigmas, strength * 0.5)
        torch.testing.assert_close(out[..., only], expected[..., only], atol=1e-4, rtol=0)


def webui_blend(den, nmask: torch.Tensor, original: torch.Tensor, soft_power: float | None = None):
    """A stand-in of the WebUI's CFG denoiser with an inpaint mask: the model's x0 kept where
    the mask repaints, the original elsewhere (after each step). soft_power: A1111's soft
    inpainting instead, whose mask share depends on sigma (nmask ** (sigma ** power))."""

    def blended(x, sigma, **cond):
        denoised = den(x, sigma, **cond)
        share = nmask if soft_power is None else nmask ** (float(sigma.flatten()[0]) ** soft_power)
        return denoised * share + original * (1 - share)

    return blended


def corner_mask(soft: bool = False) -> torch.Tensor:
    """A latent-grid inpaint mask: a 16x16 square in the top-left corner, blurred when soft."""
    mask = torch.zeros(H, W)
    mask[2:18, 4:20] = 1
    if soft:
        kernel = torch.ones(1, 1, 5, 5) / 25
        mask = torch.nn.functional.conv2d(mask[None, None], kernel, padding=2)[0, 0]
    return mask


@pytest.mark.parametrize("soft", [False, True], ids=["rounded mask", "soft inpainting"])
@pytest.mark.parametrize("sampler", ["sample_euler", "sample_dpmpp_2m", "sample_euler_ancestral"])
def test_windows_outside_the_mask_make_no_model_call_and_the_result_is_bit_identical(
    k_diffusion, image, soft, sampler
):
    sigmas = karras(STEPS)
    nmask = corner_mask(soft)
    repainted = with_inpaint_mask(None, nmask[None].expand(4, H, W), (H, W))
    masked = mapped_plan(image, repainted, 0.75, sigmas, inpaint_mask=nmask, tile_batch=1)
    original, noise = latent(1), latent(3)
    every_window = computing_every_window(masked)
    assert [w for w in every_window.windows] == masked.windows
    results, models = [], []
    for each in (every_window, masked):
        model = ConvModel()
        den = td.TiledDenoiser(model, each, original=original)
        power = 0.5 if soft else None
        results.append(img2img(k_diffusion, sampler, webui_blend(den, nmask, original, power), original,
                               noise, sigmas, 0.75))  # fmt: skip
        models.append((model, den))
    assert torch.equal(results[0], results[1]), "skipping windows outside the mask changes nothing"
    (everything, _), (only_masked, den) = models
    touching = [
        w for w in masked.windows if any((nmask[b.y : b.y + b.h, b.x : b.x + b.w] > 0).any() for b in w.bands)
    ]
    assert 0 < len(touching) < len(masked.windows)
    calls = den.stats["calls"]
    assert den.stats["evaluated_pixels"] == calls * sum(w.w * w.h for w in touching)
    assert only_masked.rows < 0.6 * everything.rows
    kept = nmask == 0
    torch.testing.assert_close(results[1][..., kept], original[..., kept], atol=1e-6, rtol=0)


def test_inpainting_model_conditioning_is_cropped_per_window(image):
    """An inpainting model's c_concat (mask + masked-image latent, 5 channels) is cut to each window."""
    plan = mapped_plan(
        image, with_inpaint_mask(None, corner_mask(), (H, W)), 1.0, karras(STEPS), tile_batch=3
    )
    inpaint_cond = torch.randn(2, 5, H, W, generator=torch.Generator().manual_seed(7))
    seen = []

    def model(x, sigma, cond):
        concat = cond["c_concat"][0]
        assert concat.shape[0] == x.shape[0] and concat.shape[-2:] == x.shape[-2:]
        seen.append(concat)
        return x * 0

    den = td.TiledDenoiser(model, plan, original=latent(1, rows=2))
    den(latent(2, rows=2), torch.tensor([3.0, 3.0]), cond={"c_concat": [inpaint_cond]})
    evaluated = [
        w for w in plan.windows if any(corner_mask()[b.y : b.y + b.h, b.x : b.x + b.w].any() for b in w.bands)
    ]
    crops = [inpaint_cond[:, :, w.y : w.y + w.h, w.x : w.x + w.w] for w in evaluated]
    assert sum(c.shape[0] for c in seen) == 2 * len(evaluated)
    flat = {tuple(c.flatten()[:8].tolist()) for batch in seen for c in batch.split(2)}
    assert flat == {tuple(c.flatten()[:8].tolist()) for c in crops}


def test_pixel_starts_follow_the_webui_rule_per_pixel():
    sigmas = karras(STEPS)
    values = torch.tensor([0.0, 0.05, 0.3, 0.55, 0.6, 1.0])
    starts = pixel_starts(values, 0.6, sigmas)
    assert starts[0] == -np.inf and starts[-1] == np.inf and starts[-2] == np.inf
    for value, start in zip(values[1:4].tolist(), starts[1:4].tolist()):
        assert start == pytest.approx(start_sigma(value, sigmas), rel=1e-6)
    assert torch.equal(
        pixel_starts(torch.tensor([0.0, 1.0]), 1.0, None),
        torch.tensor([-np.inf, np.inf], dtype=torch.float64),
    )
    with pytest.raises(ValueError, match="grey pixels need the sampler's sigmas"):
        pixel_starts(values, 0.6, None)


def test_windows_with_only_kept_pixels_cost_nothing_in_the_estimate(image):
    plan = make_plan(image)
    values = torch.zeros(H, W)
    values[:, 3 * W // 4 :] = 1.0
    mapped = mapped_plan(image, values, 1.0)
    assert estimated_work(mapped) < 0.6 * estimated_work(plan)
    assert "skipped 75% of the area" in mapped.summary()
    assert estimated_work(mapped_plan(image, torch.zeros(H, W), 1.0)) == 0


# The map as the API and the UI hand it over.


def test_maps_are_read_from_base64_pil_arrays_and_gradio_dicts():
    picture = Image.linear_gradient("L").resize((40, 30))
    expected = read_strength_map(picture)
    assert read_strength_map(png_base64(picture)) == expected
    assert read_strength_map("data:image/png;base64," + png_base64(picture)) == expected
    assert read_strength_map(np.asarray(picture)) == expected
    assert read_strength_map(np.asarray(picture.convert("RGB"))) == expected
    assert read_strength_map({"image": picture, "mask": None}) == expected
    assert read_strength_map({"background": picture, "layers": [], "composite": None}) == expected
    assert expected.pixels.shape == (30, 40) and len(expected.digest) == 12
    assert read_strength_map(None) is None and read_strength_map("") is None
    rgba = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    assert read_strength_map(rgba).pixels.max() == 0, "transparent is black: keep"
    assert read_strength_map(picture.point(lambda v: 255 - v)) != expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("not an image", "strength_map: 'not an image' is not an image"),
        (png_base64(Image.new("L", (4, 4))).encode().hex(), "is not an image"),
        (12, "strength_map: 12 is not an image"),
        (np.zeros((0, 5), dtype=np.uint8), "the image is empty"),
        (np.zeros((4, 4, 2), dtype=np.uint8), "is not an image"),
    ],
)
def test_bad_maps_are_refused_with_a_clear_error(value, message):
    with pytest.raises(td.SettingsError, match=message):
        td.Settings(strength_map=value)


def test_a_map_of_another_aspect_ratio_is_refused_and_one_within_3_percent_is_stretched():
    wide = StrengthMap.of(np.full((100, 200), 255, dtype=np.uint8))
    with pytest.raises(
        td.SettingsError, match=r"200x100 px \(aspect 2.000\) does not fit the init image of 300x300"
    ):
        fit_to_job(wide, (300, 300), (512, 512))
    near = StrengthMap.of(np.full((100, 204), 255, dtype=np.uint8))
    assert fit_to_job(near, (400, 200), (512, 256)).shape == (256, 512)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_a_black_half_stays_exactly_zero_wherever_the_job_puts_it(mode):
    pixels = np.full((300, 400), 255, dtype=np.uint8)
    pixels[:, :200] = 0
    fitted = fit_to_job(StrengthMap.of(pixels), (400, 300), (512, 512), resize_mode=mode)
    assert fitted.shape == (512, 512) and fitted.max() == 1.0
    grid = on_latent_grid(fitted, (64, 64))
    left = {0: 32, 1: 32, 2: 32, 3: 32}[mode]
    assert (grid[:, : left - 2] == 0).all() and (grid[:, left + 2 :] == 1).all()


def test_the_only_masked_crop_takes_its_part_of_the_map():
    pixels = np.zeros((400, 400), dtype=np.uint8)
    pixels[100:200, 100:200] = 255
    fitted = fit_to_job(StrengthMap.of(pixels), (400, 400), (256, 256), crop=(100, 100, 200, 200))
    assert fitted.min() > 0.99


def test_the_inpaint_mask_zeroes_kept_pixels_and_must_fit_the_job():
    values = torch.full((H, W), 0.5)
    mask = corner_mask(soft=True)
    combined = with_inpaint_mask(values, mask[None].expand(4, H, W), (H, W))
    assert torch.equal(combined == 0, mask == 0) and combined.max() == 0.5
    with pytest.raises(ValueError, match="inpaint mask: 32x16 latent px"):
        with_inpaint_mask(None, torch.ones(4, 16, 32), (H, W))


# What Preview tiles shows of an inpaint tab.


def painted_corner(size=(512, 384)) -> Image.Image:
    """A painted layer: opaque white over the top-left 128 px square, transparent elsewhere."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (0, 0, 128, 128))
    return layer


@pytest.mark.parametrize("host", ["a1111", "forge", "upload"])
def test_the_preview_hatches_what_the_inpaint_mask_keeps(image, host):
    if host == "a1111":  # gradio 3's sketch editor: the picture and a mask painted white
        names, values = ["tab", "inpaint"], [2, {"image": image, "mask": painted_corner()}]
    elif host == "forge":  # Forge's canvas: the picture and the painted layer
        names, values = ["tab", "inpaint_background", "inpaint_foreground"], [2, image, painted_corner()]
    else:
        mask = Image.new("L", image.size, 0)
        mask.paste(255, (0, 0, 128, 128))
        names, values = ["tab", "upload_image", "upload_mask"], [4, image, mask]
    inpaint = inpaint_preview(names + ["mask_blur"], *values, 4)
    assert inpaint["image"] is image and inpaint["blur"] == 4
    settings = td.Settings(min_tile=64, max_tile=256)
    picture, text = preview_tiles(None, 512, 384, *settings.as_args(), inpaint=inpaint)
    plain, plain_text = preview_tiles(image, 512, 384, *settings.as_args())
    kept = re.search(r"skipped (\d+)% of the area", text)
    assert kept and 85 <= int(kept.group(1)) <= 95, text  # all but the corner and its blur
    work = re.search(r"estimated model work (\d+)%", text).group(1)
    assert int(work) < 0.5 * int(re.search(r"estimated model work (\d+)%", plain_text).group(1))
    far = (slice(200, 380), slice(200, 500))  # far from the mask: hatched
    near = (slice(8, 56), slice(8, 56))  # inside it: drawn as without a mask
    difference = np.abs(
        np.asarray(picture, dtype=int)[:384] - np.asarray(plain, dtype=int)[:384]
    )  # legends differ
    assert difference[far].mean() > 10 and difference[near].mean() < 1


def test_the_preview_plans_the_windows_around_a_mask_as_the_job_does(image, monkeypatch):
    """Near an inpaint mask a tile whose band reaches the mask is computed (the band rule),
    in the preview as in the job: the same tiles change."""
    import tiled_diffusion.ui as ui

    planned = []
    monkeypatch.setattr(
        ui, "build_plan", lambda *a, **k: planned.append(td.build_plan(*a, **k)) or planned[-1]
    )
    mask = Image.new("L", image.size, 0)
    mask.paste(255, (0, 0, 100, 100))  # an edge inside a tile: its neighbours' bands reach it
    inpaint = inpaint_preview(["tab", "upload_image", "upload_mask"], 4, image, mask)
    settings = td.Settings(min_tile=64, max_tile=256)
    preview_tiles(None, W * 8, H * 8, *settings.as_args(), inpaint=inpaint)
    repainted = on_latent_grid(repainted_share(mask, (W * 8, H * 8)), (H, W))
    strengths = with_inpaint_mask(None, repainted, (H, W))
    job = td.build_plan(image, settings, (H, W), pixel_strength=strengths, inpaint_mask=repainted)
    own_pixels_only = td.build_plan(image, settings, (H, W), pixel_strength=strengths)
    changing = [leaf.changes for leaf in job.leaves]
    assert changing != [leaf.changes for leaf in own_pixels_only.leaves], "the band rule matters here"
    assert [leaf.changes for leaf in planned[-1].leaves] == changing


def test_the_preview_reads_no_inpaint_mask_on_other_tabs_and_inverts_on_request(image):
    assert inpaint_preview(["tab", "inpaint"], 0, {"image": image, "mask": painted_corner()}) is None
    inverted = inpaint_preview(
        ["tab", "inpaint", "mask_mode"], 2, {"image": image, "mask": painted_corner()}, 1
    )
    share = repainted_share(inverted["mask"], (64, 48), 0, inverted["invert"])
    assert share[0, 0] == 0 and share[-1, -1] == 1


def test_a_black_half_costs_about_half_the_work_and_white_stays_full_strength(k_diffusion, image):
    """A tile whose own pixels are all black leaves the blend: its band's white pixels are the
    white tiles' (full strength, no fade to the original), and its window costs nothing."""
    sigmas = karras(STEPS)
    values = torch.ones(H, W)
    values[:, : W // 2] = 0
    plan = mapped_plan(image, values, 0.5, sigmas)
    original, mu, noise = latent(1), latent(2), latent(3)
    model = posterior_mean(mu, 0.5)
    den = td.TiledDenoiser(model, plan, original=original)
    out = img2img(k_diffusion, "sample_euler", den, original, noise, sigmas, 0.5)
    full = img2img(k_diffusion, "sample_euler", model, original, noise, sigmas, 0.5)
    white, black = values == 1, values == 0
    torch.testing.assert_close(out[..., white], full[..., white], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[..., black], original[..., black], atol=1e-6, rtol=0)
    every = td.TiledDenoiser(model, computing_every_window(plan), original=original)
    img2img(k_diffusion, "sample_euler", every, original, noise, sigmas, 0.5)
    share = den.stats["evaluated_pixels"] / every.stats["evaluated_pixels"]
    assert 0.4 < share < 0.65, share
