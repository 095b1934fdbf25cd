"""Shared and overlapping views: what one evaluation of a view saves. Prints ratios from one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_views.py [--quick]

1. Shared views (what the denoiser does): windows whose views are the same crop with the
   same prompt are evaluated once per call. Model rows and CPU time of one denoiser call
   with the views shared / with every window evaluated on its own (each window given a
   prompt of its own, which is what the denoiser did before).
2. Heavily overlapping views (not done): two square views of side s overlapping by a share
   f of their area, evaluated as they are (one call of 2 views, as `Tile batch` >= 2 does,
   or two calls of 1), against one call on the single view that covers both. The merged
   view gives another result (the model sees another crop), so it could only be an
   approximation; this measures whether it would be worth one.

3. How much merging could save in real plans: over a 20-step variable-denoise img2img of
   the photo, the latent area of the views evaluated per call (identical views shared, as
   now), against the same with every view that overlaps an already evaluated one by at least
   75% of its area (same prompt, active at that call) merged into it, the merged view being
   their bounding box when that is smaller than the two apart.

Nothing is asserted; benchmarks/README.md lists measured values.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import _import_k_diffusion  # noqa: E402  (also sets torch threads to 1)

import tiled_diffusion as td  # noqa: E402
from tiled_diffusion.prompts import WindowPrompt  # noqa: E402

K = _import_k_diffusion()
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_core import TinySD, photo  # noqa: E402


class EveryLevelAttention(TinySD):
    """The tiny UNet with attention at every level, the full-resolution one included (as in
    SD 1.5, whose cost grows faster than the view's area)."""

    def __init__(self):
        torch.nn.Module.__init__(self)
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        self.unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64),
            layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
        ).eval()  # fmt: skip
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())


def cpu_seconds(repeats: int, fn, *args, **kwargs) -> float:
    """Median CPU seconds of `repeats` calls after one warm-up (CPU time: the machine is shared)."""
    fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn(*args, **kwargs)
        times.append(time.process_time() - start)
    return statistics.median(times)


class Counted:
    """The model without gradients, counting the rows it is given into rows[index]."""

    def __init__(self, model, rows: list[int], index: int):
        self.model, self.rows, self.index = model, rows, index

    def __call__(self, x, sigma, **cond):
        self.rows[self.index] += x.shape[0]
        with torch.no_grad():
            return self.model(x, sigma, **cond)


def each_window_told_apart(plan: td.Plan) -> td.Plan:
    leaves = list(plan.leaves)
    for i, window in enumerate(plan.windows):
        for k in window.leaves:
            leaves[k] = dataclasses.replace(leaves[k], prompt=WindowPrompt(added=(f"window {i}",)))
    return dataclasses.replace(plan, leaves=leaves)


def bench_shared(models: dict, repeats: int) -> None:
    print("1. shared views: one denoiser call, cond + uncond rows; shared / each window on its own")
    jobs = {
        "256 px, Min tile 64, Max tile 128": (256, {"min_tile": 64, "max_tile": 128}),
        "512 px, Min tile 64, Max tile 128, Min window 512": (
            512,
            {"min_tile": 64, "max_tile": 128, "min_window": 512},
        ),
    }
    for job, (size, values) in jobs.items():
        if size > 256:  # the every-level-attention model takes half a minute per call here
            models = {name: model for name, model in models.items() if name == "tiny UNet"}
        plan = td.build_plan(photo(size), td.Settings(**values), latent_size=(size // 8, size // 8))
        views = len({(w.x, w.y, w.w, w.h) for w in plan.windows})
        x, sigma = torch.randn(2, 4, size // 8, size // 8), torch.tensor([3.0, 3.0])
        text = torch.randn(2, 77, 32)
        for name, model in models.items():
            rows = [0, 0]
            shared = td.TiledDenoiser(Counted(model, rows, 0), plan)
            apart = td.TiledDenoiser(
                Counted(model, rows, 1),
                each_window_told_apart(plan),
                window_cond=lambda prompt, cond, rows: dict(cond),
            )
            t_shared = cpu_seconds(repeats, shared, x, sigma, c_crossattn=text)
            t_apart = cpu_seconds(repeats, apart, x, sigma, c_crossattn=text)
            print(
                f"   {job} ({len(plan.windows)} windows, {views} distinct views), {name}: "
                f"model rows {rows[0] / rows[1]:.2f}, time {t_shared / t_apart:.2f} "
                f"({t_shared * 1000:.0f} / {t_apart * 1000:.0f} ms)"
            )


def bench_overlapping(models: dict, sides: list[int], repeats: int) -> None:
    print("2. two views of side s overlapping by f: one merged view / the two views")
    sigma1, sigma2 = torch.tensor([3.0, 3.0]), torch.tensor([3.0] * 4)
    text1, text2 = torch.randn(2, 77, 32), torch.randn(4, 77, 32)
    for name, model in models.items():
        for side in sides:
            for f in (0.5, 0.75, 0.875):
                shift = round(side * (1 - f))
                a = torch.randn(2, 4, side, side)
                merged_view = torch.randn(2, 4, side, side + shift)

                run = Counted(model, [0], 0)
                t_batched = cpu_seconds(repeats, run, torch.cat([a, a]), sigma2, c_crossattn=text2)
                t_apart = 2 * cpu_seconds(repeats, run, a, sigma1, c_crossattn=text1)
                t_merged = cpu_seconds(repeats, run, merged_view, sigma1, c_crossattn=text1)
                print(
                    f"   {name}, s = {side * 8} px, f = {f}: area {(side + shift) / (2 * side):.2f}, "
                    f"time / one call of 2 views {t_merged / t_batched:.2f}, "
                    f"/ two calls {t_merged / t_apart:.2f}"
                )


def _area(r) -> int:
    return r[2] * r[3]


def _union(a, b) -> tuple:
    x0, y0 = min(a[0], b[0]), min(a[1], b[1])
    x1, y1 = max(a[0] + a[2], b[0] + b[2]), max(a[1] + a[3], b[1] + b[3])
    return x0, y0, x1 - x0, y1 - y0


def _overlap(a, b) -> int:
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    return max(w, 0) * max(h, 0)


def bench_plans(sizes: list[int]) -> None:
    print("3. evaluated view area over a 20-step img2img: heavy overlaps merged / shared views only")
    sigmas = K.sampling.get_sigmas_karras(20, 0.0292, 14.6146)
    for size in sizes:
        for values in (
            {"min_tile": 64, "variable_denoise": True},
            {"min_tile": 64, "variable_denoise": True, "min_window": 512},
            {"min_tile": 64, "skip_below": 129, "min_window": 512},
        ):
            plan = td.build_plan(photo(size), td.Settings(**values), (size // 8, size // 8), sigmas=sigmas)
            start = 20 - int(min(plan.max_strength, 0.999) * 20) - 1
            exact = merged = 0
            for sigma in sigmas[start:-1].tolist():
                views = {}
                for w in plan.windows:
                    leaf = plan.leaves[w.leaves[0]]
                    if leaf.is_active(sigma):
                        views[(w.x, w.y, w.w, w.h, leaf.prompt)] = None
                boxes = sorted((k[:4] for k in views), key=_area, reverse=True)
                exact += sum(_area(b) for b in boxes)
                clusters: list[tuple] = []
                for box in boxes:
                    for i, c in enumerate(clusters):
                        joined = _union(c, box)
                        if _overlap(c, box) >= 0.75 * _area(box) and _area(joined) < _area(c) + _area(box):
                            clusters[i] = joined
                            break
                    else:
                        clusters.append(box)
                merged += sum(_area(c) for c in clusters)
            label = ", ".join(f"{k} {v}" for k, v in values.items())
            print(f"   {size} px, {label}: {merged / exact:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and sizes")
    quick = parser.parse_args().quick
    models = {
        "tiny UNet": K.external.CompVisDenoiser(TinySD()),
        "attention at every level": K.external.CompVisDenoiser(EveryLevelAttention()),
    }
    repeats = 3 if quick else 5
    bench_shared(models, repeats)
    bench_overlapping(models, [32] if quick else [32, 64], repeats)
    bench_plans([1024] if quick else [1024, 2048])


if __name__ == "__main__":
    main()
