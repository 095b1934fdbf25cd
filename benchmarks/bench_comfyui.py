"""The example workflows in a running ComfyUI: work and time against the same job untiled.

    python benchmarks/bench_comfyui.py --url http://127.0.0.1:8188 --ckpt my_sd15.safetensors [--size 512]

Uploads the bundled photo (SIZE / 2 px for the 2x upscale, SIZE px with a transparent
corner of SIZE / 4 px as the inpaint mask), then runs, one after another:
workflows/upscale_2x_skip_variable_denoise.json and its plain twin (the KSampler on the
untiled model at the Quadtree node's denoise, no paste), and workflows/inpaint_with_mask.json
and its plain twin. Prints wall seconds, and UNet calls and latent pixels (batch x height x
width summed over UNet calls) where ComfyUI has a probe serving GET /qtd_probe/unet_calls
(a test tool, not part of this pack), with their ratios; for the upscale, the pixels of the
skipped tiles' interiors that differ from the upscaled photo after Quadtree Paste Kept; for
the inpaint, the pixels outside the mask that differ from the photo. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tiled_diffusion import Settings, build_plan  # noqa: E402

PHOTO = ROOT / "tiled_diffusion" / "data" / "astronaut.jpg"
WORKFLOWS = ROOT / "workflows"


def call(url: str, route: str, payload: dict | None = None) -> tuple[int, dict | bytes]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url + route, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=7200) as response:
            body = response.read()
            return response.status, json.loads(body) if body[:1] in b"{[" else body
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
    except urllib.error.URLError:
        return 0, {}


def upload(url: str, picture: Image.Image, name: str) -> None:
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode() + buffer.getvalue()
    body += f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\ntrue\r\n'.encode()
    body += f"--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        url + "/upload/image", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    urllib.request.urlopen(request, timeout=60).read()


def run(url: str, workflow: dict) -> tuple[float, dict, dict[str, Image.Image]]:
    """Seconds, probe counts (or {}) and the saved images by node id of one workflow."""
    call(url, "/qtd_probe/reset", {})
    start = time.monotonic()
    status, answer = call(url, "/prompt", {"prompt": workflow, "client_id": "bench"})
    if status != 200:
        raise RuntimeError(f"POST /prompt: HTTP {status}: {answer}")
    prompt_id = answer["prompt_id"]
    while True:
        status, history = call(url, f"/history/{prompt_id}")
        entry = history.get(prompt_id) if isinstance(history, dict) else None
        if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
            break
        time.sleep(0.5)
    seconds = time.monotonic() - start
    if entry["status"]["status_str"] != "success":
        raise RuntimeError(f"workflow failed: {entry['status']}")
    status, probe = call(url, "/qtd_probe/unet_calls")
    counts = {}
    if status == 200:
        counts = {"calls": probe["calls"], "latent_px": sum(s[0] * s[-2] * s[-1] for s in probe["shapes"])}
    pictures = {}
    for node, output in entry["outputs"].items():
        for ref in output.get("images", []):
            query = urllib.parse.urlencode({k: ref.get(k, "") for k in ("filename", "subfolder", "type")})
            pictures[node] = Image.open(io.BytesIO(call(url, f"/view?{query}")[1])).convert("RGB")
    return seconds, counts, pictures


def untiled(workflow: dict) -> dict:
    """The same workflow without the pack: the KSampler on the loader's model at the Quadtree
    node's largest strength, the decoded image saved as it is."""
    plain = copy.deepcopy(workflow)
    ours = {k for k, n in plain.items() if n["class_type"].startswith("Quadtree")}
    tiled = next(k for k in ours if plain[k]["class_type"] == "QuadtreeTiledDiffusion")
    for node in plain.values():
        inputs = node["inputs"]
        if node["class_type"] == "KSampler":
            inputs["model"] = plain[tiled]["inputs"]["model"]
            if isinstance(inputs["denoise"], list):
                settings = plain[tiled]["inputs"]
                inputs["denoise"] = max(settings["denoise_largest"], settings["denoise_smallest"])
        for name, value in inputs.items():
            if (
                isinstance(value, list)
                and value[0] in ours
                and plain[value[0]]["class_type"] == "QuadtreePasteKept"
            ):
                inputs[name] = plain[value[0]]["inputs"]["image"]  # the decoded image itself
    fed_by_ours = {
        k for k, n in plain.items() if any(isinstance(v, list) and v[0] in ours for v in n["inputs"].values())
    }
    return {k: n for k, n in plain.items() if k not in ours and k not in fed_by_ours}


def report(name: str, seconds: float, counts: dict, base: tuple[float, dict] | None, extra: str) -> None:
    ratio = f"{seconds / base[0]:6.2f}" if base else "  1.00"
    calls = counts.get("calls", "-")
    pixels = counts.get("latent_px", "-")
    pixel_ratio = f"{pixels / base[1]['latent_px']:6.3f}" if base and counts and base[1] else "      "
    print(f"  {name:28s} {seconds:7.1f} {ratio} {calls!s:>6} {pixels!s:>9} {pixel_ratio}  {extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    parser.add_argument("--ckpt", required=True, help="a checkpoint name ComfyUI lists")
    parser.add_argument("--size", type=int, default=512, help="output side in px")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    photo = Image.open(PHOTO).convert("RGB")
    upload(args.url, photo.resize((args.size // 2,) * 2, Image.Resampling.LANCZOS), "example.png")
    masked = photo.resize((args.size,) * 2, Image.Resampling.LANCZOS).convert("RGBA")
    corner = args.size // 4
    alpha = np.full((args.size, args.size), 255, np.uint8)
    alpha[:corner, :corner] = 0  # transparent = the MASK of LoadImage: repaint
    masked.putalpha(Image.fromarray(alpha))
    upload(args.url, masked, "example_with_mask.png")
    print(f"{args.ckpt}, {args.size} px, {args.steps} steps; ratios to the untiled twin")
    print(f"  {'workflow':28s} {'wall s':>7} {'ratio':>6} {'calls':>6} {'latent px':>9} {'ratio':>6}")

    upscale = json.loads((WORKFLOWS / "upscale_2x_skip_variable_denoise.json").read_text())
    upscale["14"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "bench_up"}}
    inpaint = json.loads((WORKFLOWS / "inpaint_with_mask.json").read_text())
    seed = int(
        time.time()
    )  # one seed per run of the script: ComfyUI would serve a repeated job from its cache
    for workflow in (upscale, inpaint):
        for node in workflow.values():
            if node["class_type"] == "CheckpointLoaderSimple":
                node["inputs"]["ckpt_name"] = args.ckpt
            if node["class_type"] == "KSampler":
                node["inputs"].update(steps=args.steps, seed=seed)

    base = run(args.url, untiled(upscale))
    report("upscale 2x, untiled", *base[:2], None, "")
    seconds, counts, pictures = run(args.url, upscale)
    values = {k: v for k, v in upscale["7"]["inputs"].items() if not isinstance(v, list)}
    upscaled = pictures["14"]
    plan = build_plan(upscaled, Settings(enabled=True, **values), (upscaled.height // 8, upscaled.width // 8))
    inner = np.zeros((upscaled.height, upscaled.width), bool)
    for leaf in plan.leaves:
        if leaf.skipped:
            band = values["overlap"] + 8
            inner[
                leaf.y * 8 + band : (leaf.y + leaf.h) * 8 - band,
                leaf.x * 8 + band : (leaf.x + leaf.w) * 8 - band,
            ] = True
    differ = np.abs(np.asarray(pictures["11"], int) - np.asarray(upscaled, int)).max(-1)[inner] > 0
    report("upscale 2x, quadtree", seconds, counts, base[:2],
           f"skipped interiors: {int(differ.sum())} of {int(inner.sum())} px differ")  # fmt: skip

    base = run(args.url, untiled(inpaint))
    report("inpaint corner, untiled", *base[:2], None, "")
    seconds, counts, pictures = run(args.url, inpaint)
    outside = np.ones((args.size, args.size), bool)
    outside[: corner + 8, : corner + 8] = False
    result = np.asarray(pictures["11"], int)
    differ = np.abs(result - np.asarray(masked.convert("RGB"), int)).max(-1)[outside] > 0
    report(
        "inpaint corner, quadtree",
        seconds,
        counts,
        base[:2],
        f"outside the mask: {int(differ.sum())} px differ",
    )


if __name__ == "__main__":
    main()
