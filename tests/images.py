"""Pictures for tests: as the API carries them."""

from __future__ import annotations

import base64
import io

from PIL import Image


def png_base64(image: Image.Image) -> str:
    """An image as the base64 PNG text of an API payload."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
