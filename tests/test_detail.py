"""The tree follows fine detail: small tiles on text, faces and texture, large ones on flat areas."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
from PIL import Image, ImageDraw

import tiled_diffusion as td
from tiled_diffusion.quadtree import detail_density

from .test_core_plan import latent_of, photo

PHOTOS = [
    "astronaut",
    "camera",
    "coffee",
    "chelsea",
    "rocket",
    "retina",
    "hubble_deep_field",
    "moon",
    "coins",
    "page",
    "text",
    "horse",
    "clock",
    "immunohistochemistry",
]


def fine_detail(image: Image.Image) -> np.ndarray:
    """An independent measure: high-pass energy of the full-resolution luminance (per pixel)."""
    ndimage = pytest.importorskip("scipy.ndimage")
    luma = np.asarray(image.convert("L"), dtype=np.float64)
    return (luma - ndimage.gaussian_filter(luma, 2.0)) ** 2


def pixels(leaf) -> tuple[slice, slice]:
    """The leaf's rows and columns in image pixels."""
    return slice(leaf.y * 8, (leaf.y + leaf.h) * 8), slice(leaf.x * 8, (leaf.x + leaf.w) * 8)


def detail_by_size(image: Image.Image, plan: td.Plan) -> dict[int, float]:
    """Mean fine detail of the tiles of each size (area in latent pixels)."""
    energy = fine_detail(image)
    by_area = defaultdict(list)
    for leaf in plan.leaves:
        by_area[leaf.w * leaf.h].append(energy[pixels(leaf)].mean())
    return {area: float(np.mean(values)) for area, values in by_area.items()}


def smallest_over_largest(image: Image.Image, settings: td.Settings) -> float | None:
    """Fine detail of the smallest tiles over that of the largest, None with one size only."""
    by_size = detail_by_size(image, td.build_plan(image, settings, latent_size=latent_of(image)))
    small, large = min(by_size), max(by_size)
    if large < 2 * small:  # one level (odd sides halve into e.g. 42 and 43)
        return None
    return by_size[small] / max(by_size[large], 1e-9)


def test_smallest_tiles_hold_more_fine_detail_than_the_largest_on_photographs():
    ratios = {name: smallest_over_largest(photo(name), td.Settings()) for name in PHOTOS}
    adaptive = {name: r for name, r in ratios.items() if r is not None}
    print({name: round(r, 2) for name, r in adaptive.items()})
    assert len(adaptive) >= 0.8 * len(PHOTOS), ratios
    assert min(adaptive.values()) >= 1.0, adaptive
    # Capped: a largest tile of pure black (the retina's corners) has no detail at all.
    assert np.mean([min(r, 10.0) for r in adaptive.values()]) >= 1.5, adaptive


def sky(width: int = 1024, height: int = 1024) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
    return np.stack([90 + 80 * ys, 140 + 60 * ys, 230 - 30 * xs], axis=-1).astype(np.uint8)


def covering(plan: td.Plan, box: tuple[int, int, int, int]) -> set[int]:
    """Sides in px of the tiles that overlap a box (x, y, w, h) in px."""
    x, y, w, h = box
    inside = np.zeros((plan.latent_size[0] * 8, plan.latent_size[1] * 8), dtype=bool)
    inside[y : y + h, x : x + w] = True
    return {leaf.w * 8 for leaf in plan.leaves if inside[pixels(leaf)].any()}


def test_text_and_a_face_on_a_sky_get_the_smallest_tiles_and_the_sky_the_largest():
    skimage_data = pytest.importorskip("skimage.data")
    picture = Image.fromarray(sky())
    face, face_box = Image.fromarray(skimage_data.astronaut()[30:230, 150:330]), (96, 96, 256, 284)
    picture.paste(face.resize(face_box[2:]), face_box[:2])
    text_box = (520, 700, 448, 172)
    picture.paste(Image.fromarray(skimage_data.text()).convert("RGB").resize(text_box[2:]), text_box[:2])
    draw = ImageDraw.Draw(picture)
    print_box = (600, 120, 300, 120)
    for row in range(6):
        draw.text((print_box[0], print_box[1] + 20 * row), "Quadtree tiles follow detail " * 2, fill="black")
    plan = td.build_plan(picture, td.Settings(), latent_size=(128, 128))
    sides = {leaf.w * 8 for leaf in plan.leaves}
    smallest, largest = min(sides), max(sides)
    assert (smallest, largest) == (128, 512)
    for box in (face_box, text_box, print_box):
        assert smallest in covering(plan, box)
    assert covering(plan, (0, 560, 400, 464)) == {largest}, "the sky away from the pasted things"


def test_smooth_gradient_gets_only_the_largest_tiles():
    plan = td.build_plan(sky(2048, 2048), td.Settings(min_tile=64), latent_size=(256, 256))
    assert {(leaf.w, leaf.h) for leaf in plan.leaves} == {(64, 64)}


@pytest.mark.parametrize("name", ["grass", "gravel"])
@pytest.mark.parametrize("threshold", [70, 130])
def test_a_uniform_texture_gets_one_tile_size(name, threshold):
    image = photo(name)
    plan = td.build_plan(image, td.Settings(detail_threshold=threshold), latent_of(image))
    assert len({(leaf.w, leaf.h) for leaf in plan.leaves}) == 1


def test_a_step_between_two_flat_areas_is_not_detail():
    image = np.full((1024, 1024, 3), 20, dtype=np.uint8)
    image[:, 300:] = 235
    ys, xs = np.mgrid[0:1024, 0:1024]
    image[(ys - 700) ** 2 + (xs - 200) ** 2 < 150**2] = (200, 60, 40)  # a flat disc across the step
    plan = td.build_plan(image, td.Settings(min_tile=64), latent_size=(128, 128))
    assert {leaf.w for leaf in plan.leaves} == {64}
    assert detail_density(image).mean() < 0.01


def test_detail_inside_a_flat_frame_is_found_whatever_the_frame():
    """A bright disc with fine vessels on black (a fundus photo): the black must not hide them."""
    image = photo("retina")
    plan = td.build_plan(image, td.Settings(), latent_size=latent_of(image))
    by_size = detail_by_size(image, plan)
    assert len(by_size) >= 2 and by_size[min(by_size)] > by_size[max(by_size)]
    disc = np.asarray(image.convert("L")) > 30
    smallest = [leaf for leaf in plan.leaves if leaf.w * leaf.h == min(by_size)]
    inside = sum(disc[pixels(leaf)].sum() for leaf in smallest)
    assert inside / sum(leaf.w * leaf.h * 64 for leaf in smallest) > 0.6, "mostly the disc, not the black"


@pytest.mark.parametrize("name", ["astronaut", "coffee"])
def test_the_same_photo_at_lower_contrast_gets_the_same_tree(name):
    image = photo(name)
    pixels = np.asarray(image, dtype=np.float64)
    faded = Image.fromarray(np.uint8(np.round((pixels - 128) * 0.4 + 100)))
    for settings in (td.Settings(), td.Settings(min_tile=64, detail_threshold=100)):
        crisp_plan = td.build_plan(image, settings, latent_size=latent_of(image))
        faded_plan = td.build_plan(faded, settings, latent_size=latent_of(image))
        crisp = {(leaf.x, leaf.y, leaf.w, leaf.h) for leaf in crisp_plan.leaves}
        same = crisp & {(leaf.x, leaf.y, leaf.w, leaf.h) for leaf in faded_plan.leaves}
        assert sum(w * h for _, _, w, h in same) >= 0.9 * sum(w * h for _, _, w, h in crisp)


def test_detail_density_is_a_share_per_pixel():
    density = detail_density(photo("astronaut"))
    assert density.shape == (1024, 1024) and density.dtype == np.float32
    assert 0.0 <= density.min() and density.max() <= 1.0
    assert detail_density(np.full((64, 64, 3), 128, dtype=np.uint8)).max() == 0.0
