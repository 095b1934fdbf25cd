"""Inpainting in a running WebUI: what skipping the windows without a repainted pixel saves.

    python benchmarks/bench_inpaint_webui.py --url http://127.0.0.1:7860 [--size 2048] [--steps 8]

Runs img2img inpaint jobs of the bundled photo at SIZE x SIZE px over the WebUI's API, one
after another and with one seed: a MASK px square in the top-left corner is repainted
("Whole picture", masked content "original", mask blur 4, Euler, denoising strength 0.75).
Jobs: (a) this extension off, (b) this extension on (max tile 512, min tile 128, overlap 32,
tile batch 4) and, when it is installed in that WebUI, (c) the main peer "Tiled Diffusion"
(pkuliyi2015/multidiffusion-upscaler-for-automatic1111; Mixture of Diffusers, its default
latent tile 96 x 96, overlap --peer-overlap, tile batch 4). A small warm-up job at 512 px
runs first (the first job after a model load is slower).

Prints, per job: HTTP status, wall seconds, UNet calls and UNet latent pixels (the sum of
batch x height x width over the UNet calls; only where the WebUI has the `qtd-probe` test
extension with its /probe/reset and /probe/count routes) and their ratios to (a), and the
number of pixels outside the mask and its blur (the corner square of MASK + 4 x blur px)
that differ from the init image (the WebUI's overlay should make it 0). Nothing is
asserted. Wall time includes the VAE encode and decode, which skipping windows does not
shorten, so the time ratio stays well above the UNet ratio.

Measured 2026-12-06, A1111 1.10.1 on a shared 2-core CPU, 1 thread, tiny random SD1.5 UNet
(32 channels), --size 1536 --steps 6 (at 2048 px the peer job was estimated at ~15 min):

  (a) extension off           200    203.1  1.000           5     368640  1.000  0
  (b) quadtree on             200    102.4  0.504          20      83040  0.225  0
  (c) peer Tiled Diffusion    200    199.7  0.983          15     829440  2.250  0
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import time
import urllib.request

import numpy as np
from PIL import Image
from webui_client import photo_png, post

TITLE = "quadtree tiled diffusion"
PEER = "tiled diffusion"
BLUR = 4


def get(url: str, route: str) -> tuple[int, dict | None]:
    try:
        with urllib.request.urlopen(url + route, timeout=60) as response:
            return response.status, json.load(response)
    except (urllib.error.URLError, ValueError):
        return 0, None


def has_probe(url: str) -> bool:
    return get(url, "/probe/count")[0] == 200


def has_peer(url: str) -> bool:
    status, scripts = get(url, "/sdapi/v1/scripts")
    return status == 200 and PEER in (scripts or {}).get("img2img", [])


def mask_png(size: int, square: int) -> str:
    mask = np.zeros((size, size), np.uint8)
    mask[:square, :square] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask, "L").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def payload(args: argparse.Namespace, size: int, square: int, scripts: dict) -> dict:
    return {
        "init_images": [photo_png(size)],
        "mask": mask_png(size, square),
        "mask_blur": BLUR,
        "inpainting_fill": 1,
        "inpaint_full_res": False,
        "prompt": "a photo",
        "width": size,
        "height": size,
        "steps": args.steps,
        "sampler_name": "Euler",
        "scheduler": "Automatic",
        "denoising_strength": args.denoise,
        "cfg_scale": 7,
        "seed": 1234,
        "alwayson_scripts": scripts,
    }


def ours() -> dict:
    settings = {"enabled": True, "max_tile": 512, "min_tile": 128, "overlap": 32, "tile_batch": 4}
    return {TITLE: {"args": [settings]}}


def peer(args: argparse.Namespace) -> dict:
    # The positional order of its ui(): enabled, method, overwrite_size, keep_input_size,
    # image_width, image_height, tile_width, tile_height, overlap, batch_size, upscaler,
    # scale_factor, noise_inverse, its steps, retouch, renoise strength, renoise kernel,
    # control_tensor_cpu, enable_bbox_control, draw_background, causal_layers.
    size = [True, "Mixture of Diffusers", False, True, args.size, args.size]
    tiles = [96, 96, args.peer_overlap, 4, "None", 2.0]
    rest = [False, 10, 1.0, 1.0, 64, False, False, False, False]
    return {PEER: {"args": size + tiles + rest}}


def job(args: argparse.Namespace, body: dict, probe: bool) -> dict:
    if probe:
        post(args.url, {}, "/probe/reset")
    start = time.perf_counter()
    status, answer = post(args.url, body)
    seconds = time.perf_counter() - start
    result = {"status": status, "seconds": seconds, "calls": None, "pixels": None, "outside": None}
    if probe:
        count = get(args.url, "/probe/count")[1] or {}
        result["calls"], result["pixels"] = count.get("calls"), count.get("latent_pixels")
    if status == 200:
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB"))
        init = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["init_images"][0]))).convert("RGB"))
        outside = np.ones(image.shape[:2], bool)
        edge = args.mask + 4 * BLUR
        outside[:edge, :edge] = False
        result["outside"] = int((np.any(image != init, axis=-1) & outside).sum())
    else:
        result["error"] = answer.get("error", "")[:200]
    return result


def ratio(value, reference) -> str:
    return f"{value / reference:6.3f}" if value is not None and reference else "     -"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", required=True)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--mask", type=int, default=512, help="side of the repainted corner square, px")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--denoise", type=float, default=0.75)
    parser.add_argument(
        "--peer",
        choices=("auto", "off"),
        default="auto",
        help="auto: run the peer Tiled Diffusion when the WebUI has it",
    )
    parser.add_argument("--peer-overlap", type=int, default=48, help="the peer's latent tile overlap")
    args = parser.parse_args()
    probe = has_probe(args.url)
    jobs = {"(a) extension off": {}, "(b) quadtree on": ours()}
    if args.peer == "auto" and has_peer(args.url):
        jobs["(c) peer Tiled Diffusion"] = peer(args)
    job(args, payload(args, 512, 128, {}), probe=False)  # warm-up
    print(
        f"{args.size} px, {args.mask} px corner mask, {args.steps} steps, denoise {args.denoise}; "
        f"probe {'on' if probe else 'absent'}"
    )
    print(f"  {'job':26s} HTTP   wall s  ratio  UNet calls  latent px    ratio  changed outside mask")
    results = {}
    for name, scripts in jobs.items():
        result = job(args, payload(args, args.size, args.mask, scripts), probe)
        results[name] = result
        reference = results["(a) extension off"]
        calls = "-" if result["calls"] is None else result["calls"]
        pixels = "-" if result["pixels"] is None else result["pixels"]
        print(
            f"  {name:26s} {result['status']:4d} {result['seconds']:8.1f} "
            f"{ratio(result['seconds'], reference['seconds'])} {calls!s:>11} {pixels!s:>10} "
            f"{ratio(result['pixels'], reference['pixels'])}  {result['outside']}"
            + (f"  {result['error']}" if "error" in result else ""),
            flush=True,
        )


if __name__ == "__main__":
    main()
