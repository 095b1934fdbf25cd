"""Command line: `python -m tiled_diffusion preview [IMAGE]` draws the tiling plan without a WebUI."""

from __future__ import annotations

import argparse
import json
import sys

from PIL import Image

import tiled_diffusion as td

from .preview import DEFAULT_IMAGE, draw_plan, karras_sigmas, load_image


def output_size(image_size: tuple[int, int], width: int | None, height: int | None) -> tuple[int, int]:
    """(width, height) in px, multiples of 8; one side given keeps the image's aspect."""
    w, h = image_size
    if width and not height:
        height = width * h / w
    elif height and not width:
        width = height * w / h
    return tuple(max(8, int(side / 8 + 0.5) * 8) for side in (width or w, height or h))


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(
        prog="python -m tiled_diffusion",
        description="Quadtree Tiled Diffusion without a WebUI: see how an image will be tiled.",
        epilog="Run 'python -m tiled_diffusion preview --help' for the options.",
    )
    commands = main.add_subparsers(dest="command", required=True, metavar="COMMAND")
    preview = commands.add_parser(
        "preview",
        help="draw the tiling plan of an image and print its summary",
        description="Draw the quadtree tiles, their denoise strengths and skipped tiles over an image.",
        epilog="example: python -m tiled_diffusion preview photo.jpg --variable-denoise --skip-below 129",
    )
    preview.add_argument("image", nargs="?", help=f"image file (default: the bundled {DEFAULT_IMAGE.name})")
    for p in td.PARAMETERS:
        if p.name == "enabled":
            continue
        flag = "--" + p.name.replace("_", "-")
        if p.kind is bool:
            text = f"{p.help} Default: {'on' if p.default else 'off'}."
            preview.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=p.default, help=text.replace("%", "%%")
            )
        else:
            text = f"{p.help} Allowed: {p.allowed()}. Default: {p.default!r}."
            preview.add_argument(
                flag,
                type=p.kind,
                default=p.default,
                help=text.replace("%", "%%"),
                metavar={int: "N", float: "X"}.get(p.kind, "NAME"),
            )
    size = "output {} in px, a multiple of 8 (default: the image's; one side alone keeps the aspect)"
    preview.add_argument("--width", type=int, metavar="PX", help=size.format("width"))
    preview.add_argument("--height", type=int, metavar="PX", help=size.format("height"))
    steps = "sampling steps of the Karras schedule that sets the tiles' start sigmas (default: 20)"
    preview.add_argument("--steps", type=int, default=20, metavar="N", help=steps)
    out = "picture to write (default: %(default)s)"
    preview.add_argument("-o", "--output", metavar="OUT.png", default="quadtree_preview.png", help=out)
    preview.add_argument("--json", metavar="PLAN.json", help="also write the plan as JSON")
    detail = "draw the tiles over the detail map that decided them (yellow = detail), not the photo"
    preview.add_argument("--detail-map", action="store_true", help=detail)
    return main


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    values = {p.name: getattr(args, p.name) for p in td.PARAMETERS if p.name != "enabled"}
    try:
        settings = td.Settings(enabled=True, **values)
        for name, value in (("width", args.width), ("height", args.height), ("steps", args.steps)):
            if value is not None and value < 1:
                raise td.SettingsError(f"{name}: {value} is not allowed; expected at least 1")
        image = load_image(args.image)
        width, height = output_size(image.size, args.width, args.height)
        image = image.resize((width, height), Image.Resampling.LANCZOS)  # as the job resizes it
        sigmas = karras_sigmas(args.steps) if settings.variable_denoise else None
        plan = td.build_plan(image, settings, latent_size=(height // 8, width // 8), sigmas=sigmas)
    except (td.SettingsError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(plan.summary())
    for note in plan.notes:
        print(f"note: {note}")
    draw_plan(image, plan, args.detail_map).save(args.output)
    print(f"wrote {args.output} ({width}x{height} px)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump(plan.to_json(), file, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
