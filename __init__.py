"""ComfyUI's entry point: this repository is also a ComfyUI node pack.

ComfyUI imports `custom_nodes/<folder>/__init__.py`; A1111 and Forge load only `scripts/`
and never import this file. The nodes live in tiled_diffusion/hosts/comfyui_nodes.py.
"""

if __package__:  # ComfyUI imports the folder as a package
    from .tiled_diffusion.hosts.comfyui_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # a plain module: pytest imports it so when the clone's folder name is no Python name
    from tiled_diffusion.hosts.comfyui_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
