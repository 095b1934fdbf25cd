"""ControlNet tile by tile, in A1111 (sd-webui-controlnet) and in Forge (built-in ControlNet).

The control models are pointwise on the latent grid (see fake_controlnet), so with
partition-of-unity blending the tiled job equals the untiled one exactly, and each
call's hint crops can be read back and compared with the plan's windows.
"""

from __future__ import annotations

import re
import sys
import types
from types import SimpleNamespace

import pytest
import torch

from tiled_diffusion.control import window_rows
from tiled_diffusion.plan import Window

from . import fake_a1111 as fake
from . import fake_controlnet as cn
from .test_hosts_a1111 import H, W, args, latents, run_img2img, skipped_mask
from .test_hosts_forge import forge_processing, run_forge

LATENT = (H // 8, W // 8)


def several_windows(**values):
    """Settings that give several windows of one shape (a whole 512 px image is one window)."""
    return args(**{"max_tile": 256, "overlap": 32, "min_window": 128, **values})


def window(x, y, w, h):
    return Window(x, y, w, h, bands=(), leaves=(0,))


def boxes_seen(model: cn.PointwiseControl) -> set:
    return {box for call in model.boxes for box in call}


def views(plan, active=lambda leaf: True) -> set:
    return {(w.x, w.y, w.w, w.h) for w in plan.windows if active(plan.leaves[w.leaves[0]])}


# ---------------------------------------------------------------- the crops


def test_window_rows_cut_each_window_and_lay_it_out_like_the_latent_rows():
    hint = cn.coordinate_hint(W, H)
    batch = [window(8, 0, 16, 8), window(40, 16, 16, 8)]
    crops = window_rows(hint, batch, LATENT, rows=3)
    assert crops.shape == (6, 3, 64, 128)
    for row in range(6):
        w = batch[row // 3]
        assert (crops[row, 0, 0, 0], crops[row, 1, 0, 0]) == (w.x * 8, w.y * 8)
        assert (crops[row, 0, -1, -1], crops[row, 1, -1, -1]) == ((w.x + w.w) * 8 - 1, (w.y + w.h) * 8 - 1)
    single = window_rows(hint, batch[:1], LATENT, rows=3)
    assert single.shape[0] == 1, "one window: the model broadcasts a one-row hint, as untiled"


def test_window_rows_give_per_image_hints_to_the_rows_of_each_chunk():
    hint = cn.coordinate_hint(W, H, images=2)
    hint[:, 2] = torch.tensor([10.0, 20.0]).view(2, 1, 1)  # the image a row shows
    crops = window_rows(hint, [window(0, 0, 8, 8), window(8, 0, 8, 8)], LATENT, rows=4, chunks=2)
    assert crops[:, 2, 0, 0].tolist() == [10, 20, 10, 20] * 2  # uncond images, cond images, per window


def test_window_rows_scale_masks_of_any_resolution():
    mask = torch.arange(LATENT[0] * LATENT[1] * 4, dtype=torch.float32).view(
        1, 1, LATENT[0] * 2, LATENT[1] * 2
    )
    crop = window_rows(mask, [window(8, 16, 8, 8)], LATENT, rows=1)
    torch.testing.assert_close(crop, mask[:, :, 32:48, 16:32])


# ---------------------------------------------------------------- A1111 (sd-webui-controlnet)


def a1111_job(k_diffusion, state, init_image, units, job_args, batch=1, seed=21, tiled=True, **fields):
    """One img2img job with sd-webui-controlnet's units in the UNet hook."""
    original, noise = latents(batch, seed)
    p = fake.processing([init_image], W, H, batch, **fields)
    hook = cn.A1111ControlHook(units)
    p.scripts = cn.a1111_scripts(hook)
    model = fake.AnalyticSD()
    model.control = hook
    out, job = run_img2img(k_diffusion, state, p, job_args, original, noise, model=model, run_job=tiled)
    return out, job, model


@pytest.mark.parametrize("layout", ["one call", "split calls", "batch 2", "and prompts"])
@pytest.mark.parametrize("tile_batch", [1, 4])
def test_a1111_controlnet_per_window_equals_untiled(k_diffusion, state, init_image, layout, tile_batch):
    batch = 1 if layout in ("one call", "split calls") else 2
    layouts = {"split calls": ("split_calls", True), "and prompts": ("repeats", [3, 1])}
    hint = cn.coordinate_hint(W, H)

    def run(tiled):
        unit = cn.A1111Unit(hint, weight=0.9)
        original, noise = latents(batch, 22)
        p = fake.processing([init_image], W, H, batch)
        hook = cn.A1111ControlHook([unit])
        p.scripts = cn.a1111_scripts(hook)
        model = fake.AnalyticSD()
        model.control = hook
        configure = (lambda cfg: setattr(cfg, *layouts[layout])) if layout in layouts else lambda cfg: None
        job_args = several_windows(tile_batch=tile_batch)
        out, job = run_img2img(
            k_diffusion, state, p, job_args, original, noise, model=model, configure=configure, run_job=tiled
        )
        return out, job, unit

    tiled, job, unit = run(True)
    plain, _, _ = run(False)
    torch.testing.assert_close(tiled, plain, atol=1e-5, rtol=1e-5)
    assert boxes_seen(unit.control_model) == views(job.plan), "each window saw its own crop"
    assert max(len(call) for call in unit.control_model.boxes) > (1 if tile_batch > 1 else 0)
    assert unit.hint_cond is hint and unit.hr_hint_cond is None, "the unit is given back"


def test_a1111_skipped_windows_cost_no_controlnet_call(k_diffusion, state, init_image):
    unit = cn.A1111Unit(cn.coordinate_hint(W, H))
    out, job, model = a1111_job(k_diffusion, state, init_image, [unit], several_windows(skip_below=100))
    skipped = skipped_mask(job.plan)
    assert skipped.any()
    active = views(job.plan, lambda leaf: not leaf.skipped)
    assert boxes_seen(unit.control_model) == active
    assert len(unit.control_model.boxes) == len(model.shapes), "one ControlNet call per model call"


def test_a1111_several_units_t2i_adapter_and_region_mask(k_diffusion, state, init_image):
    def units():
        return [
            cn.A1111Unit(cn.coordinate_hint(W, H, seed=3), mask=cn.latent_mask(W, H)),
            cn.A1111Unit(cn.coordinate_hint(W, H, seed=4), kind="T2I_Adapter", model=cn.CachingAdapter(0.5)),
        ]

    tiled_units = units()
    tiled, job, _ = a1111_job(k_diffusion, state, init_image, tiled_units, several_windows(tile_batch=3))
    plain, _, _ = a1111_job(k_diffusion, state, init_image, units(), args(), tiled=False)
    torch.testing.assert_close(tiled, plain, atol=1e-5, rtol=1e-5)
    for unit in tiled_units:
        assert boxes_seen(unit.control_model) == views(job.plan)


def test_a1111_t2i_adapter_weighting_cond_apart_runs_one_window_per_call(k_diffusion, state, init_image):
    def units():
        return [
            cn.A1111Unit(
                cn.coordinate_hint(W, H), kind="T2I_Adapter", cfg_injection=True, model=cn.CachingAdapter()
            )
        ]

    tiled_units = units()
    tiled, job, _ = a1111_job(k_diffusion, state, init_image, tiled_units, several_windows(tile_batch=4))
    plain, _, _ = a1111_job(k_diffusion, state, init_image, units(), args(), tiled=False)
    torch.testing.assert_close(tiled, plain, atol=1e-5, rtol=1e-5)
    assert {len(call) for call in tiled_units[0].control_model.boxes} == {1}


def test_a1111_reference_unit_keeps_the_whole_image(k_diffusion, state, init_image):
    def units():
        return [cn.A1111Unit(cn.coordinate_hint(W, H), kind="AttentionInjection", name="reference_only")]

    tiled_units = units()
    tiled, job, model = a1111_job(
        k_diffusion, state, init_image, tiled_units, several_windows(tile_batch=3), batch=2
    )
    plain, _, _ = a1111_job(k_diffusion, state, init_image, units(), args(), batch=2, tiled=False)
    torch.testing.assert_close(tiled, plain, atol=1e-5, rtol=1e-5)
    assert tiled_units[0].hint_cond.shape[-2:] == (H, W)


@pytest.mark.parametrize("case", ["img2img", "first pass", "hires pass"])
def test_a1111_each_pass_crops_its_own_hint_and_knows_which_pass_it_is(k_diffusion, state, init_image, case):
    """The unit picks hint_cond or hr_hint_cond by the height nearest to the call's.

    img2img: both are the job's hint (a window as high as the image ties). txt2img + hires
    fix: hint_cond at the first pass's size, hr_hint_cond at the hires pass's."""
    hires = case == "hires pass"
    small, large = {
        "img2img": (cn.coordinate_hint(W, H, seed=5),) * 2,
        "first pass": (cn.coordinate_hint(W, H, seed=5), cn.coordinate_hint(2 * W, 2 * H, seed=6)),
        "hires pass": (cn.coordinate_hint(W // 2, H // 2, seed=5), cn.coordinate_hint(W, H, seed=6)),
    }[case]
    job_args = args() if case == "img2img" else several_windows()  # img2img: one window, the image

    def run(tiled):
        unit = cn.A1111Unit(small, hr_hint=large)
        latent, noise = latents(1, 23)
        p = fake.processing(
            None, W, H, 1, is_hr_pass=hires, enable_hr=case != "img2img", denoising_strength=0.6
        )
        if case == "img2img":
            p.init_images = [init_image]
        hook = cn.A1111ControlHook([unit])
        p.scripts = cn.a1111_scripts(hook)
        model = fake.AnalyticSD()
        model.control = hook
        out, job = run_img2img(k_diffusion, state, p, job_args, latent, noise, model=model, run_job=tiled)
        return out, unit, job

    tiled, unit, job = run(True)
    plain, _, _ = run(False)
    active = ~skipped_mask(job.plan)
    torch.testing.assert_close(tiled[..., active], plain[..., active], atol=1e-5, rtol=1e-5)
    if case == "img2img":
        assert any(w.h == H // 8 for w in job.plan.windows), "a window as high as the image"
    assert set(unit.in_hires) == {hires}, "the unit still knows which pass it is in"
    assert unit.hint_cond is small and unit.hr_hint_cond is large


@pytest.mark.parametrize("name", ["tile_colorfix", "tile_colorfix+sharp", "inpaint_only+lama"])
def test_a1111_units_that_need_the_whole_latent_are_refused_by_name(k_diffusion, state, init_image, name):
    unit = cn.A1111Unit(cn.coordinate_hint(W, H), name=name)
    hook = cn.A1111ControlHook([unit])
    p = fake.processing([init_image], W, H, 1, scripts=cn.a1111_scripts(hook))
    with pytest.raises(
        ValueError, match=re.escape(f"Quadtree Tiled Diffusion: the ControlNet unit '{name}'")
    ):
        run_img2img(k_diffusion, state, p, args(), *latents(1, 25))
    assert hook.restored == 1 and p.scripts.alwayson_scripts[1].latest_network is None, "its UNet hook undone"


def test_a1111_rejected_settings_undo_controlnet_hook_too(k_diffusion, state, init_image):
    hook = cn.A1111ControlHook([cn.A1111Unit(cn.coordinate_hint(W, H))])
    p = fake.processing([init_image], W, H, 1, scripts=cn.a1111_scripts(hook))
    with pytest.raises(Exception, match="overlap: 12"):
        run_img2img(k_diffusion, state, p, args()[:5] + [12], *latents(1, 26))
    assert hook.restored == 1 and p.scripts.alwayson_scripts[1].latest_network is None


def test_a1111_units_are_given_back_when_a_call_fails(k_diffusion, state, init_image):
    hint, mask = cn.coordinate_hint(W, H), cn.latent_mask(W, H)
    unit = cn.A1111Unit(hint, mask=mask)
    original, noise = latents(1, 24)
    p = fake.processing([init_image], W, H, 1)
    hook = cn.A1111ControlHook([unit])
    p.scripts = cn.a1111_scripts(hook)

    def fail(call):
        if call == 3:
            raise fake.InterruptedException

    model = fake.AnalyticSD(on_call=fail)
    model.control = hook
    run_img2img(k_diffusion, state, p, several_windows(tile_batch=1), original, noise, model=model)
    assert unit.hint_cond is hint and unit.effective_region_mask is mask and unit.hr_hint_cond is None


# ---------------------------------------------------------------- Forge (built-in ControlNet)


@pytest.fixture
def image_resize(monkeypatch):
    """Forge's backend.misc.image_resize, as far as hints go."""
    names = ("backend", "backend.misc", "backend.misc.image_resize")
    modules = {name: sys.modules.get(name) or types.ModuleType(name) for name in names}
    modules["backend.misc.image_resize"].adaptive_resize = cn.adaptive_resize
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def forge_job(k_diffusion, init_image, chain, job_args, batch=1, separate=False, tiled=True, seed=31):
    p = forge_processing(k_diffusion, init_image, batch=batch, separate=separate)
    p.sd_model.forge_objects_original.controlnet_linked_list = chain
    original, noise = latents(batch, seed)
    out, job = run_forge(p, job_args if tiled else [False], original, noise)
    return out, job, p


SOFT = (
    torch.tensor(0.7),
    torch.tensor(0.2),
)  # weights of cond and uncond rows: "My prompt is more important"


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("soft", [None, SOFT])
def test_forge_controlnet_per_window_equals_untiled_without_a_whole_image_pass(
    k_diffusion, init_image, image_resize, separate, soft
):
    hint = cn.coordinate_hint(W, H)
    tiled_net = cn.ForgeControlNet(hint, strength=0.9, soft=soft)
    tiled, job, _ = forge_job(k_diffusion, init_image, tiled_net, several_windows(tile_batch=4), 2, separate)
    plain_net = cn.ForgeControlNet(hint, strength=0.9, soft=soft)
    plain, _, _ = forge_job(k_diffusion, init_image, plain_net, args(), 2, separate, tiled=False)
    torch.testing.assert_close(tiled, plain, atol=1e-5, rtol=1e-5)
    assert tiled_net.full_size_calls == 0 and plain_net.full_size_calls > 0
    assert boxes_seen(tiled_net.model) == views(job.plan)
    assert max(len(call) for call in tiled_net.model.boxes) > 1, "several windows per call"
    assert tiled_net.cond_hint_original is hint, "the ControlNet is given back"


def test_forge_skipped_and_not_yet_started_windows_cost_no_controlnet_call(
    k_diffusion, init_image, image_resize
):
    net = cn.ForgeControlNet(cn.coordinate_hint(W, H))
    job_args = several_windows(
        skip_below=100, variable_denoise=True, denoise_largest=0.3, denoise_smallest=0.7
    )
    out, job, p = forge_job(k_diffusion, init_image, net, job_args)
    assert skipped_mask(job.plan).any()
    assert boxes_seen(net.model) == views(job.plan, lambda leaf: not leaf.skipped)
    calls = p.sd_model.forge_objects_original.model.shapes
    assert len(net.model.boxes) == len(calls), "one ControlNet evaluation per model call"
    largest = [w for w in job.plan.windows if job.plan.leaves[w.leaves[0]].strength == 0.3]
    seen = [box for call in net.model.boxes for box in call]
    assert largest and all(seen.count((w.x, w.y, w.w, w.h)) < p.steps * 0.5 for w in largest), "late start"


def test_forge_two_units_t2i_adapter_and_mask(k_diffusion, init_image, image_resize):
    def chain():
        first = cn.ForgeControlNet(cn.coordinate_hint(W, H, seed=7), mask=cn.latent_mask(W, H), soft=SOFT)
        return cn.ForgeControlNet(cn.coordinate_hint(W, H, seed=8), previous=first, t2i=True)

    tiled_chain = chain()
    tiled, job, _ = forge_job(
        k_diffusion, init_image, tiled_chain, several_windows(tile_batch=3, max_tile=128, overlap=0)
    )
    plain, _, _ = forge_job(k_diffusion, init_image, chain(), args(), tiled=False)
    torch.testing.assert_close(tiled, plain, atol=1e-5, rtol=1e-5)
    for net in tiled_chain.chain():
        assert boxes_seen(net.model) == views(job.plan)
    assert len(tiled_chain.model.boxes) > 1, "the adapter is evaluated again for every window batch"


def test_forge_tile_colorfix_is_refused_by_name(k_diffusion, init_image, image_resize):
    p = forge_processing(k_diffusion, init_image)
    net = cn.ForgeControlNet(cn.coordinate_hint(W, H))
    p.sd_model.forge_objects_original.controlnet_linked_list = net
    unit = SimpleNamespace(preprocessor=SimpleNamespace(name="tile_colorfix+sharp"))
    p.scripts = SimpleNamespace(alwayson_scripts=[SimpleNamespace(current_params={0: unit})])
    original, noise = latents(1, 32)
    with pytest.raises(
        ValueError, match="the ControlNet unit 'tile_colorfix\\+sharp' cannot run tile by tile"
    ):
        run_forge(p, args(), original, noise)
    assert net.full_size_calls == 0, "refused before any whole-image ControlNet pass"


def test_forge_controlnet_is_given_back_when_a_call_fails(k_diffusion, init_image, image_resize):
    hint, mask = cn.coordinate_hint(W, H), cn.latent_mask(W, H)
    net = cn.ForgeControlNet(hint, mask=mask)
    p = forge_processing(k_diffusion, init_image)
    p.sd_model.forge_objects_original.controlnet_linked_list = net
    model = p.sd_model.forge_objects_original.model
    calls = []

    def failing(x, t, **c):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return type(model).apply_model(model, x, t, **c)

    model.apply_model = failing
    original, noise = latents(1, 33)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_forge(p, several_windows(tile_batch=1), original, noise)
    assert net.cond_hint_original is hint and net.advanced_mask_weighting is mask and net.cond_hint is None
