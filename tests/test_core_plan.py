"""The quadtree plan: partitions, tile sizes, adaptivity, strengths and skip."""

from __future__ import annotations

import math
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import tiled_diffusion as td
from tiled_diffusion.plan import estimated_work, start_sigma


def photo(name: str, longest: int = 1024) -> Image.Image:
    skimage_data = pytest.importorskip("skimage.data")
    image = Image.fromarray(getattr(skimage_data, name)())
    scale = longest / max(image.size)
    size = (round(image.width * scale / 8) * 8, round(image.height * scale / 8) * 8)
    return image.resize(size, Image.Resampling.LANCZOS)


def latent_of(image: Image.Image) -> tuple[int, int]:
    return image.height // 8, image.width // 8


def noise_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def assert_partition(plan: td.Plan) -> None:
    height, width = plan.latent_size
    cover = np.zeros((height, width), dtype=int)
    for leaf in plan.leaves:
        assert all(isinstance(v, int) for v in (leaf.x, leaf.y, leaf.w, leaf.h))
        assert leaf.w > 0 and leaf.h > 0
        assert 0 <= leaf.x and leaf.x + leaf.w <= width and 0 <= leaf.y and leaf.y + leaf.h <= height
        cover[leaf.y : leaf.y + leaf.h, leaf.x : leaf.x + leaf.w] += 1
    assert (cover == 1).all(), "leaves must cover every latent pixel exactly once"


def nested(fine: td.Plan, coarse: td.Plan) -> bool:
    def inside(a, b):
        return b.x <= a.x and b.y <= a.y and a.x + a.w <= b.x + b.w and a.y + a.h <= b.y + b.h

    return all(any(inside(f, c) for c in coarse.leaves) for f in fine.leaves)


@pytest.mark.parametrize(
    "width, height",
    [(1000, 600), (1920, 1080), (768, 1344), (64, 64), (16, 2048), (2048, 16), (40, 24), (1, 1)],
)
def test_leaves_partition_the_latent_for_any_size(width, height):
    settings = td.Settings(detail_threshold=10)
    latent = (max(height // 8, 1), max(width // 8, 1))
    plan = td.build_plan(noise_image(width, height), settings, latent_size=latent)
    assert plan.latent_size == latent
    assert_partition(plan)


@pytest.mark.parametrize("width, height", [(1000, 600), (1920, 1080), (768, 1344), (16, 2048)])
@pytest.mark.parametrize("min_tile, max_tile", [(64, 128), (128, 512), (256, 1024)])
def test_leaf_sides_stay_between_min_and_max_tile(width, height, min_tile, max_tile):
    settings = td.Settings(detail_threshold=1, min_tile=min_tile, max_tile=max_tile)
    plan = td.build_plan(noise_image(width, height), settings, latent_size=(height // 8, width // 8))
    low, high = min_tile // 8, max_tile // 8
    for leaf in plan.leaves:
        for side, image_side in ((leaf.w, width // 8), (leaf.h, height // 8)):
            assert side <= high
            assert side >= min(low, image_side)


def test_large_flat_nodes_are_always_split_down_to_max_tile():
    flat = np.full((2048, 2048, 3), 120, dtype=np.uint8)
    plan = td.build_plan(flat, td.Settings(max_tile=512), latent_size=(256, 256))
    assert {(leaf.w, leaf.h) for leaf in plan.leaves} == {(64, 64)}
    assert len(plan.leaves) == 16


def test_elongated_strip_is_split_along_its_long_side():
    plan = td.build_plan(noise_image(16, 2048), td.Settings(max_tile=256, detail_threshold=200), (256, 2))
    assert all(leaf.w == 2 for leaf in plan.leaves)
    assert sorted(leaf.y for leaf in plan.leaves) == list(range(0, 256, 32))


def test_wide_node_is_split_into_squares_not_strips():
    image = noise_image(2048, 1024)
    plan = td.build_plan(image, td.Settings(detail_threshold=200, max_tile=1024), latent_size=(128, 256))
    assert {(leaf.w, leaf.h) for leaf in plan.leaves} == {(128, 128)}


def test_plan_is_deterministic():
    image = photo("astronaut")
    first = td.build_plan(image, td.Settings(), latent_size=latent_of(image))
    second = td.build_plan(image, td.Settings(), latent_size=latent_of(image))
    assert first.leaves == second.leaves and first.windows == second.windows


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_higher_threshold_never_makes_the_tree_finer(name):
    image = photo(name)
    plans = [
        td.build_plan(image, td.Settings(detail_threshold=t, min_tile=64), latent_size=latent_of(image))
        for t in (20, 50, 80, 95, 120, 200)
    ]
    for fine, coarse in zip(plans, plans[1:]):
        assert len(fine.leaves) >= len(coarse.leaves)
        assert nested(fine, coarse)


def test_detail_in_one_quadrant_subdivides_only_that_quadrant():
    image = np.full((1024, 1024, 3), 90, dtype=np.uint8)
    cells = (np.indices((512, 512)) // 32).sum(axis=0) % 2  # checkerboard of 32 px cells
    image[512:, :512] = np.where(cells[..., None] == 1, 140, 40)  # bottom-left is busy, same mean
    plan = td.build_plan(image, td.Settings(max_tile=1024, min_tile=64), latent_size=(128, 128))
    busy = [leaf for leaf in plan.leaves if leaf.y >= 64 and leaf.x < 64]
    calm = [leaf for leaf in plan.leaves if not (leaf.y >= 64 and leaf.x < 64)]
    assert len(busy) == 64 and all(leaf.w == 8 for leaf in busy)
    assert [(leaf.w, leaf.h) for leaf in calm] == [(64, 64)] * 3


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_defaults_make_an_adaptive_tree_on_real_photographs(name):
    image = photo(name)
    plan = td.build_plan(image, td.Settings(), latent_size=latent_of(image))
    assert_partition(plan)
    # Sizes by level: halving an odd side gives e.g. 42 and 43 px, which are one level.
    area_by_level = Counter()
    for leaf in plan.leaves:
        area_by_level[round(math.log2(leaf.w * leaf.h))] += leaf.w * leaf.h
    assert len(area_by_level) >= 3, area_by_level
    smallest = area_by_level[min(area_by_level)] / sum(area_by_level.values())
    assert smallest <= 0.6, area_by_level


def test_sixteen_bit_grey_and_rgba_images_are_converted():
    grey16 = Image.fromarray((np.arange(256 * 256).reshape(256, 256) % 65536).astype(np.uint16))
    rgba = Image.new("RGBA", (256, 256), (10, 200, 30, 128))
    floats = np.random.default_rng(0).random((256, 256, 3))
    for image in (grey16, rgba, floats, np.zeros((256, 256), dtype=np.uint8)):
        assert_partition(td.build_plan(image, td.Settings(), latent_size=(32, 32)))


def test_image_of_another_size_is_mapped_onto_the_latent_grid():
    plan = td.build_plan(noise_image(300, 200), td.Settings(min_tile=64), latent_size=(128, 192))
    assert_partition(plan)


@pytest.mark.parametrize(
    "image, latent, message",
    [
        (np.zeros((0, 10, 3), dtype=np.uint8), (8, 8), "empty"),
        (Image.new("RGB", (64, 64)), (0, 8), "latent_size"),
        (np.zeros((8, 8, 2), dtype=np.uint8), (8, 8), "image"),
        (np.full((8, 8, 3), np.nan), (8, 8), "NaN"),
    ],
)
def test_bad_image_or_latent_size_names_what_is_wrong(image, latent, message):
    with pytest.raises(ValueError, match=message):
        td.build_plan(image, td.Settings(), latent_size=latent)


def test_nan_sigmas_are_rejected():
    sigmas = torch.tensor([14.6, float("nan"), 1.0, 0.0])
    with pytest.raises(ValueError, match="sigmas"):
        td.build_plan(noise_image(64, 64), td.Settings(variable_denoise=True), (8, 8), sigmas=sigmas)


def karras(steps: int) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps)
    low, high = 0.0292 ** (1 / 7), 14.6146 ** (1 / 7)
    return torch.cat([(high + ramp * (low - high)) ** 7, torch.zeros(1)])


@pytest.mark.parametrize("largest, smallest", [(0.3, 0.7), (0.8, 0.2)])
def test_variable_denoise_interpolates_strength_by_depth(largest, smallest):
    image = photo("astronaut")
    settings = td.Settings(
        variable_denoise=True, denoise_largest=largest, denoise_smallest=smallest, min_tile=64
    )
    sigmas = karras(20)
    plan = td.build_plan(image, settings, latent_size=latent_of(image), sigmas=sigmas)
    by_side = {}
    for leaf in plan.leaves:
        by_side.setdefault(leaf.w * leaf.h, set()).add(round(leaf.strength, 9))
    assert all(len(values) == 1 for values in by_side.values()), "equal sizes get equal strengths"
    areas = sorted(by_side)
    strengths = [by_side[a].pop() for a in areas]
    assert strengths[0] == pytest.approx(smallest) and strengths[-1] == pytest.approx(largest)
    steps = np.diff(strengths) * np.sign(largest - smallest)
    assert (steps >= 0).all(), "strength is monotone in tile size"
    depths = [math.log2(a) / 2 for a in areas]
    expected = [smallest + (d - depths[0]) / (depths[-1] - depths[0]) * (largest - smallest) for d in depths]
    assert strengths == pytest.approx(expected), "evenly spread by log2 of the size"
    for leaf in plan.leaves:
        t_enc = int(min(leaf.strength, 0.999) * 20)
        assert leaf.start_sigma == pytest.approx(float(sigmas[20 - t_enc - 1]))
    assert plan.max_strength == pytest.approx(max(largest, smallest))


def test_start_sigma_follows_the_webui_img2img_rule():
    sigmas = karras(10)
    assert start_sigma(0.5, sigmas) == pytest.approx(float(sigmas[4]))
    assert start_sigma(0.999, sigmas) == pytest.approx(float(sigmas[0]))
    assert start_sigma(1.0, sigmas) == math.inf  # the job's own strength: from the first step
    assert start_sigma(0.05, sigmas) == pytest.approx(float(sigmas[9]))  # t_enc 0: one step
    assert start_sigma(0.0, sigmas) == 0.0


def test_leaves_below_skip_threshold_are_skipped_with_zero_strength():
    image = photo("astronaut")
    settings = td.Settings(skip_below=256, min_tile=64)
    plan = td.build_plan(image, settings, latent_size=latent_of(image))
    assert any(leaf.skipped for leaf in plan.leaves) and not all(leaf.skipped for leaf in plan.leaves)
    for leaf in plan.leaves:
        assert leaf.skipped == (min(leaf.w, leaf.h) * 8 < 256)
        assert (leaf.strength == 0.0) if leaf.skipped else (leaf.strength == 1.0)
    off = td.build_plan(image, td.Settings(min_tile=64), latent_size=latent_of(image))
    assert not any(leaf.skipped for leaf in off.leaves)


def test_variable_denoise_with_every_tile_skipped_has_no_active_strength():
    settings = td.Settings(variable_denoise=True, skip_below=2048)
    plan = td.build_plan(noise_image(256, 256), settings, latent_size=(32, 32), sigmas=karras(10))
    assert all(leaf.skipped and leaf.strength == 0 for leaf in plan.leaves)
    assert plan.max_strength == 0


def inside(a, b) -> bool:
    """Whether rectangle a (x, y, w, h attributes) lies inside rectangle b."""
    return b.x <= a.x and b.y <= a.y and a.x + a.w <= b.x + b.w and a.y + a.h <= b.y + b.h


def bounds(regions):
    x0, y0 = min(r.x for r in regions), min(r.y for r in regions)
    x1, y1 = max(r.x + r.w for r in regions), max(r.y + r.h for r in regions)
    return SimpleNamespace(x=x0, y=y0, w=x1 - x0, h=y1 - y0)


def union(plan: td.Plan, window: td.Window) -> tuple[int, int, int, int]:
    """The bounding box (x, y, w, h) of a window's leaves."""
    leaves = [plan.leaves[i] for i in window.leaves]
    x0, y0 = min(leaf.x for leaf in leaves), min(leaf.y for leaf in leaves)
    x1, y1 = max(leaf.x + leaf.w for leaf in leaves), max(leaf.y + leaf.h for leaf in leaves)
    return x0, y0, x1 - x0, y1 - y0


def test_window_bands_grow_by_the_overlap_and_stop_at_the_border():
    settings = td.Settings(overlap=64, min_tile=256, max_tile=512, detail_threshold=200, min_window=0)
    plan = td.build_plan(noise_image(1024, 1024), settings, latent_size=(128, 128))
    assert len(plan.windows) == 4
    for window in plan.windows:
        x, y, w, h = union(plan, window)
        (band,) = window.bands
        assert (band.x, band.y) == (max(x - 8, 0), max(y - 8, 0))
        assert (band.x + band.w, band.y + band.h) == (min(x + w + 8, 128), min(y + h + 8, 128))
        assert (window.x, window.y, window.w, window.h) == (band.x, band.y, band.w, band.h)


def test_overlap_is_capped_at_a_quarter_of_the_tile():
    settings = td.Settings(min_tile=64, max_tile=128, overlap=256, min_window=0)
    plan = td.build_plan(noise_image(1024, 1024), settings, latent_size=(128, 128))
    for window in plan.windows:
        for band in window.bands:
            group = bounds([leaf for leaf in (plan.leaves[i] for i in window.leaves) if inside(leaf, band)])
            reach = min(group.w, group.h) // 4
            assert 0 < reach < 256 // 8
            left, right = max(group.x - reach, 0), min(group.x + group.w + reach, 128)
            assert (band.x, band.w) == (left, right - left)


def test_every_leaf_is_in_one_window_of_its_own_strength_and_skip_state():
    image = photo("astronaut")
    settings = td.Settings(variable_denoise=True, skip_below=129, min_tile=64)
    plan = td.build_plan(image, settings, latent_size=latent_of(image), sigmas=karras(20))
    owners = Counter(i for window in plan.windows for i in window.leaves)
    assert sorted(owners) == list(range(len(plan.leaves))) and set(owners.values()) == {1}
    for window in plan.windows:
        states = {(plan.leaves[i].strength, plan.leaves[i].skipped) for i in window.leaves}
        assert len(states) == 1
        for leaf in (plan.leaves[i] for i in window.leaves):
            assert any(inside(leaf, band) for band in window.bands), "its result comes from its window"


def test_tiles_of_one_strength_share_windows_up_to_max_tile():
    image = photo("astronaut")
    plan = td.build_plan(image, td.Settings(min_tile=64), latent_size=latent_of(image))
    assert len({leaf.w for leaf in plan.leaves}) >= 3, "an adaptive tree"
    # Nothing tells the tiles apart: the windows are the max_tile squares, whatever the tree.
    assert sorted(union(plan, w) for w in plan.windows) == [(x, y, 64, 64) for x in (0, 64) for y in (0, 64)]


@pytest.mark.parametrize("min_window", [0, 256, 512, 2048])
def test_small_tiles_are_denoised_in_a_view_of_at_least_min_window(min_window):
    image = photo("astronaut")
    settings = td.Settings(variable_denoise=True, min_tile=64, min_window=min_window)
    plan = td.build_plan(image, settings, latent_size=latent_of(image), sigmas=karras(20))
    side = min(min_window // 8, 128)
    for window in plan.windows:
        box = bounds(window.bands)
        assert window.w == max(box.w, side) and window.h == max(box.h, side), "as large as needed, no more"
        assert all(inside(band, window) for band in window.bands)
        assert 0 <= window.x and window.x + window.w <= 128 and 0 <= window.y and window.y + window.h <= 128


@pytest.mark.parametrize("name", ["astronaut", "camera", "coffee"])
@pytest.mark.parametrize("side", [1024, 2048])
@pytest.mark.parametrize("variable", [False, True])
def test_skipping_tiles_never_adds_model_work(name, side, variable):
    image = photo(name, longest=side)
    work = []
    for skip_below in (0, 129, 257):
        settings = td.Settings(skip_below=skip_below, min_tile=64, variable_denoise=variable)
        plan = td.build_plan(image, settings, latent_of(image), sigmas=karras(20))
        calls = int(min(plan.max_strength, 0.999) * 20) + 1  # the job's calls at its own strength
        work.append(estimated_work(plan) * calls)
    assert work[0] >= work[1] >= work[2], work


def on_grid(start: int, size: int, align: int, limit: int) -> bool:
    """Both ends on multiples of align, or the far end at the image border."""
    end = start + size
    return start % align == 0 and (end % align == 0 or end == limit)


@pytest.mark.parametrize("align", [1, 2, 4])
@pytest.mark.parametrize(
    "width, height, overlap, min_window, min_tile",
    [
        (1024, 768, 64, 256, 64),
        (1000, 600, 24, 0, 72),  # latent 125 x 75: odd borders
        (840, 1352, 40, 360, 64),
        (512, 512, 8, 520, 64),
        (136, 2056, 56, 264, 64),
    ],
)
def test_leaves_bands_and_views_are_aligned_to_the_model_patch(
    align, width, height, overlap, min_window, min_tile
):
    settings = td.Settings(
        overlap=overlap,
        min_window=min_window,
        min_tile=min_tile,
        max_tile=max(512, 2 * min_tile),
        variable_denoise=True,
        skip_below=129,
        detail_threshold=50,
    )
    latent = (height // 8, width // 8)
    image = photo("astronaut").resize((width, height))
    plan = td.build_plan(image, settings, latent, karras(20), align=align)
    assert_partition(plan)
    rows, cols = latent
    for leaf in plan.leaves:
        assert on_grid(leaf.x, leaf.w, align, cols) and on_grid(leaf.y, leaf.h, align, rows), leaf
    for window in plan.windows:
        assert on_grid(window.x, window.w, align, cols) and on_grid(window.y, window.h, align, rows), window
        for band in window.bands:
            assert on_grid(band.x, band.w, align, cols) and on_grid(band.y, band.h, align, rows), band
            assert inside(band, window)
        side = min(min_window // 8, cols), min(min_window // 8, rows)
        assert window.w >= side[0] and window.h >= side[1]
        assert window.w < max(bounds(window.bands).w, side[0]) + 2 * align, "no larger than needed"


def test_aligned_plan_blends_to_a_partition_of_unity():
    from tiled_diffusion.blend import weight_sum

    settings = td.Settings(overlap=40, min_tile=64, min_window=200)
    plan = td.build_plan(photo("astronaut").resize((1000, 600)), settings, (75, 125), align=2)
    total = weight_sum(plan)
    assert total.shape == (75, 125) and (total > 0).all() and torch.isfinite(total).all()


def test_a_view_shared_by_several_windows_counts_once_in_the_estimated_work():
    image = photo("astronaut", longest=512).resize((256, 256))
    plan = td.build_plan(image, td.Settings(min_tile=64, max_tile=128), latent_size=(32, 32))
    assert len(plan.windows) == 4 and {(w.x, w.y, w.w, w.h) for w in plan.windows} == {(0, 0, 32, 32)}
    assert estimated_work(plan) == 32 * 32, "one whole-image view per call"
