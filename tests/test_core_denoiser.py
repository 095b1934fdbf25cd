"""The tiled x0-space denoiser, driven by the real k-diffusion samplers."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import tiled_diffusion as td
from tiled_diffusion.blend import window_weights
from tiled_diffusion.prompts import WindowPrompt

from .test_core_plan import karras, photo

H, W = 48, 64  # latent of a 512x384 px image
SAMPLERS = ["sample_euler", "sample_euler_ancestral", "sample_heun", "sample_dpmpp_2m", "sample_lms"]


@pytest.fixture(scope="module")
def image():
    return photo("astronaut", longest=512).resize((W * 8, H * 8))


def make_plan(image, sigmas=None, **settings) -> td.Plan:
    values = {"min_tile": 64, "max_tile": 256, "overlap": 32, "tile_batch": 4, **settings}
    return td.build_plan(image, td.Settings(**values), latent_size=(H, W), sigmas=sigmas)


def latent(seed: int, rows: int = 1, channels: int = 4) -> torch.Tensor:
    return torch.randn(rows, channels, H, W, generator=torch.Generator().manual_seed(seed))


def window_mask(plan: td.Plan, keep) -> torch.Tensor:
    """Pixels in a band of at least one window whose leaves pass `keep`."""
    mask = torch.zeros(H, W, dtype=torch.bool)
    for window in plan.windows:
        if keep(plan.leaves[window.leaves[0]]):
            for band in window.bands:
                mask[band.y : band.y + band.h, band.x : band.x + band.w] = True
    return mask


class Recorder:
    """A model wrapper that counts windows and latent pixels it was asked to denoise."""

    def __init__(self, model):
        self.model, self.calls, self.pixels, self.sigmas = model, 0, 0, []

    def __call__(self, x, sigma, **cond):
        self.calls += 1
        self.pixels += x.shape[-1] * x.shape[-2] * x.shape[0]
        return self.model(x, sigma, **cond)


def affine(x, sigma, **cond):
    return 2 * x + 1


@pytest.mark.parametrize("method", td.settings.METHODS)
@pytest.mark.parametrize("overlap", [0, 8, 32, 128])
@pytest.mark.parametrize("tile_batch", [1, 3, 32])
def test_weights_are_a_partition_of_unity(image, method, overlap, tile_batch):
    plan = make_plan(image, method=method, overlap=overlap, tile_batch=tile_batch)
    x = latent(1, rows=2)
    for original in (None, latent(2)):
        den = td.TiledDenoiser(affine, plan, original=original)
        torch.testing.assert_close(den(x, torch.tensor([3.0, 3.0])), 2 * x + 1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", td.settings.METHODS)
def test_window_weights_are_finite_and_never_zero(method):
    for size in [(1, 1), (1, 7), (8, 8), (33, 17), (512, 512)]:
        weights = window_weights(method, *size)
        assert weights.shape == size
        assert torch.isfinite(weights).all() and (weights > 0).all()


def test_mixture_of_diffusers_weights_peak_in_the_middle():
    weights = window_weights("Mixture of Diffusers", 32, 32)
    assert weights[16, 16] > weights[16, 0] > 0 and weights[0, 0] < weights[8, 8]


def coordinate_map(rows: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij"
    )
    one = torch.stack([xs, ys, xs * ys, xs - ys])
    return torch.stack([one + 1000 * r for r in range(rows)])


@pytest.mark.parametrize("tile_batch", [1, 4])
def test_coordinate_conditioning_is_cropped_with_each_window(image, tile_batch):
    rows = 4
    coords = coordinate_map(rows)
    dummy = torch.randn(rows, 5, 1, 1)
    text = torch.randn(rows, 77, 32)
    plan = make_plan(image, tile_batch=tile_batch)

    def model(x, sigma, cond):  # the A1111 layout: one `cond` dict of lists
        k = x.shape[0] // rows
        assert torch.equal(cond["c_crossattn"][0], torch.cat([text] * k))
        assert torch.equal(cond["c_concat"][1], torch.cat([dummy] * k)), "dummy rows reach each window"
        assert sigma.shape == (x.shape[0],)
        return cond["c_concat"][0]

    den = td.TiledDenoiser(model, plan)
    out = den(
        latent(0, rows), torch.full((rows,), 2.0), cond={"c_crossattn": [text], "c_concat": [coords, dummy]}
    )
    torch.testing.assert_close(out, coords, atol=1e-3, rtol=1e-5)


def test_forge_and_sdxl_conditioning_pass_per_row_and_shared_values(image):
    rows = 2
    options = {"cond_or_uncond": [1, 0]}
    y = torch.randn(rows, 2816)
    guidance = torch.tensor([3.5, 3.5])
    concat = coordinate_map(rows)
    plan = make_plan(image, tile_batch=3)

    def model(x, sigma, c_crossattn, y, guidance, c_concat, transformer_options, scale):
        k = x.shape[0] // rows
        assert transformer_options is options and scale == 7.5
        assert torch.equal(y, torch.cat([y_rows] * k)) and guidance.shape == (x.shape[0],)
        assert c_crossattn.shape == (x.shape[0], 77, 32)
        return c_concat

    y_rows = y
    den = td.TiledDenoiser(model, plan)
    out = den(
        latent(0, rows),
        1.0,
        c_crossattn=torch.randn(rows, 77, 32),
        y=y,
        guidance=guidance,
        c_concat=concat,
        transformer_options=options,
        scale=7.5,
    )
    torch.testing.assert_close(out, concat, atol=1e-3, rtol=1e-5)


def run_sampler(k_diffusion, name, model, x, sigmas, extra_args=None, seed=0):
    torch.manual_seed(seed)
    return getattr(k_diffusion.sampling, name)(model, x, sigmas, extra_args=extra_args, disable=True)


def position_cond(rows: int = 1) -> dict:
    """A c_concat map of latent coordinates: each window's crop tells the model where it is."""
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return {"cond": {"c_concat": [torch.stack([xs, ys]).expand(rows, 2, H, W)]}}


def oracle_of(clean: torch.Tensor):
    """A denoiser that knows the answer: the clean latent at the window's coordinates."""

    def oracle(x, sigma, cond):
        xs, ys = cond["c_concat"][0][:, 0], cond["c_concat"][0][:, 1]
        return clean[0][:, ys, xs].permute(1, 0, 2, 3)

    return oracle


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("overlap", [0, 32])
def test_skipped_tiles_end_exactly_at_original_and_active_tiles_at_the_oracle(
    k_diffusion, image, sampler, overlap
):
    plan = make_plan(image, skip_below=129, overlap=overlap)
    assert 0 < sum(leaf.skipped for leaf in plan.leaves) < len(plan.leaves)
    original, clean, noise = latent(1), latent(2), latent(3)
    den = td.TiledDenoiser(oracle_of(clean), plan, original=original)
    sigmas = karras(12)
    out = run_sampler(k_diffusion, sampler, den, original + noise * sigmas[0], sigmas, position_cond())
    never_active = ~window_mask(plan, lambda leaf: not leaf.skipped)
    never_skipped = ~window_mask(plan, lambda leaf: leaf.skipped)
    assert never_active.any() and never_skipped.any()
    torch.testing.assert_close(out[..., never_active], original[..., never_active], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[..., never_skipped], clean[..., never_skipped], atol=1e-4, rtol=0)
    if overlap == 0:
        skipped = ~window_mask(plan, lambda leaf: not leaf.skipped)
        assert skipped.sum() == sum(leaf.w * leaf.h for leaf in plan.leaves if leaf.skipped)


def test_all_skipped_never_calls_the_model_and_returns_the_original(k_diffusion, image):
    plan = make_plan(image, skip_below=2048)
    assert all(leaf.skipped for leaf in plan.leaves)

    def model(x, sigma, **cond):
        raise AssertionError("the model must not be called")

    original = latent(1, rows=2)
    den = td.TiledDenoiser(model, plan, original=original)
    sigmas = karras(8)
    x = torch.cat([original, original]) + latent(5, rows=4) * sigmas[0]
    out = run_sampler(k_diffusion, "sample_euler_ancestral", den, x, sigmas)
    torch.testing.assert_close(out, torch.cat([original, original]), atol=1e-5, rtol=0)
    assert den.stats["model_calls"] == 0


def posterior_mean(mu: torch.Tensor, spread: float):
    """The exact denoiser of Gaussian data N(mu, spread^2): pixel-wise, so tiling must not change it."""

    def model(x, sigma, cond):
        centre = mu[0][:, cond["c_concat"][0][:, 1], cond["c_concat"][0][:, 0]].permute(1, 0, 2, 3)
        s2 = spread**2
        return centre + s2 / (s2 + sigma.view(-1, 1, 1, 1) ** 2) * (x - centre)

    return model


@pytest.mark.parametrize("overlap", [0, 16])
def test_variable_denoise_equals_standalone_img2img_of_each_tile(k_diffusion, image, overlap):
    steps = 20
    sigmas = karras(steps)
    plan = make_plan(
        image,
        sigmas=sigmas,
        variable_denoise=True,
        denoise_largest=0.25,
        denoise_smallest=0.75,
        overlap=overlap,
        method="MultiDiffusion",
    )
    strengths = sorted({leaf.strength for leaf in plan.leaves})
    assert len(strengths) >= 3
    original, mu, noise = latent(1), latent(2), latent(3)
    model = posterior_mean(mu, 0.5)

    def img2img(strength):
        t_enc = int(min(strength, 0.999) * steps)
        schedule = sigmas[steps - t_enc - 1 :]
        return run_sampler(
            k_diffusion, "sample_euler", model, original + noise * schedule[0], schedule, position_cond()
        )

    den = td.TiledDenoiser(model, plan, original=original)
    t_job = int(min(plan.max_strength, 0.999) * steps)
    schedule = sigmas[steps - t_job - 1 :]
    out = run_sampler(
        k_diffusion, "sample_euler", den, original + noise * schedule[0], schedule, position_cond()
    )
    # Each pixel whose covering windows all share one strength equals that strength's img2img.
    checked = torch.zeros(H, W, dtype=torch.bool)
    for strength in strengths:
        alone = window_mask(plan, lambda leaf, s=strength: leaf.strength == s)
        others = window_mask(plan, lambda leaf, s=strength: leaf.strength != s)
        only = alone & ~others
        torch.testing.assert_close(out[..., only], img2img(strength)[..., only], atol=1e-4, rtol=0)
        checked |= only
    assert checked.float().mean() > (0.99 if overlap == 0 else 0.3)


@pytest.mark.parametrize("sampler", ["sample_euler", "sample_heun"])
def test_only_active_windows_are_evaluated(k_diffusion, image, sampler):
    sigmas = karras(20)
    plan = make_plan(
        image, sigmas=sigmas, variable_denoise=True, denoise_largest=0.2, denoise_smallest=0.7, skip_below=100
    )
    recorder = Recorder(lambda x, sigma, **cond: x * 0.5)
    den = td.TiledDenoiser(recorder, plan, original=latent(1))
    seen = []

    def model(x, sigma, **cond):
        seen.append(float(sigma[0]))
        return den(x, sigma, **cond)

    t_job = int(plan.max_strength * 20)
    schedule = sigmas[20 - t_job - 1 :]
    run_sampler(k_diffusion, sampler, model, latent(1) + latent(2) * schedule[0], schedule)
    expected = sum(
        window.w * window.h
        for level in seen
        for window in plan.windows
        if plan.leaves[window.leaves[0]].is_active(level)
    )
    full = len(seen) * sum(window.w * window.h for window in plan.windows)
    assert den.stats["evaluated_pixels"] == expected == recorder.pixels
    assert den.stats["calls"] == len(seen)
    assert expected < 0.8 * full, "skipped and late tiles save model work"
    first = [plan.leaves[w.leaves[0]] for w in plan.windows]
    assert not any(leaf.is_active(float(schedule[0])) for leaf in first if leaf.skipped)


def test_tile_batch_and_window_order_do_not_change_the_result(image):
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    torch.nn.init.normal_(conv.weight, std=0.3)

    @torch.no_grad()
    def model(x, sigma, **cond):
        return torch.tanh(conv(x)) + x / (1 + sigma.view(-1, 1, 1, 1))

    x, sigma = latent(4, rows=2), torch.tensor([2.0, 2.0])
    results = []
    for tile_batch in (1, 2, 7, 32):
        plan = make_plan(image, tile_batch=tile_batch)
        results.append(td.TiledDenoiser(model, plan, original=latent(1))(x, sigma))
        shuffled = list(plan.windows)
        random.Random(tile_batch).shuffle(shuffled)
        reordered = dataclasses.replace(plan, windows=shuffled)
        results.append(td.TiledDenoiser(model, reordered, original=latent(1))(x, sigma))
    for other in results[1:]:
        torch.testing.assert_close(other, results[0], atol=1e-5, rtol=1e-5)


def test_without_original_skip_and_variable_denoise_are_off_with_a_note(image):
    plan = make_plan(image, sigmas=karras(20), skip_below=100, variable_denoise=True)
    assert any(leaf.skipped for leaf in plan.leaves)
    recorder = Recorder(affine)
    with pytest.warns(UserWarning, match="no original"):
        den = td.TiledDenoiser(recorder, plan)
    assert den.notes and "skip and variable denoise are off" in den.notes[0]
    x = latent(0, rows=2)
    torch.testing.assert_close(den(x, torch.tensor([0.1, 0.1])), 2 * x + 1, atol=1e-5, rtol=1e-5)
    assert den.stats["evaluated_pixels"] == sum(w.w * w.h for w in plan.windows)


def test_rows_belong_to_images_in_turn(image):
    plan = make_plan(image, skip_below=2048)
    original = latent(1, rows=2)
    den = td.TiledDenoiser(affine, plan, original=original)
    out = den(latent(2, rows=6), 1.0)
    torch.testing.assert_close(out, original.repeat(3, 1, 1, 1))
    with pytest.raises(ValueError, match="3 rows is not a multiple"):
        den(latent(2, rows=3), 1.0)


@pytest.mark.parametrize(
    "x, sigma, message",
    [
        (torch.zeros(1, 4, H, W + 8), 1.0, "plan was built for"),
        (torch.zeros(0, 4, H, W), 1.0, "empty"),
        (torch.zeros(4, H, W), 1.0, r"\[N, C, H, W\]"),
        (torch.zeros(1, 4, H, W), float("nan"), "sigma"),
        (torch.zeros(2, 4, H, W), torch.tensor([1.0, 2.0]), "share one noise level"),
    ],
)
def test_bad_denoiser_input_names_what_is_wrong(image, x, sigma, message):
    den = td.TiledDenoiser(affine, make_plan(image))
    with pytest.raises(ValueError, match=message):
        den(x, sigma)


def test_original_of_another_size_and_missing_schedule_are_rejected(image):
    with pytest.raises(ValueError, match="original"):
        td.TiledDenoiser(affine, make_plan(image), original=torch.zeros(1, 4, H // 2, W))
    with pytest.raises(ValueError, match="sigmas"):
        td.TiledDenoiser(affine, make_plan(image, variable_denoise=True), original=latent(1))


def small_job_plan(tile_batch: int, **settings) -> td.Plan:
    """The issue's 256 px job (Min tile 64, Max tile 128): every window's view is the whole image."""
    picture = photo("astronaut", longest=512).resize((256, 256))
    values = {"min_tile": 64, "max_tile": 128, "tile_batch": tile_batch, **settings}
    return td.build_plan(picture, td.Settings(**values), latent_size=(32, 32), sigmas=karras(20))


def each_window_told_apart(plan: td.Plan) -> td.Plan:
    """The same plan with every window's tiles given a prompt of their own: no two windows
    share a conditioning, so each view is evaluated on its own."""
    leaves = list(plan.leaves)
    for i, window in enumerate(plan.windows):
        for k in window.leaves:
            leaves[k] = dataclasses.replace(leaves[k], prompt=WindowPrompt(added=(f"window {i}",)))
    return dataclasses.replace(plan, leaves=leaves)


def own_conditioning(prompt, cond, rows):
    return dict(cond)  # the same tensors in a conditioning of its own


class ConvModel:
    """A deterministic model that mixes neighbouring pixels (a view's crop changes its output)."""

    def __init__(self):
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.rows = 0

    @torch.no_grad()
    def __call__(self, x, sigma, **cond):
        self.rows += x.shape[0]
        return torch.tanh(self.conv(x)) + x / (1 + sigma.view(-1, 1, 1, 1) ** 2)


@pytest.mark.parametrize("variable_denoise", [False, True], ids=["one strength", "variable denoise"])
def test_identical_views_are_evaluated_once_with_a_bit_identical_result(k_diffusion, variable_denoise):
    settings = {"variable_denoise": True, "detail_threshold": 90} if variable_denoise else {}
    plan = small_job_plan(tile_batch=1, **settings)
    assert len(plan.windows) == 4 and {(w.x, w.y, w.w, w.h) for w in plan.windows} == {(0, 0, 32, 32)}
    if variable_denoise:
        assert len({plan.leaves[w.leaves[0]].strength for w in plan.windows}) == 2
    original = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    sigmas = karras(20)[20 - int(plan.max_strength * 20) - 1 :] if variable_denoise else karras(20)
    results, rows = [], []
    for each in (plan, each_window_told_apart(plan)):
        model = ConvModel()
        den = td.TiledDenoiser(model, each, original=original, window_cond=own_conditioning)
        results.append(run_sampler(k_diffusion, "sample_euler", den, original + noise * sigmas[0], sigmas))
        rows.append(model.rows)
        if each is plan:
            assert den.stats["model_calls"] == den.stats["calls"], "one whole-image view per call"
            assert den.stats["shared_views"] > 0
    assert torch.equal(results[0], results[1]), "bit for bit the result of evaluating each view"
    assert rows[0] == 2 * (len(sigmas) - 1), "two rows (cond and uncond) per step, not two per window"
    assert rows[1] > rows[0]


def test_windows_of_different_prompts_are_not_merged():
    plan = each_window_told_apart(small_job_plan(tile_batch=4))
    model = ConvModel()
    den = td.TiledDenoiser(model, plan, original=torch.zeros(1, 4, 32, 32), window_cond=own_conditioning)
    den(torch.randn(1, 4, 32, 32), torch.tensor([1.0]))
    assert model.rows == 4 and den.stats["shared_views"] == 0


def test_shared_views_at_a_larger_tile_batch_give_the_same_result(image):
    plan = small_job_plan(tile_batch=4)
    x, sigma, original = torch.randn(2, 4, 32, 32), torch.tensor([2.0, 2.0]), torch.randn(2, 4, 32, 32)
    alone = td.TiledDenoiser(
        ConvModel(), each_window_told_apart(plan), original, window_cond=own_conditioning
    )
    model = ConvModel()
    shared = td.TiledDenoiser(model, plan, original)(x, sigma)
    torch.testing.assert_close(shared, alone(x, sigma), atol=1e-6, rtol=1e-6)
    assert model.rows == 2
