"""The ComfyUI nodes and adapter, with ComfyUI's call pattern and cond layout (tests/fake_comfyui.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import tiled_diffusion as td
from tiled_diffusion.hosts import comfyui
from tiled_diffusion.hosts.comfyui_nodes import (
    NODE_CLASS_MAPPINGS,
    NODE_DISPLAY_NAME_MAPPINGS,
    TILING,
    QuadtreePasteKept,
    QuadtreePreview,
    QuadtreeTiledDiffusion,
    to_image,
    to_pil,
)
from tiled_diffusion.settings import PARAMETERS_BY_NAME

from . import fake_comfyui as fake
from .test_strength import computing_every_window

W, H = 512, 384  # px; latent 64 x 48
STEPS = 20


@pytest.fixture(scope="module")
def init_image():
    skimage_data = pytest.importorskip("skimage.data")
    return Image.fromarray(skimage_data.astronaut()).resize((W, H), Image.Resampling.LANCZOS)


def widgets(**values) -> dict:
    """The node's widget values: the declared defaults, some changed."""
    base = {name: PARAMETERS_BY_NAME[name].default for name in TILING}
    return {**base, "min_tile": 64, "max_tile": 256, "overlap": 16, **values}


def latents(batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, H // 8, W // 8, generator=g) / fake.SCALE, torch.randn(
        batch, 4, H // 8, W // 8, generator=g
    )


def tiled(init_image, latent: dict, model=None, **values):
    model = model or fake.ModelPatcher(fake.BaseModel())
    patched, plan, denoise = QuadtreeTiledDiffusion().patch(
        model, to_image([init_image]), latent, **widgets(**values)
    )
    return model, patched, plan, denoise


def latent_mask_of(plan: td.Plan, keep) -> torch.Tensor:
    mask = torch.zeros(plan.latent_size, dtype=torch.bool)
    for window in plan.windows:
        if keep(plan.leaves[window.leaves[0]]):
            for b in window.bands:
                mask[b.y : b.y + b.h, b.x : b.x + b.w] = True
    return mask


@pytest.mark.parametrize("sampler", ["sample_euler", "sample_euler_ancestral", "sample_dpmpp_2m"])
def test_skipped_tiles_keep_the_original_exactly_and_the_rest_is_the_plain_job(
    k_diffusion, init_image, sampler
):
    samples, noise = latents(2, 1)
    model, patched, plan, _ = tiled(init_image, {"samples": samples}, skip_below=100)
    out = fake.ksampler(k_diffusion, patched, samples, noise, STEPS, 0.5, sampler=sampler)
    plain = fake.ksampler(k_diffusion, model, samples, noise, STEPS, 0.5, sampler=sampler)
    kept = ~latent_mask_of(plan, lambda leaf: not leaf.skipped)
    alone = ~latent_mask_of(plan, lambda leaf: leaf.skipped)
    assert kept.any() and alone.any()
    torch.testing.assert_close(out[..., kept], samples[..., kept], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[..., alone], plain[..., alone], atol=1e-4, rtol=1e-4)
    assert "model_function_wrapper" not in model.model_options, "the input MODEL is left as it is"
    assert max(shape[-1] for shape, _ in model.model.calls) == W // 8  # the plain job's calls
    assert all(chunks == [1, 0] for _, chunks in model.model.calls)


def test_variable_denoise_tiles_equal_comfyuis_own_img2img_at_their_strength(k_diffusion, init_image):
    samples, noise = latents(1, 2)
    values = {
        "variable_denoise": True,
        "denoise_largest": 0.4,
        "denoise_smallest": 0.1,
        "method": "MultiDiffusion",
    }
    model, patched, plan, denoise = tiled(init_image, {"samples": samples}, overlap=0, **values)
    assert denoise == 0.4  # for the KSampler's denoise
    out = fake.ksampler(k_diffusion, patched, samples, noise, STEPS, denoise)
    strengths = sorted({leaf.strength for leaf in plan.leaves})
    assert len(strengths) >= 2 and min(strengths) == pytest.approx(0.1)
    for strength in strengths:
        # ComfyUI's img2img of a tile at this strength, with int(N * d / D) steps: the same schedule
        steps = int(STEPS * strength / denoise + 1e-6)
        alone = fake.ksampler(k_diffusion, model, samples, noise, steps, strength)
        assert torch.equal(fake.schedule(steps, strength), fake.schedule(STEPS, denoise)[-(steps + 1) :])
        only = latent_mask_of(plan, lambda leaf, s=strength: leaf.strength == s)
        torch.testing.assert_close(out[..., only], alone[..., only], atol=1e-4, rtol=1e-4)


def test_a_noise_mask_leaves_unmasked_windows_unevaluated_and_changes_nothing(k_diffusion, init_image):
    samples, noise = latents(1, 3)
    mask = torch.zeros(1, H, W)
    mask[:, 16:112, 24:120] = 1.0  # a corner, in px like a MASK
    latent = {"samples": samples, "noise_mask": mask}
    model, patched, plan, _ = tiled(init_image, latent, tile_batch=1)
    out = fake.ksampler(k_diffusion, patched, samples, noise, STEPS, 0.75, noise_mask=mask)
    masked_calls = list(model.model.calls)
    # the same plan with every window computed
    every = comfyui.patched(model, computing_every_window(plan), model.model.process_latent_in(samples))
    model.model.calls.clear()
    full = fake.ksampler(k_diffusion, every, samples, noise, STEPS, 0.75, noise_mask=mask)
    assert torch.equal(out, full)
    evaluated = sum(np.prod(shape) for shape, _ in masked_calls)
    assert evaluated < 0.5 * sum(np.prod(shape) for shape, _ in model.model.calls)
    kept = comfyui.latent_mask(mask, samples.shape) == 0
    torch.testing.assert_close(out[..., kept], samples[..., kept], atol=1e-4, rtol=0)


def test_a_strength_map_mask_keeps_black_and_refines_white(k_diffusion, init_image):
    samples, noise = latents(1, 4)
    strength_map = torch.ones(1, H, W)
    strength_map[:, :, : W // 2] = 0.0
    model = fake.ModelPatcher(fake.BaseModel())
    patched, plan, _ = QuadtreeTiledDiffusion().patch(
        model, to_image([init_image]), {"samples": samples}, strength_map=strength_map, **widgets()
    )
    out = fake.ksampler(k_diffusion, patched, samples, noise, STEPS, 0.5)
    plain = fake.ksampler(k_diffusion, model, samples, noise, STEPS, 0.5)
    left, right = slice(0, W // 16 - 1), slice(W // 16 + 2, None)
    torch.testing.assert_close(out[..., left], samples[..., left], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[..., right], plain[..., right], atol=1e-4, rtol=1e-4)
    pasted = QuadtreePasteKept().paste(
        to_image([Image.new("RGB", (W, H), (128, 128, 128))]), to_image([init_image]), plan
    )[0]
    result = np.asarray(to_pil(pasted)).astype(int)
    assert np.abs(result[:, : W // 2 - 16] - np.asarray(init_image)[:, : W // 2 - 16]).max() <= 1
    assert (result[:, W // 2 + 16 :] == 128).all()


def test_an_earlier_wrapper_runs_for_each_window_batch(k_diffusion, init_image):
    seen = []

    def previous(apply_model, params):
        seen.append(tuple(params["input"].shape))
        assert (
            len(params["cond_or_uncond"]) * params["input"].shape[0] // len(params["cond_or_uncond"])
            == params["input"].shape[0]
        )
        return apply_model(params["input"], params["timestep"], **params["c"])

    model = fake.ModelPatcher(fake.BaseModel())
    model.set_model_unet_function_wrapper(previous)
    samples, noise = latents(1, 5)
    _, patched, plan, _ = tiled(init_image, {"samples": samples}, model=model, skip_below=100)
    out = fake.ksampler(k_diffusion, patched, samples, noise, 8, 0.5)
    assert seen and max(shape[-1] for shape in seen) < W // 8
    kept = ~latent_mask_of(plan, lambda leaf: not leaf.skipped)
    torch.testing.assert_close(out[..., kept], samples[..., kept], atol=1e-4, rtol=0)


def test_inputs_carry_the_declared_names_defaults_ranges_and_tooltips():
    inputs = QuadtreeTiledDiffusion.INPUT_TYPES()["required"]
    for name in TILING:
        p = PARAMETERS_BY_NAME[name]
        kind, options = inputs[name]
        assert options["default"] == p.default and options["tooltip"] == p.help
        if p.choices:
            assert kind == list(p.choices)
        elif p.kind is bool:
            assert kind == "BOOLEAN"
        else:
            assert kind == ("INT" if p.kind is int else "FLOAT")
            assert (options["min"], options["max"], options["step"]) == (p.minimum, p.maximum, p.step)
    assert NODE_DISPLAY_NAME_MAPPINGS == {
        "QuadtreeTiledDiffusion": "Quadtree Tiled Diffusion",
        "QuadtreePreview": "Quadtree Preview",
        "QuadtreePasteKept": "Quadtree Paste Kept",
        "QuadtreeVAEDecodeTiled": "Quadtree VAE Decode (Tiled)",
        "QuadtreeVAEEncodeTiled": "Quadtree VAE Encode (Tiled)",
    }
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS)


@pytest.mark.parametrize(
    "values, message",
    [
        (
            {"min_tile": 100},
            "min_tile: 100 is not allowed; expected an integer from 64 to 2048 in steps of 8",
        ),
        (
            {"min_tile": 256, "max_tile": 384},
            "max_tile: 384 is not allowed; expected at least twice min_tile",
        ),
        ({"overlap": 12}, "overlap: 12 is not allowed"),
        ({"min_window": None}, None),  # fed by a link: checked when the node runs
    ],
)
def test_settings_comfyui_does_not_check_are_refused_before_anything_runs(values, message):
    checked = {"min_tile": 128, "max_tile": 512, "overlap": 32, "min_window": 256, **values}
    for node in (QuadtreeTiledDiffusion, QuadtreePreview):
        result = node.VALIDATE_INPUTS(**checked)
        assert result is True if message is None else message in result


def test_models_of_unknown_layout_are_refused_and_patch_models_get_their_grid(init_image):
    flux = fake.ModelPatcher(fake.BaseModel(config=fake.Flux(), diffusion_model=fake.Flux()))
    assert comfyui.family_of(flux).align == 2
    odd = fake.ModelPatcher(fake.BaseModel(diffusion_model=object()))
    with pytest.raises(
        ValueError, match=r"this model type \(SD15, diffusion model object\) is not supported"
    ):
        tiled(init_image, {"samples": latents()[0]}, model=odd)


def test_the_preview_draws_the_plan_and_hatches_a_masks_kept_area(init_image):
    mask = torch.zeros(1, H, W)
    mask[:, :128, :128] = 1
    values = widgets()
    result = QuadtreePreview().preview(to_image([init_image]), False, mask=mask, **values)
    assert "skipped" in result["ui"]["text"][0]
    picture = result["result"][0]
    assert picture.shape[0] == 1 and picture.shape[1] > H and picture.shape[2] == W  # the legend below
    plain = QuadtreePreview().preview(to_image([init_image]), False, **values)["result"][0]
    assert (picture[0, 200:380, 300:500] - plain[0, 200:380, 300:500]).abs().mean() > 0.02


def test_comfyui_imports_the_repository_as_a_node_pack_and_the_registry_finds_it():
    """ComfyUI imports custom_nodes/<folder>/__init__.py by its file location (relative imports
    work); the Comfy Registry reads pyproject's [project] and [tool.comfy]."""
    import importlib.util
    import sys
    from pathlib import Path

    import tomllib

    root = Path(__file__).parent.parent
    name = "custom_nodes_x_quadtree_tiled_diffusion"
    spec = importlib.util.spec_from_file_location(
        name, root / "__init__.py", submodule_search_locations=[str(root)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
        assert module.NODE_DISPLAY_NAME_MAPPINGS == NODE_DISPLAY_NAME_MAPPINGS
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert (
        project["project"]["name"] == "quadtree-tiled-diffusion" and project["project"]["dependencies"] == []
    )
    assert project["tool"]["comfy"]["PublisherId"] and project["tool"]["comfy"]["DisplayName"]
    assert "torch" not in (root / "install.py").read_text().split('"""')[-1], "install.py installs nothing"


class StandInClip:
    """ComfyUI's CLIP as the nodes use it: tokenize, then encode_from_tokens -> [1, 77, D]."""

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens):
        g = torch.Generator().manual_seed(sum(map(ord, tokens)))
        return torch.randn(1, 77, 16, generator=g)


def test_regions_append_their_prompt_to_each_windows_positive_rows(k_diffusion, init_image):
    samples, noise = latents(1, 6)
    regions = "0 0 0.5 1: a red barn\n0.5 0 1 1: a wheat field"
    model = fake.ModelPatcher(fake.BaseModel())
    seen = []
    apply_model = model.model.apply_model

    def recording(x, t, c_crossattn, transformer_options, **kwargs):
        seen.append((c_crossattn.clone(), list(transformer_options["cond_or_uncond"]), x.shape[0]))
        return apply_model(x, t, c_crossattn, transformer_options, **kwargs)

    model.model.apply_model = recording
    clip = StandInClip()
    patched, plan, _ = QuadtreeTiledDiffusion().patch(
        model, to_image([init_image]), {"samples": samples}, regions=regions, clip=clip, **widgets()
    )
    assert {leaf.prompt.added for leaf in plan.leaves} == {("a red barn",), ("a wheat field",)}
    fake.ksampler(k_diffusion, patched, samples, noise, 6, 0.5)
    positive, negative = fake.conditioning(1)
    told = {
        text: torch.cat([positive, clip.encode_from_tokens(text)], dim=1)
        for text in ("a red barn", "a wheat field")
    }
    found = set()
    for crossattn, chunks, rows in seen:
        per = rows // len(chunks)
        for j, kind in enumerate(chunks):
            for row in crossattn[j * per : (j + 1) * per]:
                if kind == 1:
                    assert torch.equal(row, negative[0].repeat(2, 1))  # repeated to the common length
                else:
                    found |= {text for text, rows_of in told.items() if torch.equal(row, rows_of[0])}
                    assert any(torch.equal(row, rows_of[0]) for rows_of in told.values())
    assert found == set(told)
    with pytest.raises(ValueError, match="regions need the CLIP input"):
        QuadtreeTiledDiffusion().patch(
            model, to_image([init_image]), {"samples": samples}, regions=regions, **widgets()
        )
    assert "regions: line 1" in QuadtreeTiledDiffusion.VALIDATE_INPUTS(
        128, 512, 32, 256, regions="0 0 2 1: x"
    )


def test_the_webui_and_comfyui_hosts_never_import_each_other():
    import ast
    from pathlib import Path

    root = Path(__file__).parent.parent
    hosts = root / "tiled_diffusion" / "hosts"

    def imported(path: Path) -> set[str]:
        """Absolute names of what a module imports; `.x` in hosts/ is hosts.x, `..x` core.x."""
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = {0: "", 1: "hosts.", 2: "core."}[node.level] + (node.module or "")
                names |= {base} | {f"{base}.{a.name}".strip(".") for a in node.names}
            elif isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
        return names

    comfy = sorted(hosts.glob("comfyui*.py"))
    webui = [p for p in hosts.glob("*.py") if not p.name.startswith("comfyui")] + [
        *(root / "scripts").glob("*.py")
    ]
    webui_modules = {f"hosts.{p.stem}" for p in hosts.glob("*.py")} - {f"hosts.{p.stem}" for p in comfy}
    webui_modules -= {"hosts.families", "hosts.__init__"}  # shared: no WebUI import in it
    for path in comfy:
        bad = {n for n in imported(path) if n.split(".")[0] in ("modules", "gradio")}
        bad |= {n for n in imported(path) if any(n == m or n.startswith(m + ".") for m in webui_modules)}
        assert not bad, (path.name, bad)
    for path in webui:
        assert not {n for n in imported(path) if "comfy" in n}, path.name
