"""Window prompts in a running WebUI: the time "Words where they are" and regions add.

    python benchmarks/bench_window_prompts_webui.py --url http://127.0.0.1:7860 [--size 2048] [--steps 8]

Runs img2img jobs of the bundled photo at SIZE x SIZE px over the WebUI's API with this
extension on (its defaults, variable denoise on), one after another and with one seed: a
primer job, then "Whole prompt", "Words where they are" and two regions (left and right
half). Prints each job's wall seconds and its ratio to "Whole prompt". The WebUI's console
shows, for the words job, what the placement pass itself took ("Words where they are: read
... in N s"). Nothing is asserted; benchmarks/README.md says what the numbers mean.
"""

from __future__ import annotations

import argparse
import time

from webui_client import photo_png, post

PROMPT = "a photo of an astronaut, a woman smiling, the american flag, a space shuttle, highly detailed"
JOBS = {
    "Whole prompt": {},
    "Words where they are": {"window_prompts": "Words where they are"},
    "two regions": {"regions": "0 0 0.5 1: a smiling face\n0.5 0 1 1: a rocket"},
}


def job(args: argparse.Namespace, image: str, extra: dict) -> tuple[int, float]:
    payload = {
        "init_images": [image],
        "prompt": PROMPT,
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "sampler_name": "Euler",
        "seed": 1,
        "alwayson_scripts": {
            "quadtree tiled diffusion": {"args": [{"enabled": True, "variable_denoise": True, **extra}]}
        },
    }
    start = time.perf_counter()
    status, _ = post(args.url, payload)
    return status, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    image = photo_png(args.size)
    job(args, image, {})  # primer: the first job after a model load is not like the rest
    print(f"{args.size} px, {args.steps} steps, variable denoise (job at 0.4); wall seconds")
    times = {}
    for name, extra in JOBS.items():
        status, seconds = job(args, image, extra)
        times[name] = seconds
        ratio = seconds / times["Whole prompt"]
        print(f"  {name:22s} HTTP {status}  {seconds:8.1f} s  {ratio:5.2f}x Whole prompt")


if __name__ == "__main__":
    main()
