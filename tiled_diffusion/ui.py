"""The WebUI controls, generated from `settings.PARAMETERS`, and the tiles preview.

Host-agnostic: gradio comes in as the `gr` argument, so the same code builds under
A1111's gradio 3.41 and Forge's gradio 4.40, and nothing here imports the WebUI.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from .plan import build_plan
from .preview import draw_plan, karras_sigmas
from .quadtree import LATENT_SCALE, to_rgb_array
from .settings import (
    JOB_STRENGTH,
    PARAMETERS,
    PARAMETERS_BY_NAME,
    TITLE,
    WINDOW_PROMPTS,
    Settings,
    SettingsError,
)
from .strength import fit_to_job, on_latent_grid, repainted_share, with_inpaint_mask

ELEM_ID = "quadtree-td"  # + the tab: the WebUI builds the script once per tab on one page
TABS = ("txt2img", "img2img")
REGION_EXAMPLE = "0 0 0.5 1: a red barn\n0.5 0 1 1: a wheat field"  # the regions box's placeholder
PREVIEW_STEPS = 20  # steps of the Karras schedule that sets the tiles' start sigmas in the preview

# Rows of controls, group by group; every parameter but "enabled" appears exactly once.
ROWS = {
    "tiles": (
        ("method", "tile_batch"),
        ("detail_threshold",),
        ("min_tile", "max_tile"),
        ("overlap", "min_window"),
    ),
    "skip": (("skip_below", "skip_mode"),),
    "variable denoise": (("variable_denoise",), ("denoise_largest", "denoise_smallest")),
    "prompts": (("window_prompts",), ("regions",)),
    "where": (("strength_map",),),
    "upscale": (("upscaler", "scale_factor"),),
    "vae": (("tiled_vae",), ("vae_tile_above", "vae_tile")),
}
NOTES = {"variable denoise": JOB_STRENGTH}
IMG2IMG_ONLY = ("where", "upscale")  # groups hidden in txt2img (their values stay in the args)


def build_ui(
    gr,
    *,
    tab: str = "img2img",
    accordion=None,
    init_image=None,
    width=None,
    height=None,
    upscalers=None,
    prompt=None,
    place_words=None,
    notes_pasted: list | None = None,
    inpaint_inputs: list | None = None,
    read_inpaint=None,
) -> list:
    """Build the controls inside the current gradio Blocks; return them in PARAMETERS order.

    tab: "txt2img" or "img2img". Element ids carry it (quadtree-td-img2img-min_tile): the
        WebUI's accordion script finds its checkbox by id, so ids must be unique on the page.

    accordion: the WebUI's InputAccordion class (A1111 1.7+, Forge), whose accordion is the
        enabled checkbox itself; None builds a plain gr.Accordion with a checkbox inside.
    init_image, width, height: the host's components the preview reads, where they exist.
    upscalers: the names of the host's upscalers (the Upscaler choices); the upscale step is
        img2img's, so its controls are hidden in txt2img (they stay in the args list).
    prompt, place_words: the tab's prompt box and the host's phrase placement (hosts/words.py
        `preview`), so that Preview tiles shows where "Words where they are" puts each phrase.
    inpaint_inputs, read_inpaint: the host's inpaint components (selected tab, editors, mask
        options) and read_inpaint(*their values) -> `preview_tiles`'s inpaint dict, or None
        when no inpaint tab is open (hosts/where.py `inpaint_preview`).
    notes_pasted: receives (component, reader) pairs for the WebUI's infotext fields that are
        not script args: the note that a pasted job used a strength map, which an infotext
        cannot carry (only its digest).
    """
    controls = {}
    prefix = f"{ELEM_ID}-{tab}"

    def elem_id(name: str) -> str:
        return f"{prefix}-{name}"

    if accordion is not None:
        box = accordion(False, label=TITLE, elem_id=prefix)
    else:
        box = gr.Accordion(TITLE, open=False, elem_id=prefix)
    with box:
        enabled = PARAMETERS_BY_NAME["enabled"]
        controls["enabled"] = box if accordion is not None else _control(gr, enabled, elem_id(enabled.name))
        for group, rows in ROWS.items():
            with gr.Group(visible=group not in IMG2IMG_ONLY or tab == "img2img"):
                for row in rows:
                    with gr.Row():
                        for name in row:
                            controls[name] = _control(gr, PARAMETERS_BY_NAME[name], elem_id(name), upscalers)
            if group in NOTES:
                gr.Markdown(NOTES[group], elem_id=elem_id(group.replace(" ", "_") + "-note"))
            if group == "where":
                pasted = gr.Markdown(value="", elem_id=elem_id("strength_map-pasted"))
                if notes_pasted is not None:
                    notes_pasted.append((pasted, pasted_map_note))
        with gr.Row():
            button = gr.Button("Preview tiles", elem_id=elem_id("preview"))
            # A view option, not a setting: it changes the preview, never the job.
            show_detail = gr.Checkbox(False, label="Show detail map", elem_id=elem_id("show-detail"))
        summary = gr.Markdown("", elem_id=elem_id("summary"))
        picture = gr.Image(type="pil", interactive=False, show_label=False, elem_id=elem_id("preview-image"))
    components = [controls[p.name] for p in PARAMETERS]
    extras = {"image": init_image, "width": width, "height": height, "prompt": prompt}
    given = [key for key, component in extras.items() if component is not None]

    inpaint_inputs = list(inpaint_inputs or []) if read_inpaint else []

    def on_preview(detail, *args):
        known = dict(zip(given, args))
        image, width, height, text = (known.get(key) for key in extras)
        args = args[len(given) :]
        inpaint = read_inpaint(*args[: len(inpaint_inputs)]) if inpaint_inputs else None
        return preview_tiles(
            image,
            width,
            height,
            *args[len(inpaint_inputs) :],
            show_detail=detail,
            prompt=text,
            place_words=place_words,
            inpaint=inpaint,
        )

    inputs = [show_detail] + [extras[key] for key in given] + inpaint_inputs + components
    button.click(on_preview, inputs=inputs, outputs=[picture, summary])
    return components


def pasted_map_note(params: dict) -> str:
    """What pasting a job's infotext says about its strength map (an infotext holds only the
    map's digest, so the picture must be loaded again to repeat the job)."""
    used = params.get(PARAMETERS_BY_NAME["strength_map"].infotext_key)
    if not used:
        return ""
    return (
        f"The pasted job used the strength map **{used}**: load the same picture above to repeat it "
        "(an infotext holds only the map's digest; the job records the digest of the map it gets)."
    )


def _control(gr, p, elem_id: str, upscalers=None):
    """The gradio control of one parameter: slider, radio, dropdown or checkbox."""
    if p.names:  # the host's upscalers
        names = list(upscalers or [p.default])
        return gr.Dropdown(names, value=p.default, label=p.label, elem_id=elem_id)
    if p.image:
        return gr.Image(label=p.label, type="pil", image_mode="L", height=160, elem_id=elem_id)
    if p.text:
        return gr.Textbox(
            value=p.default, label=p.label, lines=3, placeholder=REGION_EXAMPLE, elem_id=elem_id
        )
    if p.choices:
        return gr.Radio(list(p.choices), value=p.default, label=p.label, elem_id=elem_id)
    if p.kind is bool:
        return gr.Checkbox(value=p.default, label=p.label, elem_id=elem_id)
    return gr.Slider(
        minimum=p.minimum,
        maximum=p.maximum,
        step=p.step,
        value=p.default,
        label=p.label,
        elem_id=elem_id,
    )


def preview_tiles(
    image, width, height, *values, show_detail=False, prompt=None, place_words=None, inpaint=None
) -> tuple[Image.Image | None, str]:
    """The plan drawn over the image (or its detail map) at the job's size, and its summary.

    values: the controls' values in PARAMETERS order. A missing or unreadable image and a
    settings error come back as a message, never as an exception. With "Words where they
    are", place_words(image, latent_size, prompt) -> (placed, lines) places the prompt's
    phrases with the host's model (None outside a WebUI: the plan is shown without them).
    inpaint: the inpaint tab's picture and mask when that tab is open, {"image", "mask",
    "blur", "invert", "only_masked"}; the tiles the mask keeps are hatched.
    """
    lines = []
    if inpaint is not None:
        image = inpaint["image"]
        if inpaint.get("only_masked"):
            lines.append("Only masked: the job plans its tiles over the crop around the mask.")
    if not isinstance(image, (Image.Image, np.ndarray)):  # None, or a host component that is no image
        return None, "Load an init image first."
    try:
        settings = Settings(**dict(zip((p.name for p in PARAMETERS), values)))
        image = Image.fromarray(to_rgb_array(image))
    except SettingsError as error:
        return None, _escape(f"Settings error: {error}")
    except ValueError as error:  # an image the plan cannot read: empty, NaN, an odd shape
        return None, _escape(f"Image error: {error}")
    source_size = image.size  # the strength map is painted over the init image
    if settings.upscaler != "None":  # the job runs at the upscaled size (Lanczos stands in here)
        width, height = (own * settings.scale_factor for own in image.size)
    width, height = (_job_side(side or own) for side, own in ((width, image.width), (height, image.height)))
    image = image.resize((width, height), Image.Resampling.LANCZOS)  # "Just resize", as the job does
    sigmas = karras_sigmas(PREVIEW_STEPS) if settings.variable_denoise else None
    latent_size = (height // LATENT_SCALE, width // LATENT_SCALE)
    placed = None
    if settings.window_prompts == WINDOW_PROMPTS[1]:
        if place_words is None or not (prompt or "").strip():
            lines.append("Words where they are: the phrases are placed by the model when the job runs.")
        else:
            try:
                placed, found = place_words(image, latent_size, prompt)
            except Exception as error:  # noqa: BLE001 - a preview shows the error, never raises
                found = [f"could not place the phrases ({type(error).__name__}: {error})"]
            lines += [f"Words where they are: {line}" for line in found]
    strengths = None
    if settings.strength_map is not None:
        try:
            fitted = fit_to_job(settings.strength_map, source_size, (width, height))
        except SettingsError as error:
            return None, _escape(f"Settings error: {error}")
        strengths = on_latent_grid(fitted, latent_size)
    repainted = None
    if inpaint is not None and inpaint.get("mask") is not None:
        mask, blur, invert = inpaint["mask"], inpaint.get("blur", 0), inpaint.get("invert")
        share = repainted_share(mask, (width, height), blur, invert)
        repainted = on_latent_grid(share, latent_size)
        strengths = with_inpaint_mask(strengths, repainted, latent_size)
    plan = build_plan(
        image, settings, latent_size, sigmas, placed=placed, pixel_strength=strengths, inpaint_mask=repainted
    )
    plan.notes.extend(lines)
    return draw_plan(image, plan, show_detail), _escape(" ".join([plan.summary(), *lines]))


def _job_side(px) -> int:
    """A side of the job in px: rounded down to the latent grid, at least one latent pixel."""
    return max(LATENT_SCALE, int(px) // LATENT_SCALE * LATENT_SCALE)


def _escape(text: str) -> str:
    """Markdown-safe text: parameter names such as max_tile keep their underscores."""
    return text.replace("_", "\\_").replace("*", "\\*")


def tooltips_js() -> str:
    """The content of javascript/quadtree_tiled_diffusion.js: every control's help as its tooltip."""
    help_text = json.dumps({p.name: p.help for p in PARAMETERS}, indent=4, ensure_ascii=False)
    help_text = help_text.replace("\n", "\n    ")
    return f"""\
// Tooltips of Quadtree Tiled Diffusion: each control's title is its help text.
// Generated by tiled_diffusion.ui.tooltips_js() from tiled_diffusion/settings.py;
// do not edit by hand (tests/test_ui.py checks that the two agree).
(function () {{
    const help = {help_text};

    function addTooltips() {{
        const root = typeof gradioApp === "function" ? gradioApp() : document;
        for (const tab of {json.dumps(list(TABS))}) {{
            for (const [name, text] of Object.entries(help)) {{
                const ids = ["{ELEM_ID}-" + tab + "-" + name];
                if (name === "enabled") {{
                    ids.push("{ELEM_ID}-" + tab + "-visible-checkbox"); // the WebUI's InputAccordion checkbox
                }}
                for (const id of ids) {{
                    // gradio 3 repeats some ids on inner elements: set every match.
                    root.querySelectorAll('[id="' + id + '"]').forEach((el) => {{
                        el.title = text;
                    }});
                }}
            }}
        }}
    }}

    if (typeof onUiLoaded === "function") {{
        onUiLoaded(addTooltips);
    }} else if (document.readyState === "loading") {{
        document.addEventListener("DOMContentLoaded", addTooltips);
    }} else {{
        addTooltips();
    }}
}})();
"""
