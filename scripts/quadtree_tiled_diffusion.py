"""Quadtree Tiled Diffusion: the WebUI script (A1111 1.10 and Forge). UI and glue only."""

from __future__ import annotations

import functools
import os
import sys
import traceback

import gradio as gr
from modules import script_callbacks, scripts

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:  # a broken install must never stop the WebUI from starting
    from tiled_diffusion.hosts import api, webui, where, words, xyz
    from tiled_diffusion.settings import PARAMETERS
    from tiled_diffusion.ui import build_ui

    IMPORT_ERROR = None
except Exception:  # noqa: BLE001 - any failure is shown in the UI instead
    IMPORT_ERROR = traceback.format_exc()
    print(f"Quadtree Tiled Diffusion could not load:\n{IMPORT_ERROR}", file=sys.stderr)

try:
    from modules.ui_components import InputAccordion
except ImportError:  # WebUIs before 1.7: a plain accordion with a checkbox
    InputAccordion = None

TITLE = "Quadtree Tiled Diffusion"  # = settings.TITLE; spelled here too so a failed import still shows it

# The img2img tab's inpaint components Preview tiles reads (hosts/where.py inpaint_preview),
# by the WebUIs' elem_ids (Forge's canvases by their block's elem_id and layer), and the
# names inpaint_preview knows them by.
INPAINT_NAMES = {
    "img2img_selected_tab": "tab",
    "img2maskimg": "inpaint",
    "img2maskimg_background": "inpaint_background",
    "img2maskimg_foreground": "inpaint_foreground",
    "inpaint_sketch": "sketch",
    "inpaint_sketch_background": "sketch_background",
    "inpaint_sketch_foreground": "sketch_foreground",
    "img_inpaint_base": "upload_image",
    "img_inpaint_mask": "upload_mask",
    "img2img_mask_blur": "mask_blur",
    "img2img_mask_mode": "mask_mode",
    "img2img_inpaint_full_res": "inpaint_area",
}
INPAINT_SOURCES = (
    "img2maskimg",
    "inpaint_sketch",
    "img_inpaint_base",
    "img_inpaint_mask",
    "img2img_mask_blur",
    "img2img_mask_mode",
    "img2img_inpaint_full_res",
)


class Script(scripts.Script):
    def __init__(self):
        super().__init__()
        self.job = None
        self.preparation = None
        self.sources = {}  # the init image and size controls of this tab, for Preview tiles
        self.canvas = None  # Forge: the elem_id of the ForgeCanvas being built
        for elem_id in (
            "img2img_image",
            "img2img_width",
            "img2img_height",
            "img2img_prompt",
            "txt2img_width",
            "txt2img_height",
            "txt2img_prompt",
            *INPAINT_SOURCES,
        ):
            self.on_after_component(
                lambda on, elem_id=elem_id: self.sources.update({elem_id: on.component}), elem_id=elem_id
            )

    def after_component(self, component, **kwargs):
        # Forge's images are ForgeCanvases: the elem_id names the canvas's HTML block, made first,
        # and the picture and the painted layer live in the two Images made after it.
        elem_id = kwargs.get("elem_id")
        if elem_id in ("img2img_image", "img2maskimg", "inpaint_sketch"):
            self.canvas = elem_id
        classes = kwargs.get("elem_classes") or []
        for layer in ("background", "foreground"):
            if f"logical_image_{layer}" in classes and self.canvas:
                self.sources.setdefault(f"{self.canvas}_{layer}", component)
        # The img2img tabs' hidden index (no elem_id): the first hidden Number after the prompt.
        hidden_number = type(component).__name__ == "Number" and kwargs.get("visible") is False
        if hidden_number and "img2img_prompt" in self.sources and "img2img_selected_tab" not in self.sources:
            self.sources["img2img_selected_tab"] = component

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        if IMPORT_ERROR:
            gr.HTML(f"<pre>{TITLE} could not load:\n{IMPORT_ERROR}</pre>")
            return []
        tab = "img2img" if is_img2img else "txt2img"
        notes_pasted = []
        # The inpaint tabs' components this host has; without the tab index, no inpaint preview.
        inpaint = [key for key in INPAINT_NAMES if key in self.sources]
        if "img2img_selected_tab" not in inpaint:
            inpaint = []
        try:
            components = build_ui(
                gr,
                tab=tab,
                accordion=InputAccordion,
                init_image=self.sources.get("img2img_image_background", self.sources.get("img2img_image"))
                if is_img2img
                else None,
                width=self.sources.get(f"{tab}_width"),
                height=self.sources.get(f"{tab}_height"),
                upscalers=webui.upscaler_names(),
                prompt=self.sources.get(f"{tab}_prompt"),
                place_words=words.preview,
                notes_pasted=notes_pasted,
                inpaint_inputs=[self.sources[key] for key in inpaint] if is_img2img else None,
                read_inpaint=functools.partial(
                    where.inpaint_preview, [INPAINT_NAMES[key] for key in inpaint]
                ),
            )
        except Exception:  # noqa: BLE001 - with --api, a script's ui() that raises stops the WebUI
            error = traceback.format_exc()
            print(f"{TITLE} could not build its controls:\n{error}", file=sys.stderr)
            gr.HTML(f"<pre>{TITLE} could not build its controls:\n{error}</pre>")
            return []
        # PNG Info, "Send to" and the API's `infotext` field restore every setting. A function
        # reads each value (the WebUI calls it on paste and in the API): given the key, the API
        # would convert the string with the control's type, and bool("False") is True.
        self.infotext_fields = [(c, p.read_infotext) for c, p in zip(components, PARAMETERS)] + notes_pasted
        self.paste_field_names = [p.read_infotext for p in PARAMETERS]  # "Send to" matches these by ==
        return components

    def before_process(self, p, *args):
        if IMPORT_ERROR:
            return
        # Before the WebUI resizes the init images and before any script's process().
        self.preparation = webui.prepare(p, args)

    def process(self, p, *args):
        if IMPORT_ERROR:
            return
        if self.job is not None:  # a previous job that ended in an exception
            self.job.finish()
        self.job = webui.start(p, args, self.preparation)

    def process_before_every_sampling(self, p, *args, **kwargs):
        if self.job is not None:
            self.job.before_sampling(p, kwargs["x"])

    def postprocess_image(self, p, pp, *args):
        if self.job is not None:
            self.job.postprocess_image(p, pp)

    def postprocess(self, p, processed, *args):
        if not IMPORT_ERROR:
            webui.forget_overrides(p)  # an X/Y/Z plot cell's values end with its job
        if self.preparation is not None:
            self.preparation.undo()  # e.g. the user's width, height and init images for the next job
            self.preparation = None
        if self.job is not None:
            self.job.finish()
            self.job = None


def add_xyz_axes():
    """Our axes in the X/Y/Z plot (the WebUI's own scripts/ load before extensions; the
    callback catches a plot script loaded later). Never stops the WebUI."""
    try:
        xyz.register(scripts.scripts_data, webui.upscaler_names)
    except Exception:  # noqa: BLE001 - the extension works without its axes
        print(f"{TITLE} could not add its X/Y/Z plot axes:\n{traceback.format_exc()}", file=sys.stderr)


if not IMPORT_ERROR:
    script_callbacks.on_app_started(lambda demo, app: api.add_validator(app, TITLE, webui.upscaler_names))
    add_xyz_axes()
    script_callbacks.on_before_ui(add_xyz_axes)
