"""What the WebUI benchmarks share: a request to a running WebUI's API, the bundled photo."""

from __future__ import annotations

import base64
import io
import json
import urllib.request
from pathlib import Path

from PIL import Image

PHOTO = Path(__file__).resolve().parent.parent / "tiled_diffusion" / "data" / "astronaut.jpg"


def post(url: str, payload: dict, route: str = "/sdapi/v1/img2img") -> tuple[int, dict]:
    """(HTTP status, JSON body) of one request; an error body is cut to its start."""
    request = urllib.request.Request(
        url + route, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=7200) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, {"error": error.read()[:300].decode(errors="replace")}


def photo_png(size: int) -> str:
    """The bundled photo at size x size px, as the base64 PNG an init image is sent as."""
    buffer = io.BytesIO()
    Image.open(PHOTO).convert("RGB").resize((size, size), Image.Resampling.LANCZOS).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()
