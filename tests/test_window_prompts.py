"""What each window is told, in the core: regions, phrases, placement, per-window conditioning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiled_diffusion as td
from tiled_diffusion.attention import CrossAttentionMaps, native_size, phrase_maps
from tiled_diffusion.prompts import (
    WindowPrompt,
    parse_regions,
    placed_masks,
    plain_words,
    prompt_phrases,
    split_phrases,
    token_positions,
)

FLAT = np.full((384, 512, 3), 128, dtype=np.uint8)
SIZE = (48, 64)  # latent of a 512 x 384 px job


def test_regions_parse_one_per_line():
    regions = parse_regions("0 0 0.5 1: a red barn, (wooden:1.2)\n\n0.5,0,1,1 : a field: golden\n")
    assert [(r.x0, r.y0, r.x1, r.y1, r.prompt) for r in regions] == [
        (0, 0, 0.5, 1, "a red barn, (wooden:1.2)"),
        (0.5, 0, 1, 1, "a field: golden"),
    ]
    assert parse_regions("") == parse_regions(" \n ") == []


@pytest.mark.parametrize(
    "text, line",
    [
        ("0 0 0.5 1 a barn", 1),  # no colon
        ("0 0 0.5 1: a barn\n0 0 1: a field", 2),  # three numbers
        ("0 0 0.5 1: a barn\n\n0.5 0 0.4 1: a field", 3),  # x1 before x0
        ("0 0 1.5 1: a barn", 1),  # outside the image
        ("0 0 0.5 1:   ", 1),  # no prompt
        ("a b c d: a barn", 1),  # not numbers
        ("0 0 1 1: a barn AND a field", 1),  # AND inside a region
    ],
)
def test_bad_region_lines_are_named(text, line):
    with pytest.raises(td.SettingsError, match=rf"regions: line {line} "):
        parse_regions(text)
    with pytest.raises(td.SettingsError, match=rf"regions: line {line} "):
        td.Settings(regions=text)  # the API and the UI check it the same way


def test_window_prompt_adds_regions_to_every_and_part_and_leaves_out_phrases():
    prompt = "a farm, (red barn:1.2), highly detailed :1.5 AND a sky, red barn BREAK clouds"
    told = WindowPrompt(added=("a cow",), left_out=("red barn", "clouds"))
    assert told.apply(prompt) == "a farm, (red barn:1.2), highly detailed, a cow :1.5 AND a sky BREAK , a cow"
    assert WindowPrompt(added=("a cow",)).apply("a farm") == "a farm, a cow"
    assert WindowPrompt().apply(prompt) == prompt  # the job's prompt, untouched
    assert not WindowPrompt() and told


def test_phrases_split_at_top_level_commas():
    assert split_phrases(" a farm, (red, barn:1.2) ,, [a:b:0.5], c ") == [
        "a farm",
        "(red, barn:1.2)",
        "[a:b:0.5]",
        "c",
    ]
    assert prompt_phrases("a  farm, sky AND a farm BREAK sun :0.5") == ["a farm", "sky", "sun"]
    assert plain_words("(red hair:1.2)") == "red hair" and plain_words("[faded]") == "faded"


def test_phrase_tokens_are_found_in_order_and_missing_ones_left_unplaced():
    vocab = {}

    def tokenize(text):
        return [vocab.setdefault(word, len(vocab) + 1) for word in text.replace(",", " , ").split()]

    prompt = "a red barn, sky, (a red barn:1.1)"
    tokens = [0] + tokenize("a red barn , sky , a red barn") + [99] * 3
    found = token_positions(["a red barn", "sky", "(a red barn:1.1)", "<embedding>"], tokens, tokenize)
    assert found == {"a red barn": [1, 2, 3], "sky": [5], "(a red barn:1.1)": [7, 8, 9]}
    assert prompt  # the phrases come from this prompt


def test_a_tile_gets_the_regions_that_cover_its_centre_and_windows_never_mix_prompts():
    settings = td.Settings(
        max_tile=128, min_tile=64, min_window=256, regions="0 0 0.5 1: left\n0.25 0 1 0.5: top"
    )
    plan = td.build_plan(FLAT, settings, SIZE)
    for leaf in plan.leaves:
        cx, cy = (leaf.x + leaf.w / 2) / SIZE[1], (leaf.y + leaf.h / 2) / SIZE[0]
        want = tuple(name for name, hit in (("left", cx < 0.5), ("top", cx >= 0.25 and cy < 0.5)) if hit)
        assert leaf.prompt.added == want
    for window in plan.windows:
        assert len({plan.leaves[i].prompt for i in window.leaves}) == 1


def test_skipped_tiles_are_told_nothing():
    settings = td.Settings(max_tile=128, min_tile=64, skip_below=1000, regions="0 0 1 1: everything")
    assert not any(leaf.prompt for leaf in td.build_plan(FLAT, settings, SIZE).leaves)


class Recorder:
    """A model recording the text rows each window batch gets."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, text):
        self.calls.append((x.shape, text.clone()))
        return torch.zeros_like(x)


def test_each_window_batch_gets_its_windows_conditioning_and_lengths_are_batched_apart():
    settings = td.Settings(max_tile=128, min_tile=64, min_window=0, overlap=0, regions="0 0 0.5 1: left")
    plan = td.build_plan(FLAT, settings, SIZE)
    rows = 2
    job_text = torch.zeros(rows, 77, 8)

    def window_cond(prompt, cond, rows):
        # "left" windows get 154 tokens of ones: another length than the job's.
        assert prompt.added == ("left",)
        return {"text": torch.ones(rows, 154, 8)}

    model = Recorder()
    denoiser = td.TiledDenoiser(model, plan, window_cond=window_cond)
    denoiser(torch.randn(rows, 4, *SIZE), torch.full((rows,), 1.0), text=job_text)
    told = sum(1 for w in plan.windows if plan.leaves[w.leaves[0]].prompt)
    lengths = [text.shape[1] for _, text in model.calls]
    assert told and sorted(set(lengths)) == [77, 154]
    assert sum(shape[0] // rows for (shape, text) in model.calls if text.shape[1] == 154) == told
    assert all((text == 1).all() if text.shape[1] == 154 else (text == 0).all() for _, text in model.calls)


def test_windows_with_the_jobs_prompt_never_ask_the_host():
    plan = td.build_plan(FLAT, td.Settings(max_tile=128, min_tile=64), SIZE)
    x, sigma, text = torch.randn(2, 4, *SIZE), torch.full((2,), 1.0), torch.randn(2, 77, 8)
    asked = []
    told = td.TiledDenoiser(Recorder(), plan, window_cond=lambda *a: asked.append(a))
    plain = td.TiledDenoiser(Recorder(), plan)
    assert torch.equal(told(x, sigma, text=text), plain(x, sigma, text=text)) and not asked
    with_region = td.build_plan(FLAT, td.Settings(max_tile=128, min_tile=64, regions="0 0 1 1: all"), SIZE)
    with pytest.raises(ValueError, match="no window_cond"):
        td.TiledDenoiser(Recorder(), with_region)(x, sigma, text=text)


# Placement by cross-attention: a stand-in UNet whose attention is known.

from .fake_prompts import MARK  # channel 0 of the tokens of the placed phrase  # noqa: E402


class Keys(torch.nn.Module):
    """to_k: a token's key is (1, 0) for the marked phrase, (0, 0) for every other token."""

    def forward(self, context):
        marked = (context[..., :1] > MARK / 2).float()
        return torch.cat([marked, torch.zeros_like(marked)], dim=-1)


class Queries(torch.nn.Module):
    """to_q: 10 in the top-left quarter of the picture (channel 1 of x says where), else 0."""

    def forward(self, x):
        return torch.stack([10 * x[..., 1], torch.zeros_like(x[..., 1])], dim=-1)


class CornerUNet(torch.nn.Module):
    """Two cross-attention layers (full and half resolution): the marked phrase attends to
    the top-left quarter, everything else evenly."""

    def __init__(self):
        super().__init__()
        self.down = torch.nn.ModuleDict({"attn2": torch.nn.Module()})
        self.mid = torch.nn.ModuleDict({"attn1": torch.nn.Module(), "attn2": torch.nn.Module()})
        for block in (self.down, self.mid):
            block["attn2"].to_q, block["attn2"].to_k, block["attn2"].heads = Queries(), Keys(), 1
            block["attn2"].forward = lambda x, context=None: x
        self.mid["attn1"].to_q = Queries()  # self-attention: not recorded

    def forward(self, x, context):
        b, _, h, w = x.shape
        corner = torch.zeros(b, 1, h, w)
        corner[:, :, : h // 2, : w // 2] = 1
        tokens = torch.cat([x[:, :1], corner], 1).flatten(2).transpose(1, 2)
        self.down["attn2"](tokens, context=context)
        small = torch.nn.functional.avg_pool2d(torch.cat([x[:, :1], corner], 1), 2).flatten(2).transpose(1, 2)
        self.mid["attn2"](small, context=context)
        return x


def test_a_phrase_attending_to_one_corner_goes_only_to_windows_over_it():
    # "a red barn" (tokens 1-3) is marked; "highly detailed" (5-6) attends evenly.
    context = torch.randn(1, 77, 8) * 0.1
    context[0, 1:4, 0] = MARK
    unet = CornerUNet()
    with CrossAttentionMaps(unet, (16, 16)) as recorder:
        unet(torch.randn(1, 4, 16, 16), context)
    assert recorder.calls == 2
    assert torch.allclose(recorder.maps.sum(1), torch.full((1, 16, 16), 2.0), atol=1e-5)  # softmax rows
    big = torch.nn.functional.interpolate(recorder.maps, size=SIZE, mode="bilinear")
    maps = phrase_maps(big, {"a red barn": [(0, 1), (0, 2), (0, 3)], "highly detailed": [(0, 5), (0, 6)]})
    placed = placed_masks(maps)
    assert set(placed) == {"a red barn"}  # the style words stay everywhere
    corner = torch.zeros(SIZE, dtype=torch.bool)
    corner[: SIZE[0] // 2, : SIZE[1] // 2] = True
    barn = placed["a red barn"]
    assert (barn & ~corner).sum() <= 0.1 * corner.sum() and barn[corner].float().mean() > 0.9
    settings = td.Settings(max_tile=128, min_tile=64)
    plan = td.build_plan(FLAT, settings, SIZE, placed=placed)
    for leaf in plan.leaves:
        inside = corner[leaf.y : leaf.y + leaf.h, leaf.x : leaf.x + leaf.w].float().mean()
        assert leaf.prompt.left_out == (() if inside > 0.1 else ("a red barn",)), (leaf, inside)
        assert leaf.prompt.added == ()
    assert {leaf.prompt.left_out for leaf in plan.leaves} == {(), ("a red barn",)}
    # No phrase placed: the plan of "Whole prompt", window for window.
    assert (
        td.build_plan(FLAT, settings, SIZE, placed={}).windows == td.build_plan(FLAT, settings, SIZE).windows
    )


def test_cross_attention_maps_read_a_diffusers_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ).eval()  # fmt: skip
    with CrossAttentionMaps(unet, (16, 24)) as recorder, torch.no_grad():
        unet(torch.randn(2, 4, 16, 24), 500, encoder_hidden_states=torch.randn(2, 7, 32))
    assert recorder.calls == len(recorder.layers) == 4 and recorder.maps.shape == (2, 7, 16, 24)
    assert torch.allclose(recorder.maps.sum(1), torch.full((2, 16, 24), 4.0), atol=1e-4)


def test_native_size_keeps_the_aspect_ratio_on_the_unets_grid():
    assert native_size((256, 256), 64) == (64, 64)
    assert native_size((128, 256), 64) == (48, 88)
    assert native_size((12, 400), 128) == (24, 736)
