"""Does the tree follow detail, and how fast is planning? Prints numbers measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_detail.py

Part 1 compares detail measures on scikit-image's photographs (1024 px jobs, min tile 128,
max tile 512): for each, the mean fine detail (high-pass energy of the full-resolution
luminance, an independent measure) of the smallest tiles over that of the largest. Above 1:
small tiles sit on detail. Part 2 times `build_plan` from 1024 to 8192 px.
Nothing is asserted; benchmarks/README.md lists measured values.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tiled_diffusion as td  # noqa: E402
from tiled_diffusion.quadtree import detail_grid  # noqa: E402

PHOTOS = (
    "astronaut camera coffee chelsea rocket retina hubble_deep_field moon coins page text horse clock "
    "immunohistochemistry"
).split()
TEXTURES = ("grass", "gravel", "brick")


def photo(name: str, longest: int = 1024) -> Image.Image:
    image = Image.fromarray(getattr(data, name)()).convert("RGB")
    scale = longest / max(image.size)
    size = (round(image.width * scale / 8) * 8, round(image.height * scale / 8) * 8)
    return image.resize(size, Image.Resampling.LANCZOS)


def fine_detail(image: Image.Image) -> np.ndarray:
    luma = np.asarray(image.convert("L"), dtype=np.float64)
    return (luma - ndimage.gaussian_filter(luma, 2.0)) ** 2


def quadtree(score, threshold: float, size: tuple[int, int], low: int = 16, high: int = 64) -> list[tuple]:
    """A plain quadtree over the latent grid: split while score(x, y, w, h) > threshold."""
    leaves, stack = [], [(0, 0, size[1], size[0])]
    while stack:
        x, y, w, h = stack.pop()
        hw, hh = w // 2, h // 2
        if w >= 2 * h:
            parts, can = [(x, y, hw, h), (x + hw, y, w - hw, h)], hw >= low
        elif h >= 2 * w:
            parts, can = [(x, y, w, hh), (x, y + hh, w, h - hh)], hh >= low
        else:
            quads = [
                (x, y, hw, hh),
                (x + hw, y, w - hw, hh),
                (x, y + hh, hw, h - hh),
                (x + hw, y + hh, w - hw, h - hh),
            ]
            parts, can = quads, min(hw, hh) >= low
        if max(w, h) > high or (can and score(x, y, w, h) > threshold):
            stack += parts
        else:
            leaves.append((x, y, w, h))
    return leaves


def colour_contrast_tree(image: Image.Image) -> list[tuple]:
    """Version 0.1: RMS colour deviation on the image averaged to the latent grid, split above
    90% of the whole image's (and above 2/255)."""
    grid = np.asarray(
        image.resize((image.width // 8, image.height // 8), Image.Resampling.BOX), dtype=np.float64
    )

    def deviation(x, y, w, h):
        cells = grid[y : y + h, x : x + w].reshape(-1, 3)
        return float(np.sqrt(((cells - cells.mean(0)) ** 2).sum(1).mean()))

    whole = deviation(0, 0, grid.shape[1], grid.shape[0])
    return quadtree(deviation, max(0.9 * whole, 2.0), grid.shape[:2])


def energy_tree(image: Image.Image) -> list[tuple]:
    """Mean high-pass energy (the test's own measure) as the split measure, relative, 70%."""
    grid = fine_detail(image)
    grid = grid.reshape(grid.shape[0] // 8, 8, grid.shape[1] // 8, 8).mean(axis=(1, 3))
    mean = lambda x, y, w, h: float(grid[y : y + h, x : x + w].mean())  # noqa: E731
    return quadtree(mean, 0.7 * grid.mean(), grid.shape)


def density_tree(image: Image.Image) -> list[tuple]:
    """Today's plan: share of detailed pixels, relative, with the edge-line floor (defaults)."""
    plan = td.build_plan(image, td.Settings(), latent_size=(image.height // 8, image.width // 8))
    return [(leaf.x, leaf.y, leaf.w, leaf.h) for leaf in plan.leaves]


def smallest_over_largest(image: Image.Image, leaves: list[tuple]) -> tuple[float | None, int]:
    energy = fine_detail(image)
    by_area = defaultdict(list)
    for x, y, w, h in leaves:
        by_area[w * h].append(energy[y * 8 : (y + h) * 8, x * 8 : (x + w) * 8].mean())
    small, large = min(by_area), max(by_area)
    sizes = len({round(np.log2(a)) for a in by_area})
    if large < 2 * small:
        return None, sizes
    return min(float(np.mean(by_area[small]) / max(np.mean(by_area[large]), 1e-9)), 10.0), sizes


def bench_measures():
    measures = {
        "v0.1 colour contrast": colour_contrast_tree,
        "high-pass energy": energy_tree,
        "detail share (now)": density_tree,
    }
    print(f"{'photo':<22}" + "".join(f"{m:>24}" for m in measures))
    ratios = defaultdict(list)
    for name in PHOTOS + list(TEXTURES):
        image = photo(name)
        cells = []
        for measure, tree in measures.items():
            ratio, sizes = smallest_over_largest(image, tree(image))
            if name in PHOTOS and ratio is not None:
                ratios[measure].append(ratio)
            cells.append(f"{'one size' if ratio is None else f'{ratio:.2f}'} ({sizes} sizes)")
        print(f"{name:<22}" + "".join(f"{c:>24}" for c in cells))
    print(
        f"{'photos: mean (capped 10)':<22}"
        + "".join(f"{statistics.mean(ratios[m]):>24.2f}" for m in measures)
    )
    print(f"{'photos: lowest':<22}" + "".join(f"{min(ratios[m]):>24.2f}" for m in measures))
    print(f"{'photos: below 1':<22}" + "".join(f"{sum(r < 1 for r in ratios[m]):>24d}" for m in measures))
    print(f"{'photos: adaptive':<22}" + "".join(f"{len(ratios[m]):>21d}/{len(PHOTOS)}" for m in measures))


def bench_planning():
    base = Image.open(ROOT / "tiled_diffusion" / "data" / "astronaut.jpg").convert("RGB")
    print(f"\n{'job':<10}{'build_plan s':>14}{'detail map s':>14}{'us per Mpx':>12}")
    for size in (1024, 2048, 4096, 8192):
        image = base.resize((size, size), Image.Resampling.LANCZOS)
        times, maps = [], []
        for _ in range(3):
            start = time.perf_counter()
            detail_grid(image, (size // 8, size // 8))
            maps.append(time.perf_counter() - start)
            start = time.perf_counter()
            td.build_plan(image, td.Settings(variable_denoise=True, skip_below=129), (size // 8, size // 8))
            times.append(time.perf_counter() - start)
        best = min(times)
        print(f"{size:<10}{best:>14.3f}{min(maps):>14.3f}{best / size**2 * 1e12:>12.0f}")


if __name__ == "__main__":
    bench_measures()
    bench_planning()
