"""VAE decode benchmark: peak memory and time, tiled vs untiled, at 1024/2048/4096 px output.

    OMP_NUM_THREADS=1 python benchmarks/bench_vae.py [--sizes 1024 2048 4096] [--tile 512]

Each configuration runs in a fresh subprocess (`--one MODE SIZE`), so that one run's memory
does not count in the next. The VAE is the SD 1.5 decoder in the ldm layout A1111 runs
(tests/ldm_vae.py), random weights, its attention in the manner of A1111's default "sdp".
Nothing is asserted; benchmarks/README.md says what each number means.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import ldm_vae  # noqa: E402
from tiled_diffusion.vae import tiled_decode  # noqa: E402

SD15 = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}  # fmt: skip


def sd15_vae(device: torch.device, dtype: torch.dtype) -> ldm_vae.AutoencoderKL:
    torch.manual_seed(0)
    vae = ldm_vae.AutoencoderKL(SD15, embed_dim=4).eval().to(device, dtype)
    for attn in (vae.decoder.mid.attn_1, vae.encoder.mid.attn_1):
        attn.forward = ldm_vae.sdp_forward(attn)
    return vae


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def one(mode: str, size: int, tile: int) -> dict:
    """Decode one size x size latent in this process; peak memory beyond what existed before."""
    Path("/proc/self/oom_score_adj").write_text("1000")  # if memory runs out, end this run only
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    vae = sd15_vae(device, torch.float16 if cuda else torch.float32)
    z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    z = z.to(device, next(vae.parameters()).dtype)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        before = status_kib("VmRSS") * 1024
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        image = vae.decode(z) if mode == "untiled" else tiled_decode(vae, z, tile=tile)
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = torch.cuda.max_memory_allocated() if cuda else status_kib("VmHWM") * 1024
    assert image.shape[-1] == size and torch.isfinite(image).all()
    return {"peak": peak - before, "wall": wall, "cpu": cpu, "device": str(device)}


def available_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0]
    lines = Path("/proc/meminfo").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in lines if line.startswith("MemAvailable:"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--tile", type=int, default=512, help="tile side in px (default 512)")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.tile)))
        return

    gib = 1024**3
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), tile {args.tile} px")
    print(f"{'size':>5} {'mode':8} {'peak GiB':>9} {'wall s':>8} {'cpu s':>8}")
    results: dict[tuple[int, str], dict] = {}
    for size in args.sizes:
        for mode in ("untiled", "tiled"):
            smaller = [s for (s, m) in results if m == mode and s < size]
            if smaller:  # both modes' peaks grow with the area: skip what cannot fit
                known = max(smaller)
                need = results[known, mode]["peak"] * (size / known) ** 2
                if need > 0.95 * available_bytes():  # a run that overshoots is the one killed
                    print(f"{size:>5} {mode:8} skipped: needs ~{need / gib:.1f} GiB, "
                          f"{available_bytes() / gib:.1f} GiB available")  # fmt: skip
                    continue
            command = [sys.executable, __file__, "--one", mode, str(size), "--tile", str(args.tile)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{size:>5} {mode:8} failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
                continue
            r = results[size, mode] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{size:>5} {mode:8} {r['peak'] / gib:9.2f} {r['wall']:8.1f} {r['cpu']:8.1f}", flush=True)
    print("\nratios tiled / untiled (same run)")
    for size in args.sizes:
        if (size, "tiled") in results and (size, "untiled") in results:
            t, u = results[size, "tiled"], results[size, "untiled"]
            ratios = {key: t[key] / u[key] for key in ("peak", "wall", "cpu")}
            print(f"{size:>5} px  peak memory {ratios['peak']:.3f}  wall time {ratios['wall']:.3f}"
                  f"  cpu time {ratios['cpu']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
