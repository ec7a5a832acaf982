"""quant.gguf_guide: GGUF type -> format mapping, name mapping, mismatch reports, refusal of another model's GGUF,
and keep-edge-blocks on every block group (Flux double + single blocks)."""

from __future__ import annotations

import pytest
from plan_fakes import FakeCheckpoint, flux_tensors, wan_q5_k_m_layout, wan_tensors, write_gguf

from nvfp4_lab.quant import formats
from nvfp4_lab.quant.checkpoint import open_checkpoint
from nvfp4_lab.quant.errors import PlanError
from nvfp4_lab.quant.gguf_guide import (KEEP, KEEP_FP32, gguf_type_bits, guide_from_gguf, strip_gguf_name,
                                        type_histogram)
from nvfp4_lab.quant.rules import PlanOptions, build_plan

NV, W4, FP8 = formats.NVFP4, formats.NVFP4_W4A16, formats.FP8


@pytest.mark.parametrize("t, bits", [("Q4_K", 4), ("Q4_0", 4), ("IQ4_XS", 4), ("Q5_K", 5), ("Q6_K", 6),
                                     ("Q8_0", 8), ("IQ2_XXS", 2), ("TQ1_0", 1), ("MXFP4", 4), ("gguf:Q3_K", 3),
                                     ("F16", None), ("BF16", None), ("F32", None), ("I32", None)])
def test_type_bits(t, bits):
    assert gguf_type_bits(t) == bits


def test_strip_names():
    assert strip_gguf_name("model.diffusion_model.blocks.0.ffn.0.weight") == "blocks.0.ffn.0.weight"
    assert strip_gguf_name("diffusion_model.blocks.0.ffn.0.weight") == "blocks.0.ffn.0.weight"
    assert strip_gguf_name("blk.0.x", [(r"^blk\.", "blocks.")]) == "blocks.0.x"


def small_wan(blocks=6):
    model = wan_tensors(blocks)
    linear = {n[: -len(".weight")]: s for n, (s, _) in model.items() if n.endswith(".weight") and len(s) == 2}
    shapes = {n: s for n, (s, _) in model.items()}
    return model, shapes, linear


def layout(model, **types):
    """GGUF layout: Q5_K_M by default, with per-tensor overrides {name: type}."""
    lay = wan_q5_k_m_layout(model)
    for name, t in types.items():
        lay[name] = (lay[name][0], t)
    return lay


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_mapping_and_choices(tmp_path, prefix):
    model, shapes, linear = small_wan()
    lay = layout(model, **{"blocks.2.ffn.0.weight": "Q4_0", "blocks.2.self_attn.q.weight": "Q8_0",
                           "blocks.3.self_attn.q.weight": "BF16", "blocks.3.self_attn.k.weight": "F32"})
    path = write_gguf(tmp_path / "m.gguf", lay, prefix=prefix)
    with open_checkpoint(path) as g:
        guide = guide_from_gguf(g, shapes, linear, max_bits=4)
    c = guide.choices
    assert c["blocks.2.ffn.0"].kind == NV and c["blocks.2.ffn.0"].gguf_type == "Q4_0"
    assert c["blocks.2.ffn.2"].kind == KEEP                     # Q6_K > Q4, fp8 not allowed
    assert c["blocks.3.ffn.0"].kind == KEEP and "fp8 not allowed" in c["blocks.3.ffn.0"].reason   # Q5_K > Q4
    assert c["blocks.2.self_attn.q"].kind == KEEP               # Q8_0
    assert c["blocks.3.self_attn.q"].kind == KEEP               # BF16
    assert c["blocks.3.self_attn.k"].kind == KEEP_FP32          # F32
    assert c["head.head"].kind == KEEP                          # F16
    assert "patch_embedding.weight" in guide.fp32_tensors       # 5-D, stored 4-D with orig_shape
    assert "blocks.0.norm3.weight" in guide.fp32_tensors
    assert not guide.missing and not guide.extra
    assert type_histogram(guide)["Q5_K"] == 6 * 7 - 4      # 4 overridden above
    guide5 = guide_from_gguf(path, shapes, linear, max_bits=5, allow_fp8=True)
    assert guide5.choices["blocks.3.ffn.0"].kind == NV and guide5.choices["blocks.2.ffn.2"].kind == FP8
    assert guide5.choices["blocks.2.self_attn.q"].kind == FP8


def test_mismatches_are_reported_not_dropped(tmp_path):
    model, shapes, linear = small_wan()
    lay = layout(model)
    del lay["blocks.4.ffn.0.weight"], lay["blocks.5.cross_attn.q.weight"]
    lay["extra_adapter.0.weight"] = ((64, 256), "Q4_0")
    lay["blocks.3.self_attn.o.weight"] = ((64, 256), "I32")
    path = write_gguf(tmp_path / "m.gguf", lay)
    guide = guide_from_gguf(path, shapes, linear, max_bits=5)
    assert guide.missing == ["blocks.4.ffn.0", "blocks.5.cross_attn.q"]
    assert guide.extra == ["extra_adapter.0.weight"]
    assert guide.other_types == {"blocks.3.self_attn.o": "I32"}
    notes = "\n".join(guide.notes())
    assert "2 Linear layer(s) of the model are not in the GGUF and are kept: blocks.4.ffn.0, blocks.5.cross_attn.q" \
        in notes
    assert "1 GGUF tensor(s) are not in the model (ignored): extra_adapter.0.weight" in notes
    assert "blocks.3.self_attn.o (I32)" in notes
    # through build_plan: kept with a reason, and the notes reach the plan report
    ck = FakeCheckpoint(model)
    p = build_plan(ck, PlanOptions(gguf=str(path), gguf_max_bits=5))
    assert p.layers["blocks.4.ffn.0"].format == "fp32" and p.layers["blocks.4.ffn.0"].reason == "gguf: not in m.gguf"
    assert p.layers["blocks.3.self_attn.o"].reason.startswith("gguf: unmapped type I32")
    assert any("not in the GGUF" in n for n in p.notes)
    assert p.report["gguf"]["missing"] == 2 and p.report["gguf"]["extra"] == 1


def test_shape_mismatch_refused(tmp_path):
    model, shapes, linear = small_wan()
    lay = layout(model)
    lay["blocks.2.ffn.0.weight"] = ((96, 256), "Q5_K")
    path = write_gguf(tmp_path / "other.gguf", lay)
    with pytest.raises(PlanError, match=r"GGUF of a different model: 1 Linear weight shape\(s\) differ, e.g. "
                                        r"blocks.2.ffn.0 is \[96, 256\] in the GGUF but \[128, 256\]"):
        guide_from_gguf(path, shapes, linear)


def test_low_overlap_refused(tmp_path):
    model, shapes, linear = small_wan()
    other = flux_tensors()
    lay = {n: (s, "Q4_0") for n, (s, _) in other.items() if len(s) == 2}
    path = write_gguf(tmp_path / "flux.gguf", lay, arch="flux")
    with pytest.raises(PlanError, match=r"only 0 of 66 Linear layers .* match by name \(need >= 50%\)"):
        guide_from_gguf(path, shapes, linear)
    # a GGUF holding only a third of the model's layers is refused as well
    lay = layout(model)
    few = {n: v for n, v in lay.items() if not n.startswith(("blocks.2", "blocks.3", "blocks.4", "blocks.5",
                                                             "blocks.1."))}
    path = write_gguf(tmp_path / "part.gguf", few)
    with pytest.raises(PlanError, match="different model"):
        guide_from_gguf(path, shapes, linear)


def test_gguf_option_must_be_a_gguf(tmp_path):
    model, shapes, linear = small_wan()
    fake = FakeCheckpoint(model, kind="safetensors")
    with pytest.raises(PlanError, match="--gguf needs a .gguf file"):
        guide_from_gguf(fake, shapes, linear)
    with pytest.raises(PlanError, match="GGUF file not found"):
        guide_from_gguf(tmp_path / "none.gguf", shapes, linear)
    with pytest.raises(PlanError, match="--gguf-max-bits"):
        guide_from_gguf(fake, shapes, linear, max_bits=0)


def test_gguf_overrides_preset_but_not_never_quantize_or_user_rules(tmp_path):
    model, shapes, linear = small_wan()
    lay = layout(model, **{"head.head.weight": "Q4_0"})
    path = write_gguf(tmp_path / "m.gguf", lay)
    ck = FakeCheckpoint(model)
    p = build_plan(ck, PlanOptions(gguf=str(path), gguf_max_bits=5, exclude=[r"blocks\.2\.ffn"],
                                   include=[r"blocks\.3\.ffn\.2"]))
    assert p.layers["head.head"].format == "fp32" and p.layers["head.head"].rule == "never_quantize"
    assert p.layers["blocks.0.self_attn.q"].format == NV            # GGUF replaces the preset's edge blocks
    assert p.layers["blocks.2.ffn.0"].format == "fp32"              # exclude over GGUF
    assert p.layers["blocks.3.ffn.2"].format == NV                  # include over GGUF Q6_K
    assert "[over gguf: Q6_K > Q5" in p.layers["blocks.3.ffn.2"].reason


def test_keep_edge_blocks_on_flux_double_and_single_groups(tmp_path):
    model = flux_tensors(double=6, single=8)
    lay = {n: (s, "Q4_0" if len(s) == 2 else "F32") for n, (s, _) in model.items()}
    path = write_gguf(tmp_path / "flux.gguf", lay, arch="flux")
    ck = FakeCheckpoint(model, path="flux.safetensors")
    p = build_plan(ck, PlanOptions(gguf=str(path), gguf_keep_edge_blocks=True))   # real Flux detection
    assert p.source["architecture"] == "flux"
    for group, n in (("double_blocks", 6), ("single_blocks", 8)):
        layer = "img_attn.qkv" if group == "double_blocks" else "linear1"
        for i in range(n):
            d = p.layers[f"{group}.{i}.{layer}"]
            if i in (0, 1, n - 2, n - 1):
                assert d.format == "bf16" and d.reason.startswith("gguf_keep_edge_blocks"), (group, i, d)
            else:
                assert d.format == NV, (group, i, d)
    # explicit --keep-first/--keep-last replace the GGUF 2/2
    p = build_plan(ck, PlanOptions(gguf=str(path), gguf_keep_edge_blocks=True, keep_first=1, keep_last=0))
    assert p.layers["single_blocks.1.linear1"].format == NV and p.layers["single_blocks.0.linear1"].format == "bf16"
    assert p.layers["single_blocks.7.linear1"].format == NV
