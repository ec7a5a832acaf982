"""ComfyUI V3 nodes: thin wrappers over `quant` and `calibration`. Imported only by `comfy_entrypoint`."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


class NVFP4LabExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .registry import node_classes

        return node_classes()
