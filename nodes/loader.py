"""Load Model (NVFP4): a diffusion model as ComfyUI's UNETLoader loads it, plus the SOURCE the other nodes read.

Single files go through `comfy.sd.load_diffusion_model`, exactly like UNETLoader (same MODEL, same
`cached_patcher_init`). Sharded models (a `*.safetensors.index.json` below a diffusion_models folder) are read with
the pack's checkpoint reader into one state dict and handed to `comfy.sd.load_diffusion_model_state_dict`.
Memory: a sharded model is materialised in RAM once (every tensor, as stored) before ComfyUI builds the model from
it, i.e. about the model's file size on top of what ComfyUI itself holds until the state dict is released; single
files are memory-mapped by ComfyUI as usual.
"""

from __future__ import annotations

import dataclasses
import logging

from comfy_api.latest import io

from .types import (CATEGORY, Source, describe_source, inside_model_folders, list_models, resolve_model,
                    stamp_of)

log = logging.getLogger("nvfp4_lab.nodes")

WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]


def model_options_for(weight_dtype: str) -> dict:
    """UNETLoader's mapping of its weight_dtype choice to model_options."""
    import torch

    options: dict = {}
    if weight_dtype in ("fp8_e4m3fn", "fp8_e4m3fn_fast"):
        options["dtype"] = torch.float8_e4m3fn
        if weight_dtype == "fp8_e4m3fn_fast":
            options["fp8_optimizations"] = True
    elif weight_dtype == "fp8_e5m2":
        options["dtype"] = torch.float8_e5m2
    elif weight_dtype != "default":
        raise ValueError(f"weight_dtype {weight_dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    return options


def load_sharded_diffusion_model(index_path: str, model_options: dict | None = None, disable_dynamic: bool = False):
    """A sharded diffusion model (index or folder) as a ModelPatcher; also its `cached_patcher_init` factory, so
    ComfyUI can rebuild it (non-dynamic delegates) the same way it rebuilds single-file models."""
    import comfy.sd

    from ..quant.checkpoint import open_checkpoint

    model_options = dict(model_options or {})
    with open_checkpoint(index_path) as ckpt:
        metadata = dict(ckpt.metadata)
        sd = {ckpt.prefix + name: ckpt.tensor(name) for name in ckpt.names()}
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=model_options, metadata=metadata,
                                                     disable_dynamic=disable_dynamic)
    del sd
    if model is None:
        raise RuntimeError(f"ComfyUI could not detect the model type of {index_path}")
    model.cached_patcher_init = (load_sharded_diffusion_model, (str(index_path), model_options))
    return model


def load_model_file(path, weight_dtype: str = "default"):
    """(MODEL, ModelSource) for a model file, a sharded index or its folder."""
    import comfy.sd

    source = describe_source(path)
    options = model_options_for(weight_dtype)
    if source.kind == "sharded":
        model = load_sharded_diffusion_model(source.path, options)
    elif source.kind == "gguf":
        from ..quant.errors import CheckpointError

        raise CheckpointError(f"{source.name}: GGUF files cannot be loaded by stock ComfyUI; they can guide a plan "
                              "(Build Plan's gguf input) but not be loaded or converted")
    else:
        model = comfy.sd.load_diffusion_model(source.path, model_options=options)
    return model, source


class NVFP4LoadModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NVFP4LoadModel",
            display_name="Load Model (NVFP4)",
            category=CATEGORY,
            description="Loads a diffusion model like UNETLoader (the MODEL works with KSampler) and also returns "
                        "its SOURCE, from which the plan/save/probe nodes read the original weights. Lists single "
                        "files and sharded models (*.safetensors.index.json) of the diffusion_models folders.",
            inputs=[
                io.Combo.Input("model_name", options=list_models(),
                               tooltip="A file or sharded index below models/diffusion_models (or models/unet)."),
                io.Combo.Input("weight_dtype", options=WEIGHT_DTYPES, default="default", advanced=True,
                               tooltip="As UNETLoader: the dtype ComfyUI stores plain weights in."),
                io.String.Input("model_path", optional=True, force_input=True,
                                tooltip="Optional: a model path from another node (e.g. Save NVFP4 Checkpoint's "
                                        "path) loaded instead of model_name; it must lie in a diffusion_models "
                                        "folder. Lets one workflow save a checkpoint and then sample with it."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), Source.Output(display_name="SOURCE")],
        )

    @classmethod
    def fingerprint_inputs(cls, model_name: str = "", **kwargs) -> tuple | None:
        return stamp_of(resolve_model, model_name)  # re-load when the file changed on disk

    @classmethod
    def execute(cls, model_name: str, weight_dtype: str = "default", model_path: str | None = None) -> io.NodeOutput:
        if model_path:
            path = inside_model_folders(model_path)
            name = path.name
        else:
            path = resolve_model(model_name)
            name = model_name
        model, source = load_model_file(path, weight_dtype)
        source = dataclasses.replace(source, name=name)
        log.info("Load Model (NVFP4): %s", source.describe())
        return io.NodeOutput(model, source)
