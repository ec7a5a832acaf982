"""NVFP4 Lab: a ComfyUI node pack (and the `nvfp4_lab` Python package) for mixed-precision NVFP4 checkpoints.

Importing this module must stay cheap and must not import ComfyUI: the core (`quant`, `calibration`) is used from
plain Python and the CLI. ComfyUI finds the nodes through `comfy_entrypoint` (V3 API).
"""

__version__ = "0.1.0"

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """V3 entry point: ComfyUI awaits this and asks the extension for its node list."""
    from .nodes import NVFP4LabExtension

    return NVFP4LabExtension()
