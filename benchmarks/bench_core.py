"""Core benchmarks: denoiser overhead, model work, peak memory. Prints ratios measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_core.py [--quick]

Nothing is asserted; benchmarks/README.md says what each number means and lists measured values.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from itertools import groupby
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import _import_k_diffusion  # noqa: E402  (also sets torch threads to 1)

import tiled_diffusion as td  # noqa: E402
from tiled_diffusion.plan import uniform_grid  # noqa: E402

K = _import_k_diffusion()


def photo(size: int) -> Image.Image:
    """The bundled photo (scikit-image's astronaut if it is missing) resized to size x size px."""
    path = ROOT / "tiled_diffusion" / "data" / "astronaut.jpg"
    if path.exists():
        image = Image.open(path).convert("RGB")
    else:
        from skimage.data import astronaut

        image = Image.fromarray(astronaut())
    return image.resize((size, size), Image.Resampling.LANCZOS)


class TinySD(torch.nn.Module):
    """A small SD-architecture eps UNet with random weights, shaped for k-diffusion's CompVisDenoiser."""

    def __init__(self):
        super().__init__()
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        down, up = (
            ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        )
        self.unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64),
            layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
            down_block_types=down, up_block_types=up,
        ).eval()  # fmt: skip
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float())

    def apply_model(self, x, t, c_crossattn):
        return self.unet(x, t, encoder_hidden_states=c_crossattn).sample


def model_batches(plan, x, sigma, text):
    """The exact (crops, sigma, text) batches TiledDenoiser makes when every window is active."""
    by_shape = sorted(plan.windows, key=lambda w: (w.h, w.w))
    size, batches = plan.settings.tile_batch, []
    for _, group in groupby(by_shape, key=lambda w: (w.h, w.w)):
        group = list(group)
        for chunk in (group[i : i + size] for i in range(0, len(group), size)):
            crops = torch.cat([x[:, :, w.y : w.y + w.h, w.x : w.x + w.w] for w in chunk])
            batches.append((crops, torch.cat([sigma] * len(chunk)), torch.cat([text] * len(chunk))))
    return batches


def call_directly(model, batches) -> None:
    for crops, sigma, text in batches:
        model(crops, sigma, c_crossattn=text)


def seconds(fn, *args, **kwargs) -> tuple[float, float]:
    """(CPU seconds of this process, wall seconds) of one call: CPU time is what other jobs on
    a shared machine disturb least, so the ratio uses it."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn(*args, **kwargs)
    return time.process_time() - cpu, time.perf_counter() - wall


def bench_overhead(quick: bool):
    """Time of one TiledDenoiser call / time of the same model calls made directly."""
    size = 1024 if quick else 2048
    latent = (size // 8, size // 8)
    model = K.external.CompVisDenoiser(TinySD())
    inside = [0.0]  # CPU seconds spent in the model during TiledDenoiser calls

    def timed_model(*args, **kwargs):
        start = time.process_time()
        out = model(*args, **kwargs)
        inside[0] += time.process_time() - start
        return out

    image = photo(size)
    torch.manual_seed(1)
    x = torch.randn(1, 4, *latent) * 3.0
    sigma = torch.tensor([3.0])
    text = torch.randn(1, 8, 32)
    with torch.no_grad():
        for batch in (4, 1, 8):
            plan = td.build_plan(image, td.Settings(tile_batch=batch), latent_size=latent)
            den = td.TiledDenoiser(timed_model, plan)
            direct = model_batches(plan, x, sigma, text)
            den(x, sigma, c_crossattn=text)  # warm-up (also builds the weight maps)
            call_directly(model, direct)
            tiled, plain, inside[0] = [], [], 0.0
            for _ in range(3):  # interleaved, so load from elsewhere hits both alike
                tiled.append(seconds(den, x, sigma, c_crossattn=text))
                plain.append(seconds(call_directly, model, direct))
            (t, tw), (p, pw) = (map(statistics.median, zip(*times)) for times in (tiled, plain))
            detail = (
                f"CPU {t:.3f} s / {p:.3f} s direct (wall {tw:.3f} / {pw:.3f}); {len(plan.windows)} windows"
            )
            yield f"overhead {size}px tile_batch={batch}", t / p, f"{detail}, {len(direct)} model calls"
            own = sum(cpu for cpu, _ in tiled) - inside[0]
            yield "  same, own time / time in model", own / inside[0], f"{own / 3e-3:.1f} ms per call outside"


def karras_schedule(steps: int) -> torch.Tensor:
    return K.sampling.get_sigmas_karras(steps, 0.0292, 14.6146, rho=7.0)


def job_schedule(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The WebUI img2img rule: t_enc = int(min(d, 0.999) * N), schedule = sigmas[N - t_enc - 1:]."""
    steps = len(sigmas) - 1
    return sigmas[steps - int(min(strength, 0.999) * steps) - 1 :]


def run_job(plan, schedule: torch.Tensor) -> tuple[int, list[float]]:
    """Euler img2img with a cheap model; returns evaluated latent px and the sigma of every call."""
    torch.manual_seed(2)
    original = torch.randn(1, 4, *plan.latent_size)
    den = td.TiledDenoiser(lambda x, sigma, **cond: x * 0.5, plan, original=original)
    calls = []

    def model(x, sigma, **cond):
        calls.append(float(sigma[0]))
        return den(x, sigma, **cond)

    x = original + torch.randn_like(original) * schedule[0]
    K.sampling.sample_euler(model, x, schedule, disable=True)
    return den.stats["evaluated_pixels"], calls


def bench_work(quick: bool):
    """Model work of three 20-step img2img jobs relative to the peer's grid and to the leaf floor."""
    size = 1024 if quick else 2048
    latent = (size // 8, size // 8)
    image, sigmas = photo(size), karras_schedule(20)
    variable = td.Settings(variable_denoise=True, denoise_largest=0.2, denoise_smallest=0.7)
    jobs = {  # settings, img2img denoising strength (None: the plan's largest tile strength)
        "a default": (td.Settings(), 0.5),
        "b skip_below=256": (td.Settings(skip_below=256), 0.5),
        "c variable 0.2..0.7": (variable, None),
    }
    for name, (settings, strength) in jobs.items():
        plan = td.build_plan(image, settings, latent_size=latent, sigmas=sigmas)
        schedule = job_schedule(sigmas, strength if strength is not None else plan.max_strength)
        evaluated, calls = run_job(plan, schedule)
        # The main peer at the settings people use: 512 px tiles overlapping by 64 px.
        grid = len(calls) * sum(w * h for _, _, w, h in uniform_grid(latent, 64, 8))
        floor = sum(leaf.w * leaf.h for s in calls for leaf in plan.leaves if leaf.is_active(s))
        skipped = sum(leaf.w * leaf.h for leaf in plan.leaves if leaf.skipped) / (latent[0] * latent[1])
        detail = f"{len(calls)} calls, {len(plan.leaves)} tiles, skipped {skipped:.1%} of the area"
        yield f"work {name} / grid", evaluated / grid, detail
        yield f"work {name} / leaf floor", evaluated / floor, f"{evaluated} latent px evaluated"


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def bench_memory(quick: bool):
    """Peak extra RSS of one TiledDenoiser call, in latents, for a few and for many tiles."""
    size = 2048 if quick else 4096
    latent = (size // 8, size // 8)
    image = photo(size)
    torch.manual_seed(3)
    original = torch.randn(1, 4, *latent)
    x = original + torch.randn_like(original) * 2.0
    libc = ctypes.CDLL("libc.so.6")
    for settings in (
        td.Settings(min_tile=64, detail_threshold=1.0),
        td.Settings(min_tile=512, max_tile=1024, detail_threshold=1.0),
    ):
        plan = td.build_plan(image, settings, latent_size=latent)
        den = td.TiledDenoiser(lambda x, sigma, **cond: x * 0.5, plan, original=original)
        den(x, torch.tensor([2.0]))  # warm-up: weight maps, weight sum, allocator pools
        peaks = []
        for _ in range(3):
            libc.malloc_trim(0)  # hand freed heap back, so it cannot hide new allocations
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            before = _status("VmRSS")
            out = den(x, torch.tensor([2.0]))
            peaks.append(_status("VmHWM") - before)
            del out
        peak, mib = statistics.median(peaks), 2**20
        detail = (
            f"{peak / mib:.1f} MiB peak extra, latent {x.nbytes / mib:.0f} MiB, {len(plan.windows)} tiles"
        )
        yield f"memory {size}px min_tile={settings.min_tile}", peak / x.nbytes, detail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="half the image sizes (about 4x faster)")
    quick = parser.parse_args().quick
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s){', quick' if quick else ''}")
    print(f"{'measure':<44} {'ratio':>7}  detail")
    for part in (bench_overhead, bench_work, bench_memory):
        for name, ratio, detail in part(quick):
            print(f"{name:<44} {ratio:>7.3f}  {detail}", flush=True)


if __name__ == "__main__":
    main()
