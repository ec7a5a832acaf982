"""quant.tiny_models builds files that real ComfyUI detects, instantiates key-for-key, loads and samples."""

from __future__ import annotations

import json

import pytest
import torch

from comfy_support import FLUX_LATENT, WAN_LATENT, sampling_graph

from nvfp4_lab.quant.tiny_models import OUTLIER_FACTOR, tiny_flux, tiny_wan, write_tiny_model

FLUX_CASES = [dict(), dict(depth=1, depth_single=3, hidden=384, context_dim=768)]
WAN_CASES = [dict(), dict(dim=384, ffn_dim=1024, num_layers=2, text_dim=512, freq_dim=128)]


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


def _flux_kwargs(kw):
    depth, single = kw.get("depth", 2), kw.get("depth_single", 2)
    hidden, ctx = kw.get("hidden", 256), kw.get("context_dim", 1024)
    return dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=None, context_in_dim=ctx,
                hidden_size=hidden, mlp_ratio=4.0, num_heads=hidden // 128, depth=depth,
                depth_single_blocks=single, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
                guidance_embed=False, txt_ids_dims=[])


def _wan_kwargs(kw):
    dim = kw.get("dim", 256)
    return dict(model_type="t2v", dim=dim, ffn_dim=kw.get("ffn_dim", 512), num_layers=kw.get("num_layers", 4),
                num_heads=dim // 128, in_dim=16, out_dim=16, text_dim=kw.get("text_dim", 1024),
                freq_dim=kw.get("freq_dim", 256))


@pytest.mark.comfyui
@pytest.mark.parametrize("kw", FLUX_CASES)
def test_flux_matches_comfyui_class_and_detection(comfy, kw):
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    sd, meta = tiny_flux(**kw)
    with torch.device("meta"):
        ref = Flux(**_flux_kwargs(kw), operations=comfy.ops.disable_weight_init)
    assert _shapes(sd) == _shapes(ref.state_dict())
    assert list(sd) == list(ref.state_dict()), "same keys, also in the module's order"

    cfg = comfy.model_detection.model_config_from_unet(sd, "", metadata=meta)
    assert type(cfg).__name__ == "FluxSchnell"
    want = _flux_kwargs(kw)
    for key in ("hidden_size", "num_heads", "depth", "depth_single_blocks", "context_in_dim", "in_channels"):
        assert cfg.unet_config[key] == want[key], key
    assert cfg.unet_config["vec_in_dim"] is None and cfg.unet_config["guidance_embed"] is False
    with torch.device("meta"):  # what the loader would build from the file alone
        built = Flux(**cfg.unet_config, operations=comfy.ops.disable_weight_init)
    assert _shapes(built.state_dict()) == _shapes(sd)


@pytest.mark.comfyui
@pytest.mark.parametrize("kw", WAN_CASES)
def test_wan_matches_comfyui_class_and_detection(comfy, kw):
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    sd, meta = tiny_wan(**kw)
    with torch.device("meta"):
        ref = WanModel(**_wan_kwargs(kw), operations=comfy.ops.disable_weight_init)
    assert _shapes(sd) == _shapes(ref.state_dict())
    assert list(sd) == list(ref.state_dict())

    cfg = comfy.model_detection.model_config_from_unet(sd, "", metadata=meta)
    assert type(cfg).__name__ == "WAN21_T2V"
    want = _wan_kwargs(kw)
    for key in ("dim", "ffn_dim", "num_layers", "num_heads", "text_dim", "freq_dim", "in_dim", "out_dim"):
        assert cfg.unet_config[key] == want[key], key
    with torch.device("meta"):
        built = WanModel(**cfg.unet_config, operations=comfy.ops.disable_weight_init)
    assert _shapes(built.state_dict()) == _shapes(sd)


def test_deterministic_dtype_and_linear_dims():
    a, _ = tiny_flux(seed=3)
    b, _ = tiny_flux(seed=3)
    c, _ = tiny_flux(seed=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["txt_in.weight"], c["txt_in.weight"])
    assert {v.dtype for v in a.values()} == {torch.bfloat16}
    assert {v.dtype for v in tiny_wan(dtype=torch.float16)[0].values()} == {torch.float16}
    for sd, blocks in ((a, ("double_blocks.", "single_blocks.")), (tiny_wan()[0], ("blocks.",))):
        block_linears = [v for k, v in sd.items() if k.startswith(blocks) and k.endswith(".weight") and v.ndim == 2]
        assert len(block_linears) >= 8
        assert min(min(v.shape) for v in block_linears) >= 256


def test_norm_weights_are_one():
    sd, _ = tiny_wan()
    assert torch.equal(sd["blocks.0.self_attn.norm_q.weight"], torch.ones(256, dtype=torch.bfloat16))
    sd, _ = tiny_flux()
    assert torch.equal(sd["double_blocks.0.img_attn.norm.key_norm.weight"], torch.ones(128, dtype=torch.bfloat16))


def test_wan_metadata_config():
    _, meta = tiny_wan(text_dim=768)
    assert json.loads(meta["config"]) == {"transformer": {"text_dim": 768}}


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 128"):
        tiny_flux(hidden=200)
    with pytest.raises(ValueError, match="multiple of 128"):
        tiny_wan(dim=100)
    with pytest.raises(ValueError, match="matches no Linear"):
        tiny_flux(sensitive=["no_such_layer"])
    with pytest.raises(ValueError, match="cannot be made sensitive"):
        tiny_wan(sensitive=[r"blocks\.0\.ffn\.0"])
    with pytest.raises(ValueError, match="unknown tiny model kind"):
        write_tiny_model("sd3", "x.safetensors")


def test_write_replaces_unless_force_false(tmp_path):
    from safetensors import safe_open

    from nvfp4_lab.quant.errors import CheckpointError

    p = write_tiny_model("wan", tmp_path / "sub" / "w.safetensors", num_layers=1)
    write_tiny_model("wan", p, num_layers=2)
    with safe_open(p, "pt") as f:
        assert "blocks.1.ffn.2.weight" in f.keys()
        assert f.metadata()["config"] == '{"transformer": {"text_dim": 1024}}'
    with pytest.raises(CheckpointError, match="already exists"):
        write_tiny_model("wan", p, num_layers=1, force=False)
    assert [x.name for x in p.parent.iterdir()] == ["w.safetensors"], "no temp file left behind"


def _kurtosis(w):
    w = w.float().flatten()
    w = w - w.mean()
    return (w.pow(4).mean() / w.pow(2).mean() ** 2).item() - 3.0


@pytest.mark.parametrize("kind,layer,producer", [
    ("flux", "double_blocks.1.img_mlp.2", "double_blocks.1.img_mlp.0"),
    ("flux", "single_blocks.0.linear2", "single_blocks.0.linear1"),
    ("wan", "blocks.2.ffn.2", "blocks.2.ffn.0"),
    ("wan", "blocks.0.self_attn.o", "blocks.0.self_attn.v"),
])
def test_sensitive_layer_is_heavy_tailed_and_compensated(kind, layer, producer):
    build = tiny_flux if kind == "flux" else tiny_wan
    plain, _ = build()
    sens, meta = build(sensitive=[layer.replace(".", r"\.")])
    assert json.loads(meta["tiny_model"])["sensitive"] == [layer]
    changed = {k for k in plain if not torch.equal(plain[k], sens[k])}
    assert changed == {f"{layer}.weight", f"{producer}.weight", f"{producer}.bias"}
    assert _kurtosis(sens[f"{layer}.weight"]) > 20 > abs(_kurtosis(plain[f"{layer}.weight"])) + 1
    col_norm = sens[f"{layer}.weight"].float().norm(dim=0)
    in_f = col_norm.numel()
    top = col_norm.topk(in_f // 16).indices
    assert ((top // 16).unique().numel()) == in_f // 16, "one dominant input channel per 16-wide block"
    shrunk = (plain[f"{producer}.weight"].float().abs().sum(1) / sens[f"{producer}.weight"].float().abs().sum(1))
    assert ((shrunk - OUTLIER_FACTOR).abs() < 0.5).sum() == in_f // 16


def _nvfp4_roundtrip(w):
    ck = pytest.importorskip("comfy_kitchen")
    s = (w.abs().amax() / 2688).float()
    q, bs = ck.quantize_nvfp4(w, s)
    return ck.dequantize_nvfp4(q, s, bs, torch.float32)[: w.shape[0], : w.shape[1]]


def test_sensitive_layer_has_much_larger_nvfp4_error_on_its_real_inputs():
    """The point of `sensitive`: on inputs produced by the model, NVFP4 output error is several times larger."""
    gelu = torch.nn.GELU(approximate="tanh")
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    errors = {}
    for name, sens in (("plain", ()), ("sensitive", [r"blocks\.1\.ffn\.2"])):
        sd, _ = tiny_wan(sensitive=sens)
        w0, b0 = sd["blocks.1.ffn.0.weight"].float(), sd["blocks.1.ffn.0.bias"].float()
        w2 = sd["blocks.1.ffn.2.weight"].float()
        h = gelu(x @ w0.T + b0)  # the layer's real input
        y = h @ w2.T
        err = h @ (_nvfp4_roundtrip(sd["blocks.1.ffn.2.weight"]) - w2).T
        errors[name] = (err.norm() / y.norm()).item()
    assert errors["plain"] < 0.15
    assert errors["sensitive"] > 3 * errors["plain"], errors


@pytest.mark.comfyui
def test_sensitive_layer_dominates_model_output_error(comfy):
    """Quantizing one sensitive layer moves ComfyUI's Wan output several times more; the output scale is kept."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    g = torch.Generator().manual_seed(1)
    x, ctx, t = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 2, 1024, generator=g), torch.tensor([500.0])

    def forward(sd, quantize=None):
        sd = {k: v.float() for k, v in sd.items()}
        if quantize:
            sd[quantize + ".weight"] = _nvfp4_roundtrip(sd[quantize + ".weight"].bfloat16())
        net = WanModel(**_wan_kwargs({}), operations=comfy.ops.disable_weight_init)
        net.load_state_dict(sd)
        with torch.no_grad():
            return net(x, t, ctx)

    layer = "blocks.1.ffn.2"
    moved = {}
    for name, sens in (("plain", ()), ("sensitive", [r"blocks\.1\.ffn\.2"])):
        sd, _ = tiny_wan(sensitive=sens)
        ref = forward(sd)
        moved[name] = ((forward(sd, layer) - ref).norm() / ref.norm()).item()
        moved[name + "_std"] = ref.std().item()
    assert moved["sensitive"] > 2.5 * moved["plain"], moved
    assert 0.5 < moved["sensitive_std"] / moved["plain_std"] < 2, moved


# ---- through a real ComfyUI server ------------------------------------------------------------------------


@pytest.mark.comfyui
@pytest.mark.parametrize("kind,sensitive,latent,shape", [
    ("flux", (), FLUX_LATENT, (1, 16, 32, 32)),
    ("flux", (r"single_blocks\.\d+\.linear2", r"double_blocks\.0\.img_mlp\.2"), FLUX_LATENT, (1, 16, 32, 32)),
    ("wan", (), WAN_LATENT, (1, 16, 2, 8, 8)),
    ("wan", (r"blocks\.\d+\.ffn\.2",), WAN_LATENT, (1, 16, 2, 8, 8)),
], ids=["flux", "flux-sensitive", "wan", "wan-sensitive"])
def test_tiny_model_samples_in_comfyui(comfy_server, tmp_path, kind, sensitive, latent, shape):
    from safetensors.torch import load_file

    name = f"tiny_{kind}{'_sens' if sensitive else ''}.safetensors"
    path = write_tiny_model(kind, tmp_path / name, sensitive=sensitive)
    unet = comfy_server.upload_model(path)
    entry = comfy_server.run(sampling_graph(unet, latent, f"tests/{path.stem}"))
    (latent_file,) = comfy_server.output_files(entry, "latents")
    z = load_file(latent_file)["latent_tensor"]
    assert tuple(z.shape) == shape
    assert torch.isfinite(z).all()
    assert z.float().std() > 0
