"""Each window is told its own prompt, in A1111's and Forge's cond layouts and call patterns.

What every model call sees is recorded; each window batch's rows are matched to their
windows (by the crop of the step's latent) and to their rows of the step's batch, and a
window's cond rows must equal the host's own conditioning of the window's prompt at that
step (computed here with the stand-in prompt parser), its uncond rows the job's.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import tiled_diffusion as td
from tiled_diffusion.hosts import webui

from . import fake_a1111 as fake
from . import fake_prompts as prompts
from .test_hosts_a1111 import H, W, latents
from .test_hosts_forge import KModel, UnetPatcher
from .test_window_prompts import CornerUNet

STEPS = 12
LEFT, RIGHT = "a red barn", "a wheat field"
REGIONS = f"0 0 0.5 1: {LEFT}\n0.5 0 1 1: {RIGHT}"
LONG = ", ".join(f"word{i} thing{i}" for i in range(50))  # 100 tokens + commas: two chunks


def settings(**values):
    base = {
        "overlap": 16,
        "tile_batch": 4,
        "min_tile": 64,
        "max_tile": 128,
        "min_window": 0,
        "regions": REGIONS,
    }
    return td.Settings(enabled=True, **{**base, **values}).as_args()


def region_of(plan: td.Plan, window: td.Window) -> str:
    """The region prompt a window must get: the one holding its tiles' centres (checked here
    from the geometry, not from what the plan says)."""
    sides = {(plan.leaves[i].x + plan.leaves[i].w / 2) * 8 < W / 2 for i in window.leaves}
    assert len(sides) == 1, "a window never mixes tiles of two regions"
    return LEFT if sides.pop() else RIGHT


class RecordingSD(fake.AnalyticSD):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.records = []

    def apply_model(self, x, t, cond):
        sigma = self.sigma_of(t).view(-1, 1, 1, 1)
        text = cond["crossattn"] if self.sdxl else cond["c_crossattn"][0]
        vector = cond.get("vector")
        self.records.append(
            (x * (sigma**2 + 1).sqrt(), text.clone(), None if vector is None else vector.clone())
        )
        return super().apply_model(x, t, cond)


class RecordingCFG(prompts.A1111CFG):
    def _inner(self, x, sigma, text, image_cond, first):
        start = len(self.inner_model.inner_model.records)
        out = super()._inner(x, sigma, text, image_cond, first)
        self.inner_calls[-1] += (start, len(self.inner_model.inner_model.records))
        return out


def window_of(plan, crop, step_x):
    """The window whose view of the step's rows this crop is, or None."""
    found = [
        w
        for w in plan.windows
        if (w.h, w.w) == tuple(crop.shape[-2:])
        and torch.allclose(crop, step_x[:, :, w.y : w.y + w.h, w.x : w.x + w.w], atol=1e-4)
    ]
    assert len(found) <= 1
    return found[0] if found else None


def windows_of(plan, records, x_call, cut):
    """Each record of one inner call with (rows a:b of the call, [its windows]).

    The call is evaluated whole, or (cond and uncond rows apart) as its cond rows, before
    `cut`, then its uncond rows: every window once per part, in that order."""
    n = x_call.shape[0]
    parts, part, seen, found = [(0, n)], 0, set(), []
    for crops, *rest in records:
        while True:
            a, b = parts[part]
            rows = b - a
            windows = None
            if crops.shape[0] % rows == 0:
                blocks = range(crops.shape[0] // rows)
                windows = [window_of(plan, crops[j * rows : (j + 1) * rows], x_call[a:b]) for j in blocks]
            if windows and all(windows) and not seen & {id(w) for w in windows}:
                break
            if parts == [(0, n)] and not found:  # not whole: the cond rows first
                parts, part = [(0, cut), (cut, n)], 0
            elif part == 0 and len(parts) == 2:  # every window seen: the uncond rows
                part, seen = 1, set()
            else:
                raise AssertionError("a model call's rows are no window views of the step's rows")
        seen |= {id(w) for w in windows}
        found.append((a, b, windows, crops, *rest))
    return found


def processing(monkeypatch, init_image, prompt_list, negatives, sdxl):
    """The stand-in prompt machinery ("barn" marked for the words tests) and an img2img p."""
    text_model = prompts.install(monkeypatch, sdxl, marked=("barn",))
    batch = len(prompt_list)
    p = fake.processing(
        [init_image] * batch, W, H, batch, prompts=prompt_list, negative_prompts=negatives, steps=STEPS
    )
    p.firstpass_steps, p.denoising_strength = STEPS, 0.5
    return text_model, p


def run_a1111(
    k_diffusion, state, monkeypatch, init_image, prompt_list, negatives, sdxl=False, sd_model=None, **values
):
    text_model, p = processing(monkeypatch, init_image, prompt_list, negatives, sdxl)
    batch = len(prompt_list)
    if sd_model is not None:
        p.sd_model = sd_model
    sd = RecordingSD(sdxl=sdxl)
    p.sampler = fake.KDiffusionSampler(k_diffusion, sd, state)
    p.sampler.model_wrap_cfg = RecordingCFG(p.sampler.model_wrap_cfg.inner_model, state, sdxl)
    original, noise = latents(batch, 5)
    job = webui.start(p, settings(**values))
    job.before_sampling(p, original)
    cond, uncond = prompts.job_conds(text_model, prompt_list, negatives, STEPS, W, H)
    encoded_before = len(text_model.encoded)
    image_cond = torch.zeros(batch, 5, 1, 1)
    out = p.sampler.sample_img2img(p, original, noise, cond, uncond, image_cond)
    job.finish()
    return SimpleNamespace(
        out=out,
        job=job,
        sd=sd,
        cfg=p.sampler.model_wrap_cfg,
        text=text_model,
        cond=cond,
        uncond=uncond,
        encoded=text_model.encoded[encoded_before:],
    )


def expected_rows(text_model, texts, step, sdxl):
    conds_list, rows = prompts.reconstruct_multicond_batch(
        prompts.get_multicond_learned_conditioning(
            text_model, prompts.SdConditioning(texts, width=W, height=H), STEPS
        ),
        step,
    )
    return rows if sdxl else {"crossattn": rows}


def check_a1111(run, window_texts, sdxl=False):
    """Every row of every window batch: cond rows = the window prompt's, uncond rows = the job's.
    Returns the windows of each model call, and whether it holds cond rows."""
    plan = run.job.plan
    seen = []
    for step, first, x_call, start, end in run.cfg.inner_calls:
        uncond = prompts.reconstruct_cond_batch(run.uncond, step)
        uncond = uncond if sdxl else {"crossattn": uncond}
        cond_rows = prompts.reconstruct_multicond_batch(run.cond, step)[1]
        cond_rows = (cond_rows["crossattn"] if sdxl else cond_rows).shape[0]
        for a, b, windows, _crops, text, vector in windows_of(
            plan, run.sd.records[start:end], x_call, max(cond_rows - first, 0)
        ):
            n = b - a
            for j, window in enumerate(windows):
                want = expected_rows(run.text, window_texts(window), step, sdxl)
                for r in range(n):
                    row = first + a + r
                    source = want if row < cond_rows else uncond
                    index = row if row < cond_rows else row - cond_rows
                    assert torch.equal(text[j * n + r], source["crossattn"][index]), (step, window, row)
                    if sdxl:
                        assert torch.equal(vector[j * n + r], source["vector"][index])
            seen.append((windows, first + a < cond_rows))
    return seen


@pytest.mark.parametrize("tile_batch", [1, 4])
@pytest.mark.parametrize("batch", [1, 2])
def test_a1111_each_window_gets_its_regions_prompt(
    k_diffusion, state, monkeypatch, init_image, tile_batch, batch
):
    job_prompts = ["a farm, highly detailed", "a farm at dusk"][:batch]
    run = run_a1111(
        k_diffusion, state, monkeypatch, init_image, job_prompts, ["blurry"] * batch, tile_batch=tile_batch
    )
    seen = check_a1111(run, lambda w: [f"{p}, {region_of(run.job.plan, w)}" for p in job_prompts])
    regions = {region_of(run.job.plan, w) for call, _ in seen for w in call}
    assert regions == {LEFT, RIGHT}
    if tile_batch == 4:  # windows of both regions share model calls: no extra UNet call
        assert all(len({region_of(run.job.plan, w) for w in call}) == 2 for call, _ in seen)
    # The text encoder ran once per distinct window prompt (each image's prompt once).
    assert sorted(run.encoded) == sorted(f"{p}, {r}" for p in job_prompts for r in (LEFT, RIGHT))


def test_a1111_and_parts_each_get_the_region(k_diffusion, state, monkeypatch, init_image):
    job_prompts = ["a farm :1.2 AND a sunny sky"]
    run = run_a1111(k_diffusion, state, monkeypatch, init_image, job_prompts, ["blurry"])
    r = lambda w: region_of(run.job.plan, w)  # noqa: E731
    check_a1111(run, lambda w: [f"a farm, {r(w)} :1.2 AND a sunny sky, {r(w)}"])


def test_a1111_scheduled_words_follow_the_step(k_diffusion, state, monkeypatch, init_image):
    job_prompts = ["a farm, [sunny:rainy:3] sky"]
    run = run_a1111(k_diffusion, state, monkeypatch, init_image, job_prompts, ["blurry"])
    check_a1111(run, lambda w: [f"a farm, [sunny:rainy:3] sky, {region_of(run.job.plan, w)}"])
    steps = {step for step, *_ in run.cfg.inner_calls}
    assert min(steps) < 3 < max(steps)  # both entries of the schedule were used


@pytest.mark.parametrize("prompt", [LONG, "a farm"])
def test_a1111_prompts_of_other_lengths_are_evaluated_apart(
    k_diffusion, state, monkeypatch, init_image, prompt
):
    # A 150-token prompt (cond 154 tokens, uncond 77: A1111 calls cond and uncond apart), and a
    # short prompt whose window prompts become longer than the uncond (the hook splits the call).
    regions = f"0 0 0.5 1: {LEFT}\n0.5 0 1 1: {LONG}"
    run = run_a1111(k_diffusion, state, monkeypatch, init_image, [prompt], ["blurry"], regions=regions)
    long_side = lambda w: region_of(run.job.plan, w) == RIGHT  # noqa: E731
    seen = check_a1111(run, lambda w: [f"{prompt}, {LONG if long_side(w) else LEFT}"])
    # Cond rows of different lengths never share a call; uncond rows of all windows do.
    assert all(len({long_side(w) for w in call}) == 1 for call, cond_rows in seen if cond_rows)
    assert any(len({long_side(w) for w in call}) == 2 for call, cond_rows in seen if not cond_rows)


def test_a1111_sdxl_pooled_vector_goes_with_the_rows(k_diffusion, state, monkeypatch, init_image):
    run = run_a1111(k_diffusion, state, monkeypatch, init_image, ["a farm"], ["blurry"], sdxl=True)
    check_a1111(run, lambda w: [f"a farm, {region_of(run.job.plan, w)}"], sdxl=True)


def test_a1111_windows_told_the_whole_prompt_are_bit_identical(k_diffusion, state, monkeypatch, init_image):
    # A region that holds no tile's centre: every window keeps the job's prompt.
    plain = run_a1111(k_diffusion, state, monkeypatch, init_image, ["a farm"], ["blurry"], regions="")
    nowhere = run_a1111(
        k_diffusion, state, monkeypatch, init_image, ["a farm"], ["blurry"], regions="0 0 0.01 0.01: a cow"
    )
    assert not any(leaf.prompt for leaf in nowhere.job.plan.leaves)
    assert torch.equal(plain.out, nowhere.out)
    assert nowhere.encoded == []  # nothing encoded beyond the job's own prompts


# Forge


class RecordingKModel(KModel):
    def __init__(self):
        super().__init__()
        self.records = []

    def apply_model(self, x, t, c_crossattn, transformer_options, **kwargs):
        self.records.append((x.clone(), c_crossattn.clone(), kwargs.get("y")))
        return super().apply_model(x, t, c_crossattn, transformer_options, **kwargs)


def run_forge(
    k_diffusion,
    state,
    monkeypatch,
    init_image,
    prompt_list,
    negatives,
    sdxl=False,
    separate=False,
    hires=False,
    **values,
):
    text_model, p = processing(monkeypatch, init_image, prompt_list, negatives, sdxl)
    if hires:  # the hires pass of a txt2img job: Forge starts it twice
        import sys
        import types

        samplers = types.ModuleType("modules.sd_samplers")
        samplers.find_sampler_config = lambda name: None
        monkeypatch.setitem(sys.modules, "modules.sd_samplers", samplers)
        p.init_images, p.is_hr_pass, p.hr_prompts = None, True, prompt_list
        p.hr_upscale_to_x, p.hr_upscale_to_y, p.hr_second_pass_steps = W, H, STEPS
        p.hr_sampler_name = p.sampler_name = "Euler"
    batch = len(prompt_list)
    kmodel = WordsKModel()
    unet = UnetPatcher(kmodel)
    p.sd_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=unet))
    original, noise = latents(batch, 5)
    cfg = prompts.ForgeCFG(None, separate)

    class Sampler:
        model_wrap_cfg = cfg

        def get_sigmas(self, p, steps):
            return fake.karras(steps)

    p.sampler = Sampler()
    job = webui.start(p, settings(**values))
    for _ in range(2 if hires else 1):
        job.before_sampling(p, original)
    cfg.unet = p.sd_model.forge_objects.unet
    cond, uncond = prompts.job_conds(text_model, prompt_list, negatives, STEPS, W, H)
    t_enc = int(0.5 * STEPS)
    schedule = p.sampler.get_sigmas(p, STEPS)[STEPS - t_enc - 1 :]
    model = lambda x, sigma: cfg(x, sigma, cond, uncond, 5.0)  # noqa: E731
    out = k_diffusion.sampling.sample_euler(model, original + noise * schedule[0], schedule, disable=True)
    job.finish()
    return SimpleNamespace(out=out, job=job, kmodel=kmodel, cfg=cfg, text=text_model, uncond=uncond)


def check_forge(run, window_texts, sdxl=False):
    """Every chunk of every window batch: a cond chunk holds one AND part's rows of the
    window's prompt, an uncond chunk the job's uncond rows (repeated to the call's length)."""
    plan = run.job.plan
    for step, kinds, parts, x_call, start, end in run.cfg.calls:
        uncond = prompts.reconstruct_cond_batch(run.uncond, step)
        uncond = uncond if sdxl else {"crossattn": uncond}
        n = x_call.shape[0]
        per = n // len(kinds)
        for crops, text, pooled in run.kmodel.records[start:end]:
            for j in range(crops.shape[0] // n):
                window = window_of(plan, crops[j * n : (j + 1) * n], x_call)
                assert window is not None
                texts = prompts.SdConditioning(window_texts(window), width=W, height=H)
                conds_list, want = prompts.reconstruct_multicond_batch(
                    prompts.get_multicond_learned_conditioning(run.text, texts, STEPS), step
                )
                want = want if sdxl else {"crossattn": want}
                for c, (kind, part) in enumerate(zip(kinds, parts)):
                    own = slice(j * n + c * per, j * n + (c + 1) * per)
                    if kind == 1:
                        source, rows = uncond, list(range(per))
                    else:
                        source, rows = want, [conds_list[i][part][0] for i in range(per)]
                    expect, got = source["crossattn"][rows], text[own]
                    assert got.shape[1] % expect.shape[1] == 0
                    assert torch.equal(got, expect.repeat(1, got.shape[1] // expect.shape[1], 1)), (step, c)
                    if sdxl:
                        assert torch.equal(pooled[own], source["vector"][rows])


@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("batch", [1, 2])
def test_forge_each_window_gets_its_regions_prompt(
    k_diffusion, state, monkeypatch, init_image, separate, batch
):
    job_prompts = ["a farm, highly detailed", "a farm at dusk"][:batch]
    run = run_forge(
        k_diffusion, state, monkeypatch, init_image, job_prompts, ["blurry"] * batch, separate=separate
    )
    check_forge(run, lambda w: [f"{p}, {region_of(run.job.plan, w)}" for p in job_prompts])


def test_forge_and_parts_long_prompts_and_sdxl(k_diffusion, state, monkeypatch, init_image):
    regions = f"0 0 0.5 1: {LEFT}\n0.5 0 1 1: {LONG}"
    text = lambda w: LONG if region_of(run.job.plan, w) == RIGHT else LEFT  # noqa: E731
    run = run_forge(
        k_diffusion, state, monkeypatch, init_image, ["a farm AND a sky :0.5"], ["blurry"], regions=regions
    )
    check_forge(run, lambda w: [f"a farm, {text(w)} AND a sky, {text(w)} :0.5"])
    run = run_forge(
        k_diffusion, state, monkeypatch, init_image, ["a farm", "a barn"], ["blurry"] * 2, sdxl=True
    )
    check_forge(
        run, lambda w: [f"{p}, {region_of(run.job.plan, w)}" for p in ("a farm", "a barn")], sdxl=True
    )


# "Words where they are": the phrases placed by the model's own cross-attention

WORDS = {"window_prompts": "Words where they are", "regions": ""}
BARN_PROMPT = "a farm, a red barn, highly detailed"


def over_corner(plan, window) -> bool:
    """Whether the window's tiles lie over the top-left quarter, where the stand-in UNet's
    attention puts "a red barn" (checked here from the geometry)."""
    H8, W8 = plan.latent_size
    shares = []
    for i in window.leaves:
        leaf = plan.leaves[i]
        x0, x1 = max(leaf.x, 0), min(leaf.x + leaf.w, W8 // 2)
        y0, y1 = max(leaf.y, 0), min(leaf.y + leaf.h, H8 // 2)
        shares.append(max(x1 - x0, 0) * max(y1 - y0, 0) / (leaf.w * leaf.h))
    return max(shares) > 0.1


def words_texts(plan):
    return lambda w: [BARN_PROMPT if over_corner(plan, w) else "a farm, highly detailed"]


class StandInLDM:
    """A1111's sd_model for the words pass: apply_model(x_t, t, cond) into a UNet with
    cross-attention, and the training schedule."""

    def __init__(self):
        self.model = SimpleNamespace(diffusion_model=CornerUNet())
        self.alphas_cumprod = fake.sd15_alphas_cumprod()
        self.calls = []

    def apply_model(self, x, t, cond):
        self.calls.append((tuple(x.shape), t.tolist()))
        return self.model.diffusion_model(x, cond["c_crossattn"][0])


def test_a1111_words_where_they_are_places_a_phrase_by_its_attention(
    k_diffusion, state, monkeypatch, init_image
):
    sd_model = StandInLDM()
    run = run_a1111(
        k_diffusion, state, monkeypatch, init_image, [BARN_PROMPT], ["blurry"], sd_model=sd_model, **WORDS
    )
    assert len(sd_model.calls) == 1  # one model call before sampling, at the middle timestep
    ((shape, timesteps),) = sd_model.calls
    assert shape[-2:] == (56, 72) and set(timesteps) == {500}  # about 512 px, the job's aspect ratio
    plan = run.job.plan
    told = {over_corner(plan, w): plan.leaves[w.leaves[0]].prompt for w in plan.windows}
    assert told == {True: td.prompts.WindowPrompt(), False: td.prompts.WindowPrompt(left_out=("a red barn",))}
    check_a1111(run, words_texts(plan))


class WordsKModel(RecordingKModel):
    """Forge's KModel with a diffusion model to read: the words pass calls it directly."""

    def __init__(self):
        super().__init__()
        self.diffusion_model = CornerUNet()
        sigmas = ((1 - fake.sd15_alphas_cumprod()) / fake.sd15_alphas_cumprod()).sqrt()
        self.predictor = SimpleNamespace(sigma=lambda t: sigmas[t.long()])
        self.words_calls = []

    def apply_model(self, x, t, c_crossattn, transformer_options, **kwargs):
        if "cond_mark" not in transformer_options:  # not a sampling call
            self.words_calls.append((tuple(x.shape), t.tolist()))
            return self.diffusion_model(x, c_crossattn)
        return super().apply_model(x, t, c_crossattn, transformer_options, **kwargs)


@pytest.fixture
def forge_backend(monkeypatch):
    import sys
    import types

    backend = types.ModuleType("backend")
    backend.memory_management = types.ModuleType("backend.memory_management")
    backend.memory_management.load_model_gpu = lambda patcher: None
    backend.memory_management.get_torch_device = lambda: torch.device("cpu")
    monkeypatch.setitem(sys.modules, "backend", backend)
    monkeypatch.setitem(sys.modules, "backend.memory_management", backend.memory_management)


@pytest.mark.parametrize("hires", [False, True])
def test_forge_words_where_they_are_places_a_phrase_by_its_attention(
    k_diffusion, state, monkeypatch, init_image, forge_backend, hires
):
    run = run_forge(
        k_diffusion, state, monkeypatch, init_image, [BARN_PROMPT], ["blurry"], hires=hires, **WORDS
    )
    ((shape, sigmas),) = run.kmodel.words_calls
    assert shape[-2:] == (56, 72) and len(set(sigmas)) == 1
    plan = run.job.plan
    assert {plan.leaves[w.leaves[0]].prompt.left_out for w in plan.windows} == {(), ("a red barn",)}
    check_forge(run, words_texts(plan))


def test_words_where_they_are_is_refused_for_joint_attention_models(state, init_image):
    p = fake.processing([init_image], W, H)
    flux = SimpleNamespace(forge_objects=SimpleNamespace(unet=SimpleNamespace(model=SimpleNamespace(
        diffusion_model=type("IntegratedFluxTransformer2DModel", (), {})(), predictor=None
    ))))  # fmt: skip
    p.sd_model = type("Flux", (), {"forge_objects": flux.forge_objects})()
    job = webui.start(p, settings(**WORDS))
    assert isinstance(job, webui.RejectedJob)
    assert "'Words where they are'" in str(job.error) and "Flux" in str(job.error)


def test_preview_places_the_phrases_with_the_loaded_model(state, monkeypatch, init_image):
    import sys
    import threading
    import types

    from tiled_diffusion.hosts import words

    prompts.install(monkeypatch, marked=("barn",))
    model = StandInLDM()
    model.encoded = []

    def encode(pixels):  # a VAE: 8 px per latent pixel, 4 channels
        model.encoded.append(tuple(pixels.shape))
        return torch.nn.functional.avg_pool2d(pixels, 8).repeat(1, 2, 1, 1)[:, :4]

    model.encode_first_stage = encode
    model.get_first_stage_encoding = lambda posterior: posterior
    model.cond_stage_model = sys.modules["modules"].shared.sd_model  # the text engine
    monkeypatch.setattr(sys.modules["modules"].shared, "sd_model", model)
    monkeypatch.setattr(
        model, "get_learned_conditioning", model.cond_stage_model.get_learned_conditioning, raising=False
    )
    call_queue = types.ModuleType("modules.call_queue")
    call_queue.queue_lock = threading.Lock()
    monkeypatch.setitem(sys.modules, "modules.call_queue", call_queue)
    sys.modules["modules"].devices.device, sys.modules["modules"].devices.dtype_vae = "cpu", torch.float32
    placed, lines = words.preview(init_image, (48, 64), BARN_PROMPT)
    assert model.encoded == [(1, 3, 448, 576)]  # the image at the model's size, not the job's
    assert set(placed) == {"a red barn"} and placed["a red barn"].shape == (48, 64)
    assert placed["a red barn"][:24, :32].float().mean() > 0.9 and not placed["a red barn"][24:, 32:].any()
    assert "placed 1 of 3 phrases" in lines[0]


def test_a1111_hires_pass_encodes_the_hires_prompts_over_the_hires_steps(
    k_diffusion, state, monkeypatch, init_image
):
    import sys
    import types

    text_model = prompts.install(monkeypatch)
    samplers = types.ModuleType("modules.sd_samplers")
    samplers.find_sampler_config = lambda name: SimpleNamespace(total_steps=lambda steps: steps * 2)
    monkeypatch.setitem(sys.modules, "modules.sd_samplers", samplers)
    seen = []
    parser_function = prompts.get_multicond_learned_conditioning

    def recording(model, texts, steps, hires_steps=None, use_old_scheduling=False):
        seen.append((list(texts), texts.width, texts.height, steps, hires_steps))
        return parser_function(model, texts, steps, hires_steps, use_old_scheduling)

    monkeypatch.setattr(sys.modules["modules"].prompt_parser, "get_multicond_learned_conditioning", recording)
    p = fake.processing(None, W, H, 1, prompts=["a farm"], steps=STEPS, firstpass_steps=STEPS)
    p.is_hr_pass, p.hr_prompts, p.hr_upscale_to_x, p.hr_upscale_to_y = True, ["a farm, sharp"], W, H
    p.hr_second_pass_steps, p.hr_sampler_name, p.sampler_name = 5, "Euler", "Euler"
    p.denoising_strength = 0.5
    sd = RecordingSD()
    p.sampler = fake.KDiffusionSampler(k_diffusion, sd, state)
    p.sampler.model_wrap_cfg = RecordingCFG(p.sampler.model_wrap_cfg.inner_model, state)
    original, noise = latents(1, 5)
    job = webui.start(p, settings())
    job.before_sampling(p, original)
    cond, uncond = prompts.job_conds(text_model, ["a farm, sharp"], ["blurry"], STEPS, W, H)
    p.sampler.sample_img2img(p, original, noise, cond, uncond, torch.zeros(1, 5, 1, 1))
    job.finish()
    assert sorted(seen) == [([f"a farm, sharp, {r}"], W, H, STEPS, 10) for r in (LEFT, RIGHT)]


@pytest.mark.parametrize(
    "name, side",
    [
        ("SDXL", 1024),
        ("StableDiffusionXL", 1024),
        ("SD 2.x v-prediction", 768),
        ("SD 1.x", 512),
        ("StableDiffusion", 512),
    ],
)
def test_words_are_placed_at_the_models_own_size(name, side):
    # A1111 names SDXL "SDXL", Forge by its engine class "StableDiffusionXL": both 1024 px.
    from tiled_diffusion.hosts.families import Family

    assert Family(name).native_side == side
