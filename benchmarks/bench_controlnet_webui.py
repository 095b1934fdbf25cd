"""ControlNet benchmark in a running WebUI: time and peak memory, tiled vs untiled.

    python benchmarks/bench_controlnet_webui.py --url http://127.0.0.1:7860 --pid PID \\
        --model "control_v11f1e_sd15_tile [a371b31b]" [--size 2048] [--steps 4]

Runs four img2img jobs of the bundled photo at SIZE x SIZE px over the WebUI's API, one
after another: with the ControlNet unit (tile_resample) and without it, each with this
extension on (its defaults) and off. Before each job the server's peak resident memory is
reset (`echo 5 > /proc/PID/clear_refs`, so this must run on the server's machine); the
job's peak is VmHWM after it less the resident memory before it (the loaded models).
Prints wall seconds and that peak per job, and the ratios on / off.
Nothing is asserted; benchmarks/README.md says what the numbers mean.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from webui_client import photo_png, post


def status_gib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(field)


def job(args: argparse.Namespace, image: str, tiled: bool, controlnet: bool) -> dict:
    scripts = {"quadtree tiled diffusion": {"args": [{"enabled": tiled}]}}
    if controlnet:
        unit = {"enabled": True, "module": "tile_resample", "model": args.model, "weight": 1.0}
        scripts["controlnet"] = {
            "args": [{**unit, "control_mode": "Balanced", "resize_mode": "Crop and Resize"}]
        }
    payload = {
        "init_images": [image],
        "prompt": "a photo of an astronaut",
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "denoising_strength": 0.5,
        "sampler_name": "Euler",
        "seed": 1,
        "alwayson_scripts": scripts,
    }
    Path(f"/proc/{args.pid}/clear_refs").write_text("5")
    before = status_gib(args.pid, "VmRSS")
    start = time.perf_counter()
    status, body = post(args.url, payload)
    seconds = time.perf_counter() - start
    return {"status": status, "seconds": seconds, "peak": status_gib(args.pid, "VmHWM") - before}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--pid", type=int, required=True, help="the WebUI server's process id")
    parser.add_argument("--model", required=True, help="as GET /controlnet/model_list lists it")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    image = photo_png(args.size)
    print(f"{args.size} px, {args.steps} steps at denoise 0.5; wall seconds, peak GiB above the idle server")
    for controlnet in (True, False):
        runs = {tiled: job(args, image, tiled, controlnet) for tiled in (True, False)}
        for tiled, run in runs.items():
            name = f"{'ControlNet' if controlnet else 'no ControlNet'}, extension {'on' if tiled else 'off'}"
            print(f"  {name:32s} HTTP {run['status']}  {run['seconds']:8.1f} s  {run['peak']:6.2f} GiB")
        time_ratio = runs[True]["seconds"] / runs[False]["seconds"]
        print(f"  ratio on / off: time {time_ratio:.2f}, peak {runs[True]['peak'] / runs[False]['peak']:.2f}")


if __name__ == "__main__":
    main()
