"""A tiny gradio page with the extension's controls, for tests/test_ui.py.

Run with a gradio venv's python: `python tests/ui_app.py PORT [--input-accordion]`. It
stands in for the WebUI's img2img tab (an init image, width and height), adds the controls
(in the plain accordion, or in a stand-in for the WebUI's InputAccordion), loads the
tooltips script as the WebUI would, prints a ready line and blocks.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gradio as gr  # noqa: E402

from tests.stand_in_words import corner_words  # noqa: E402
from tiled_diffusion.ui import build_ui  # noqa: E402


def input_accordion_class():
    """A stand-in for the WebUI's InputAccordion: a hidden checkbox that is the enabled value,
    entered as the accordion holding the controls (A1111 1.7+ and Forge work this way)."""
    if not gr.__version__.startswith("3."):
        # gradio 4 writes a .pyi stub beside the source of every new component class; Forge
        # patches that out for its own InputAccordion, and so does this stand-in.
        import gradio.component_meta

        gradio.component_meta.create_or_modify_pyi = lambda *args: None

    class InputAccordion(gr.Checkbox):
        def __init__(self, value, **kwargs):
            elem_id = kwargs.pop("elem_id")
            super().__init__(value, visible=False, elem_id=f"{elem_id}-checkbox", **kwargs)
            self.accordion = gr.Accordion(kwargs["label"], open=value, elem_id=elem_id)

        def __enter__(self):
            self.accordion.__enter__()
            return self

        def __exit__(self, *exc):
            self.accordion.__exit__(*exc)

        def get_block_name(self):
            return "checkbox"

    return InputAccordion


def main(port: int, input_accordion: bool) -> None:
    accordion = input_accordion_class() if input_accordion else None
    with gr.Blocks(title="Quadtree Tiled Diffusion test page") as demo:
        # Like the WebUI, the page holds the script twice: once per tab.
        with gr.Tab("img2img"):
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="img2img_prompt")
            image = gr.Image(type="pil", label="Init image", elem_id="img2img_image")
            with gr.Row():
                width = gr.Slider(64, 2048, step=8, value=512, label="Width", elem_id="img2img_width")
                height = gr.Slider(64, 2048, step=8, value=512, label="Height", elem_id="img2img_height")
            components = build_ui(
                gr,
                tab="img2img",
                accordion=accordion,
                init_image=image,
                width=width,
                height=height,
                prompt=prompt,
                place_words=corner_words,
            )
        with gr.Tab("txt2img"):
            build_ui(gr, tab="txt2img", accordion=accordion)
        assert not input_accordion or isinstance(components[0], accordion), "enabled must be the accordion"
        script = (REPO / "javascript" / "quadtree_tiled_diffusion.js").read_text(encoding="utf-8")
        js_key = "_js" if gr.__version__.startswith("3.") else "js"  # renamed in gradio 4
        demo.load(None, None, None, **{js_key: "() => {" + script + "}"})
    demo.queue()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    print(f"ready on http://127.0.0.1:{port} with gradio {gr.__version__}", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(int(sys.argv[1]), "--input-accordion" in sys.argv[2:])
