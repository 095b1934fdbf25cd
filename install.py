"""Run by the WebUI when the extension is installed or updated.

Nothing to install: the extension needs only torch, numpy, pillow and gradio, which the
WebUI already has. (No requirements file is processed either: installing torch here
would replace the WebUI's own build.)
"""
