"""The preview picture and the `python -m tiled_diffusion preview` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tiled_diffusion as td
from tiled_diffusion.__main__ import main
from tiled_diffusion.preview import DEFAULT_IMAGE, draw_plan, load_image

REPO = Path(__file__).resolve().parents[1]


def coverage(plan_json: dict) -> np.ndarray:
    """How many leaves cover each latent pixel."""
    size = plan_json["latent_size"]
    count = np.zeros((size["height"], size["width"]), dtype=int)
    for leaf in plan_json["leaves"]:
        count[leaf["y"] : leaf["y"] + leaf["h"], leaf["x"] : leaf["x"] + leaf["w"]] += 1
    return count


def half_flat_half_busy(size: int = 512) -> np.ndarray:
    """Flat grey on the left; on the right, faint 8 px blocks that split down to the smallest tiles."""
    rng = np.random.default_rng(0)
    image = np.full((size, size, 3), 128, dtype=np.uint8)
    blocks = rng.integers(116, 141, (size // 8, size // 16, 1), dtype=np.uint8)
    image[:, size // 2 :] = blocks.repeat(8, axis=0).repeat(8, axis=1)
    return image


def test_preview_command_runs_on_bundled_photo(tmp_path):
    out, plan_file = tmp_path / "preview.png", tmp_path / "plan.json"
    result = subprocess.run(
        [sys.executable, "-m", "tiled_diffusion", "preview", "-o", str(out), "--json", str(plan_file)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(plan_file.read_text())
    assert plan["pixel_size"] == {"width": 512, "height": 512}  # the bundled photo's size
    assert (coverage(plan) == 1).all()  # the leaves partition the latent area exactly
    assert result.stdout.splitlines()[0] == plan["summary"]
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        assert picture.width == 512 and picture.height > 512  # the summary strip sits below


def test_preview_marks_skipped_tiles():
    settings = td.Settings(min_tile=64, skip_below=128, variable_denoise=True)
    image = half_flat_half_busy()
    plan = td.build_plan(image, settings, latent_size=(64, 64))
    skipped = next(leaf for leaf in plan.leaves if leaf.skipped)
    active = next(leaf for leaf in plan.leaves if not leaf.skipped)
    picture = np.asarray(draw_plan(image, plan), dtype=float)

    def inside(leaf, pad=8, label=28):  # clear of the borders and the label at the top left
        x, y, w, h = (v * 8 for v in (leaf.x, leaf.y, leaf.w, leaf.h))
        return picture[y + label : y + h - pad, x + pad : x + w - pad]

    hatched, tinted = inside(skipped), inside(active)
    # The active tile is evenly tinted in its strength's colour: no longer grey.
    assert np.ptp(tinted.reshape(-1, 3), axis=0).max() < 8
    assert np.ptp(tinted[0, 0]) > 60
    # The skipped tile keeps grey photo pixels between diagonal hatch lines:
    # lines running down-left repeat along that diagonal and not along a row.
    assert (np.ptp(hatched, axis=2) < 4).all()
    assert (hatched > 200).all(axis=2).mean() > 0.03  # light lines
    assert (hatched < 80).all(axis=2).mean() > 0.03  # with dark edges
    assert (np.abs(hatched - 128) < 16).all(axis=2).mean() > 0.3  # the photo between them
    along = np.abs(hatched[1:, :-1] - hatched[:-1, 1:]).mean()
    across = np.abs(hatched[:, 1:] - hatched[:, :-1]).mean()
    assert along < across / 4


@pytest.mark.parametrize(
    "options, name",
    [
        (["--min-tile", "100"], "min_tile"),
        (["--method", "Tiled VAE"], "method"),
        (["--min-tile", "256", "--max-tile", "384"], "max_tile"),
        (["--denoise-smallest", "1.5"], "denoise_smallest"),
        (["--steps", "0"], "steps"),
    ],
)
def test_bad_option_names_the_parameter(options, name, tmp_path, capsys):
    out = tmp_path / "preview.png"
    assert main(["preview", *options, "-o", str(out)]) == 2
    assert name in capsys.readouterr().err
    assert not out.exists()


def test_unknown_image_file_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["preview", str(tmp_path / "missing.png"), "-o", str(tmp_path / "p.png")]) == 2
    assert "missing.png" in capsys.readouterr().err


@pytest.mark.parametrize(
    "size, options, expected",
    [
        ((400, 200), [], (400, 200)),  # the image's own size
        ((400, 200), ["--width", "800"], (800, 400)),  # one side keeps the aspect
        ((400, 200), ["--height", "100"], (200, 104)),  # aspect from the size asked for
        ((400, 200), ["--width", "300", "--height", "300"], (304, 304)),  # both: as given, to multiples of 8
        ((203, 101), [], (200, 104)),  # rounded to the latent grid
    ],
)
def test_output_size_options(size, options, expected, tmp_path):
    photo, out, plan_file = tmp_path / "photo.png", tmp_path / "preview.png", tmp_path / "plan.json"
    Image.fromarray(half_flat_half_busy(512)).resize(size).save(photo)
    assert main(["preview", str(photo), *options, "-o", str(out), "--json", str(plan_file)]) == 0
    width, height = expected
    assert json.loads(plan_file.read_text())["pixel_size"] == {"width": width, "height": height}
    with Image.open(out) as picture:
        assert picture.width == width


def test_variable_denoise_gives_tiles_start_sigmas(tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    argv = ["preview", "--variable-denoise", "--min-tile", "64", "--steps", "30"]
    assert main([*argv, "-o", str(tmp_path / "p.png"), "--json", str(plan_file)]) == 0
    leaves = json.loads(plan_file.read_text())["leaves"]
    strengths = [leaf["strength"] for leaf in leaves]
    assert min(strengths) == pytest.approx(0.1) and max(strengths) == pytest.approx(0.4)
    # The defaults keep detail: the smallest (most detailed) tiles get the lowest strength.
    smallest = min(leaf["w"] * leaf["h"] for leaf in leaves)
    assert {leaf["strength"] for leaf in leaves if leaf["w"] * leaf["h"] == smallest} == {min(strengths)}
    assert all(0 < leaf["start_sigma"] < 14.6146 for leaf in leaves)
    by_strength = sorted(leaves, key=lambda leaf: leaf["strength"])  # stronger tiles start earlier
    assert all(a["start_sigma"] <= b["start_sigma"] for a, b in zip(by_strength, by_strength[1:]))
    assert "note" not in capsys.readouterr().out  # the schedule was given: no "start sigmas unknown"
    assert not any(leaf["starts_with_job"] for leaf in leaves)
    main(["preview", "-o", str(tmp_path / "q.png"), "--json", str(plan_file)])
    plain = json.loads(plan_file.read_text())["leaves"]
    assert all(leaf["starts_with_job"] and leaf["start_sigma"] is None for leaf in plain)


def test_preview_help_lists_every_parameter(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["preview", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for p in td.PARAMETERS:
        if p.name != "enabled":
            assert "--" + p.name.replace("_", "-") in text


def test_default_image_is_the_bundled_photo():
    assert DEFAULT_IMAGE.is_file()
    image = load_image(None)
    assert image.mode == "RGB" and image.size == (512, 512)


def test_detail_map_shows_detailed_pixels_in_yellow_under_the_tiles(tmp_path):
    image = np.full((512, 512, 3), 128, dtype=np.uint8)
    image[:, 256:] = np.random.default_rng(0).integers(0, 256, (512, 256, 1), dtype=np.uint8)
    plan = td.build_plan(image, td.Settings(min_tile=64), latent_size=(64, 64))
    photo_view = np.asarray(draw_plan(image, plan), dtype=int)[:512]
    detail_view = np.asarray(draw_plan(image, plan, show_detail=True), dtype=int)[:512]
    yellow = (detail_view[..., 0] > 200) & (detail_view[..., 1] > 180) & (detail_view[..., 2] < 120)
    assert yellow[:, 300:].mean() > 0.5, "the busy half is detailed"
    assert yellow[40:-40, 40:200].mean() == 0, "the flat half is not"
    assert not np.array_equal(photo_view, detail_view)
    out = tmp_path / "detail.png"
    assert main(["preview", "--detail-map", "-o", str(out)]) == 0
    with Image.open(out) as picture:
        assert picture.width == 512
