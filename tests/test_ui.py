"""The WebUI controls: generated from PARAMETERS, and working in a real browser on both gradio stacks.

The browser tests run tests/ui_app.py in .venv-gradio3 (A1111's gradio 3.41.2) and
.venv-gradio4 (Forge's gradio 4.40.0), made by .ci/setup-ui, and drive headless Chromium
with playwright. Without those pieces they skip, except under CI, where they fail.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tiled_diffusion.preview import DEFAULT_IMAGE, load_image
from tiled_diffusion.settings import PARAMETERS, PARAMETERS_BY_NAME
from tiled_diffusion.ui import ROWS, preview_tiles, tooltips_js

from .stand_in_words import corner_words

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
]
STACKS = {"gradio3": "3.41.2", "gradio4": "4.40.0"}
WAIT_S = 60


def defaults() -> list:
    return [p.default for p in PARAMETERS]


def with_values(**changes) -> list:
    return [changes.get(p.name, p.default) for p in PARAMETERS]


# --- without a browser ---------------------------------------------------------------------


def test_tooltips_file_equals_generated_from_settings():
    committed = (REPO / "javascript" / "quadtree_tiled_diffusion.js").read_text(encoding="utf-8")
    assert committed == tooltips_js(), (
        "javascript/quadtree_tiled_diffusion.js is stale: rewrite it with "
        "python -c 'from tiled_diffusion.ui import tooltips_js; print(tooltips_js(), end=\"\")' "
        "> javascript/quadtree_tiled_diffusion.js"
    )


def test_layout_places_every_parameter_once_in_its_group():
    placed = [(group, name) for group, rows in ROWS.items() for row in rows for name in row]
    assert sorted(name for _, name in placed) == sorted(p.name for p in PARAMETERS if p.name != "enabled")
    for group, name in placed:
        assert PARAMETERS_BY_NAME[name].group == group, name


@pytest.mark.parametrize("image", [None, "<div>a host's HTML canvas</div>"])
def test_preview_without_image_asks_for_one(image):
    picture, summary = preview_tiles(image, 512, 512, *defaults())
    assert picture is None
    assert "Load an init image first" in summary


def test_preview_settings_error_names_the_parameter():
    picture, summary = preview_tiles(load_image(), 512, 512, *with_values(min_tile=512, max_tile=512))
    assert picture is None
    assert "max\\_tile" in summary  # escaped for Markdown, shown as max_tile


def test_preview_unreadable_image_is_a_message():
    picture, summary = preview_tiles(np.zeros((0, 8, 3), np.uint8), 512, 512, *defaults())
    assert picture is None and "Image error" in summary


def test_preview_draws_at_job_size_rounded_down_to_latent_grid():
    picture, summary = preview_tiles(load_image(), 515, 300, *defaults())
    assert picture.width == 512 and picture.height > 296  # the legend strip lies below
    assert "tiles" in summary


def test_preview_takes_image_size_when_host_has_no_size_controls():
    image = np.full((200, 333, 4), 90, dtype=np.uint8)  # RGBA array, as some hosts hand over
    picture, _ = preview_tiles(image, None, None, *defaults())
    assert picture.width == 328


def test_preview_can_show_the_detail_map_instead_of_the_photo():
    plain, _ = preview_tiles(load_image(), 512, 512, *defaults())
    detail, summary = preview_tiles(load_image(), 512, 512, *defaults(), show_detail=True)
    assert plain.width == detail.width and "tiles" in summary
    assert not np.array_equal(np.asarray(plain)[:512], np.asarray(detail)[:512])


def test_preview_variable_denoise_gets_start_sigmas_from_a_schedule():
    values = with_values(variable_denoise=True, min_tile=64, max_tile=256)
    picture, summary = preview_tiles(load_image(), 512, 512, *values)
    assert picture is not None and "tiles" in summary
    assert "no sampler schedule" not in summary


def test_preview_draws_the_regions_and_the_phrases_each_tile_is_told():
    regions = "0 0 0.5 1: a red barn\n0.5 0 1 1: a wheat field"
    plain, _ = preview_tiles(load_image(), 512, 512, *with_values(min_tile=64))
    drawn, summary = preview_tiles(load_image(), 512, 512, *with_values(min_tile=64, regions=regions))
    pixels = np.asarray(drawn)[:512].reshape(-1, 3)
    assert ((pixels == (255, 60, 220)).all(1)).sum() > 2 * 512 * 3  # the two regions' outlines
    assert "tiles" in summary
    words = with_values(min_tile=64, window_prompts="Words where they are")
    told, summary = preview_tiles(
        load_image(), 512, 512, *words, prompt="a barn, sunny", place_words=corner_words
    )
    assert "placed 'a barn' (stand-in)" in summary
    assert not np.array_equal(np.asarray(told)[:512], np.asarray(plain)[:512])  # +'a barn' labels
    _, summary = preview_tiles(load_image(), 512, 512, *words, prompt="a barn", place_words=None)
    assert "placed by the model when the job runs" in summary

    def broken(*args):
        raise RuntimeError("no model loaded")

    _, summary = preview_tiles(load_image(), 512, 512, *words, prompt="a barn", place_words=broken)
    assert "could not place the phrases (RuntimeError: no model loaded)" in summary


# --- in a real browser -----------------------------------------------------------------------


def need(ok: bool, reason: str) -> None:
    """Skip without the piece on a developer's machine; fail under CI, where setup installs it."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must have it: .ci/setup-ui installs it)")
        pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(stack: str, log: Path, *flags: str):
    """tests/ui_app.py served by one gradio stack; yields its URL, stops it on exit."""
    python = REPO / f".venv-{stack}" / "bin" / "python"
    need(python.exists(), f"{python.parent.parent.name} is missing: run .ci/setup-ui")
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(python), str(REPO / "tests" / "ui_app.py"), str(port), *flags],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + WAIT_S
        while "ready on" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{stack} app did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        with urllib.request.urlopen(url, timeout=WAIT_S) as response:
            assert response.status == 200
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module", params=list(STACKS))
def app(request, tmp_path_factory):
    """The test page served by each gradio stack in turn: (stack name, URL)."""
    stack = request.param
    with serve(stack, tmp_path_factory.mktemp(stack) / "app.log") as url:
        yield stack, url


@pytest.fixture(scope="module")
def browser():
    need(CHROMIUM.exists(), f"{CHROMIUM} is missing: run .ci/setup-ui")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        need(False, "playwright is not installed in this venv (requirements-dev.txt)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def new_page(browser, url: str):
    """A fresh page (own context) of the URL, every request off 127.0.0.1 aborted."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_S * 1000)
    page.route(
        "**/*",
        lambda route: (
            route.continue_() if route.request.url.startswith("http://127.0.0.1:") else route.abort()
        ),
    )
    page.goto(url)
    page.locator("#quadtree-td-img2img").wait_for()
    return page


@pytest.fixture
def page(app, browser):
    """A fresh page of the test page, the accordion closed."""
    stack, url = app
    page = new_page(browser, url)
    page.stack = stack
    yield page
    page.context.close()


def open_accordion(page) -> None:
    if not page.locator("#quadtree-td-img2img-enabled").is_visible():
        page.locator("#quadtree-td-img2img .label-wrap").first.click()
    page.locator("#quadtree-td-img2img-enabled").wait_for(state="visible")


def upload_init_image(page) -> None:
    page.locator("#img2img_image input[type=file]").set_input_files(str(DEFAULT_IMAGE))
    page.locator("#img2img_image img").first.wait_for(state="visible")


def set_number(page, name: str, value: float) -> None:
    field = page.locator(f"#quadtree-td-img2img-{name} input[type=number]")
    field.fill(str(value))
    field.press("Enter")


def click_preview(page) -> str:
    """Click Preview tiles and return the summary text once it changes."""
    summary = page.locator(
        "#quadtree-td-img2img-summary [data-testid=markdown]"
    ).first  # not the progress text
    before = summary.inner_text()
    page.locator("#quadtree-td-img2img-preview").click()
    deadline = time.monotonic() + WAIT_S
    while summary.inner_text() == before:
        assert time.monotonic() < deadline, "the summary did not change after Preview tiles"
        time.sleep(0.1)
    return summary.inner_text()


def test_page_has_every_control(page):
    for name in ["", "-preview", "-summary", "-preview-image"] + [f"-{p.name}" for p in PARAMETERS]:
        # gradio 3 repeats a Markdown's id on its inner div, so count at least one
        assert page.locator(f"#quadtree-td-img2img{name}").count() >= 1, (
            f"quadtree-td-img2img{name} is missing"
        )


def test_element_ids_are_unique_with_the_script_in_both_tabs(page):
    # The WebUI's accordion script finds an accordion's checkbox by id: with an id shared by
    # the txt2img and img2img copies, the img2img switch would enable the txt2img one.
    ids = page.evaluate(
        """() => [...document.querySelectorAll('[id^="quadtree-td"]')]
              .filter((el) => !el.parentElement.closest('[id="' + el.id + '"]'))
              .map((el) => el.id)"""
    )  # gradio 3 repeats some ids on an inner element: count the outermost only
    assert any(i.startswith("quadtree-td-txt2img") for i in ids), "the page holds both tabs"
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_accordion_opens_and_closes_and_enabled_toggles(page):
    enabled = page.locator("#quadtree-td-img2img-enabled")
    header = page.locator("#quadtree-td-img2img .label-wrap").first
    assert not enabled.is_visible()
    header.click()
    enabled.wait_for(state="visible")
    header.click()
    enabled.wait_for(state="hidden")
    header.click()
    box = enabled.locator("input[type=checkbox]")
    assert not box.is_checked()
    box.click()
    assert box.is_checked()
    box.click()
    assert not box.is_checked()


def test_sliders_carry_the_range_step_and_default_of_their_parameter(page):
    open_accordion(page)
    for p in PARAMETERS:
        if p.choices or p.names or p.text or p.image or p.kind is bool:
            continue
        for kind in ("number", "range"):
            field = page.locator(f"#quadtree-td-img2img-{p.name} input[type={kind}]")
            got = [float(field.get_attribute(a)) for a in ("min", "max", "step")]
            assert got == [p.minimum, p.maximum, p.step], (p.name, kind)
            assert float(field.input_value()) == p.default, (p.name, kind)


def test_the_upscaler_is_a_dropdown_at_none(page):
    open_accordion(page)
    dropdown = page.locator("#quadtree-td-img2img-upscaler input").first
    assert dropdown.input_value() == "None"


def test_radios_offer_the_choices_of_their_parameter(page):
    open_accordion(page)
    for p in PARAMETERS:
        if p.choices:
            radio = page.locator(f"#quadtree-td-img2img-{p.name}")
            assert radio.locator("input[type=radio]").count() == len(p.choices)
            for choice in p.choices:
                assert radio.get_by_label(choice, exact=True).count() == 1, (p.name, choice)
            assert radio.get_by_label(p.default, exact=True).is_checked()


def test_every_control_has_its_help_as_tooltip(page):
    for p in PARAMETERS:
        assert page.locator(f"#quadtree-td-img2img-{p.name}").get_attribute("title") == p.help, p.name


def test_preview_without_image_says_load_one(page):
    open_accordion(page)
    assert "Load an init image first" in click_preview(page)


def test_preview_shows_the_tiles_of_the_init_image(page):
    upload_init_image(page)
    open_accordion(page)
    text = click_preview(page)
    assert "tiles" in text and "skipped 0%" in text and "error" not in text.lower(), text
    page.locator("#quadtree-td-img2img-preview-image img").first.wait_for(state="visible")
    # the values the user sets reach the preview: 64 px tiles, skip them, vary the strength
    set_number(page, "min_tile", 64)
    set_number(page, "skip_below", 65)
    page.locator("#quadtree-td-img2img-variable_denoise input[type=checkbox]").check()
    text = click_preview(page)
    assert "64x64" in text and "skipped 0%" not in text, text
    # The detail map is a view option passed alongside the settings: the preview still works.
    page.locator("#quadtree-td-img2img-show-detail input[type=checkbox]").check()
    set_number(page, "min_tile", 128)
    text = click_preview(page)
    assert "tiles" in text and "64x64" not in text, text


def test_regions_and_words_reach_the_preview(page):
    upload_init_image(page)
    open_accordion(page)
    box = page.locator("#quadtree-td-img2img-regions textarea")
    box.fill("0 0 0.5 1: a red barn\n0.5 0 1 1: a wheat field")
    assert box.input_value().count("\n") == 1  # several lines
    assert "tiles" in click_preview(page)
    box.fill("0 0 0.5 1: a red barn\n0 0 1: oops")
    text = click_preview(page)
    assert "Settings error" in text and "regions: line 2" in text, text
    box.fill("")
    page.locator("#img2img_prompt textarea").fill("a red barn, sunny")
    page.locator("#quadtree-td-img2img-window_prompts").get_by_label(
        "Words where they are", exact=True
    ).check()
    text = click_preview(page)
    assert "placed 'a red barn' (stand-in)" in text, text


def test_bad_tile_sizes_show_the_settings_error(page):
    upload_init_image(page)
    open_accordion(page)
    set_number(page, "min_tile", 512)
    set_number(page, "max_tile", 512)
    text = click_preview(page)
    assert "Settings error" in text and "max_tile" in text, text


@pytest.mark.parametrize("stack", list(STACKS))
def test_controls_work_inside_the_webui_input_accordion(stack, browser, tmp_path):
    with serve(stack, tmp_path / "app.log", "--input-accordion") as url:
        page = new_page(browser, url)
        assert page.locator("#quadtree-td-img2img-enabled").count() == 0  # the accordion is the checkbox
        upload_init_image(page)
        page.locator("#quadtree-td-img2img .label-wrap").first.click()
        page.locator("#quadtree-td-img2img-method").wait_for(state="visible")
        assert "tiles" in click_preview(page)
        page.context.close()


@pytest.mark.parametrize("stack", list(STACKS))
def test_controls_start_at_their_declared_default_and_type(stack):
    # The WebUI's API converts an infotext value to type(control.value) unless it is one
    # already; the infotext tests' stand-in controls hold the declared defaults, as these do.
    python = REPO / f".venv-{stack}" / "bin" / "python"
    need(python.exists(), f"{python.parent.parent.name} is missing: run .ci/setup-ui")
    code = (
        "import gradio as gr\n"
        "from tiled_diffusion.ui import build_ui\n"
        "with gr.Blocks():\n"
        "    print(*(repr(c.value) for c in build_ui(gr)), sep='\\n')\n"
    )
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([str(python), "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.stdout.splitlines() == [repr(p.default) for p in PARAMETERS], run.stderr[-3000:]


def test_preview_hatches_what_a_strength_map_keeps(page, tmp_path):
    upload_init_image(page)
    open_accordion(page)
    with Image.open(DEFAULT_IMAGE) as init:
        size = init.size
    painted = Image.new("L", size, 255)
    painted.paste(0, (0, 0, size[0] // 2, size[1]))  # keep the left half
    path = tmp_path / "map.png"
    painted.save(path)
    page.locator("#quadtree-td-img2img-strength_map input[type=file]").set_input_files(str(path))
    page.locator("#quadtree-td-img2img-strength_map img").first.wait_for(state="visible")
    text = click_preview(page)
    assert "skipped 50% of the area" in text and "error" not in text.lower(), text
