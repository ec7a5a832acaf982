"""Converted tiny Flux and Wan models load in stock ComfyUI through UNETLoader as mixed-precision models, sample
with KSampler, and stay close to the bf16 original (CPU runs NVFP4 as W4A16: dequantize + float matmul)."""

from __future__ import annotations

import pytest
import torch
from comfy_support import FLUX_LATENT, WAN_LATENT, sampling_graph
from safetensors.torch import load_file

from nvfp4_lab.quant.checkpoint import open_checkpoint
from nvfp4_lab.quant.convert import convert
from nvfp4_lab.quant.rules import PlanOptions, build_plan
from nvfp4_lab.quant.tiny_models import write_tiny_model

MODELS = {
    "flux": ({"depth": 4, "depth_single": 6, "hidden": 256}, FLUX_LATENT),
    "wan": ({"num_layers": 6, "dim": 256, "ffn_dim": 512}, WAN_LATENT),
}



@pytest.mark.comfyui
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_converted_model_loads_and_samples_close_to_bf16(comfy_server, tmp_path, kind):
    kw, latent = MODELS[kind]
    src = write_tiny_model(kind, tmp_path / f"conv_{kind}_bf16.safetensors", **kw)
    with open_checkpoint(src) as ckpt:
        plan = build_plan(ckpt, PlanOptions(w4a16=[r"\.2\.", r"single_blocks\.3\."], allow_unmatched=True))
    out = tmp_path / f"conv_{kind}_nvfp4.safetensors"
    convert(src, out, plan, progress=False)
    assert plan.counts()["nvfp4"] > 0 and plan.counts().get("nvfp4-w4a16", 0) > 0

    runs = {}
    for label, path in (("bf16", src), ("nvfp4", out)):
        unet = comfy_server.upload_model(path)
        entry = comfy_server.run(sampling_graph(unet, latent, f"conv/{path.stem}"))
        (latent_file,) = comfy_server.output_files(entry, "latents")
        runs[label] = load_file(latent_file)["latent_tensor"].float()
    ref, got = runs["bf16"], runs["nvfp4"]
    assert torch.isfinite(got).all()
    cosine = torch.nn.functional.cosine_similarity(ref.flatten(), got.flatten(), dim=0)
    rel = (got - ref).norm() / ref.norm()
    assert cosine > 0.98 and rel < 0.2, (float(cosine), float(rel))
    assert not torch.equal(ref, got)  # the quantized layers really ran
    assert "mixed precision" in comfy_server.log_text().lower()
