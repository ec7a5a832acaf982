"""quant.plan: JSON round trip, validation of hand-edited plans, check_against, exact size estimate, the table,
and the `nvfp4 plan` command."""

from __future__ import annotations

import json
import math

import pytest
from plan_fakes import FakeCheckpoint, fake_block_of, wan_arch, wan_preset, wan_tensors

from nvfp4_lab.cli.main import main as cli_main
from nvfp4_lab.quant import formats
from nvfp4_lab.quant.checkpoint import open_checkpoint
from nvfp4_lab.quant.errors import CheckpointError, PlanError
from nvfp4_lab.quant.input_scales import InputScaleOptions
from nvfp4_lab.quant.plan import LayerDecision, Plan
from nvfp4_lab.quant.rules import PlanOptions, build_plan

NV, W4, FP8 = formats.NVFP4, formats.NVFP4_W4A16, formats.FP8


def fake_plan(blocks=6, tensors=None, **kw) -> tuple[Plan, FakeCheckpoint]:
    ck = FakeCheckpoint(tensors or wan_tensors(blocks))
    kw.setdefault("input_scale", InputScaleOptions(value=0.004))
    p = build_plan(ck, PlanOptions(**kw), arch=wan_arch(blocks), preset=wan_preset(), block_of=fake_block_of)
    return p, ck


# ---------------------------------------------------------------------------------------------------- JSON
def test_json_round_trip(tmp_path):
    p, ck = fake_plan(other_dtype="fp16", w4a16=[r"cross_attn\.q"], fp8=[r"blocks\.3\.ffn\.0"])
    text = p.to_json()
    data = json.loads(text)
    assert list(data)[:6] == ["version", "source", "preset", "other_dtype", "options", "layers"]
    assert data["version"] == 1 and data["source"]["file"] == "model.safetensors"
    assert set(data["source"]) >= {"file", "header_sha256", "architecture", "variant"}
    entry = data["layers"]["blocks.3.self_attn.q"]
    assert set(entry) == {"format", "reason", "shape", "input_scale", "input_scale_source"}
    assert entry == {"format": NV, "reason": "preset wan: default nvfp4", "shape": [64, 256], "input_scale": 0.004,
                     "input_scale_source": "value"}
    q = Plan.from_json(text)
    assert q.to_dict() == p.to_dict()
    assert q.layers == p.layers and q.tensor_dtypes == p.tensor_dtypes and q.counts() == p.counts()
    path = p.save(tmp_path / "plan.json")
    assert Plan.load(path).to_dict() == p.to_dict()
    assert PlanOptions.from_dict(q.options) == PlanOptions(
        other_dtype="fp16", w4a16=[r"cross_attn\.q"], fp8=[r"blocks\.3\.ffn\.0"],
        input_scale=InputScaleOptions(value=0.004))
    q.check_against(ck)


def test_save_refuses_existing_and_inputs(tmp_path):
    p, _ = fake_plan()
    path = p.save(tmp_path / "plan.json")
    with pytest.raises(CheckpointError, match="already exists; pass --force"):
        p.save(path)
    p.save(path, force=True)
    src = tmp_path / "model.safetensors"
    src.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="same file as input"):
        p.save(src, force=True, inputs=[src])


def test_non_finite_cannot_be_saved():
    p, _ = fake_plan()
    p.report["x"] = math.nan
    with pytest.raises(PlanError, match="non-finite"):
        p.to_json()


def edited(p: Plan, fn) -> str:
    d = json.loads(p.to_json())
    fn(d)
    return json.dumps(d)


@pytest.mark.parametrize("edit, msg", [
    (lambda d: d.update(layer={}), r"unknown key 'layer' \(did you mean 'layers'\?\)"),
    (lambda d: d.pop("layers"), "missing key 'layers'"),
    (lambda d: d.update(version=2), "plan version 2 is not supported"),
    (lambda d: d.update(other_dtype="float16"), "other_dtype 'float16' is invalid"),
    (lambda d: d["layers"]["blocks.3.ffn.0"].update(format="nvfp4_w4a16"),
     r"format 'nvfp4_w4a16' is not a format \(did you mean 'nvfp4-w4a16'\?\)"),
    (lambda d: d["layers"]["blocks.3.ffn.0"].update(format="keep"), "a kept layer names its dtype"),
    (lambda d: d["layers"]["blocks.3.ffn.0"].update(formt="fp8"), r"unknown key 'formt' \(did you mean 'format'\?\)"),
    (lambda d: d["layers"]["blocks.3.ffn.0"].update(shape=[128]), r"shape must be \[out_features, in_features\]"),
    (lambda d: d["layers"]["blocks.3.ffn.0"].update(shape=[128, "256"]), "shape must be"),
    (lambda d: d["layers"]["blocks.3.ffn.0"].update(input_scale=-0.1), "input_scale must be a positive finite"),
    (lambda d: d["layers"]["blocks.3.ffn.0"].update(input_scale="0.1"), "input_scale must be a positive finite"),
    (lambda d: d["layers"]["head.head"].update(input_scale=0.1), "is fp32 but has an input_scale"),
    (lambda d: d["layers"].update({"blocks.3.ffn.0": "nvfp4"}), "must be an object"),
    (lambda d: d.update(tensors={"patch_embedding.weight": "nvfp4"}), "non-Linear tensors can only be"),
])
def test_hand_edit_mistakes_are_plan_errors(edit, msg):
    p, _ = fake_plan()
    with pytest.raises(PlanError, match=msg):
        Plan.from_json(edited(p, edit), where="plan.json")


def test_invalid_json_and_missing_file(tmp_path):
    with pytest.raises(PlanError, match=r"plan.json: not valid JSON \(line 1, column 2"):
        Plan.from_json("{,}", where="plan.json")
    with pytest.raises(PlanError, match="plan file not found"):
        Plan.load(tmp_path / "nope.json")
    with pytest.raises(PlanError, match="a plan is a JSON object"):
        Plan.from_json("[]")


def test_hand_edit_that_is_valid_loads():
    p, ck = fake_plan()
    text = edited(p, lambda d: d["layers"]["blocks.3.ffn.0"].update(format="fp8", reason="", input_scale=None))
    q = Plan.from_json(text)
    assert q.layers["blocks.3.ffn.0"].format == FP8 and q.layers["blocks.3.ffn.0"].reason == "hand-edited"
    q.check_against(ck)


# ---------------------------------------------------------------------------------------------------- check_against
def test_check_against_other_model():
    p, _ = fake_plan(6)
    other = FakeCheckpoint(wan_tensors(8))
    with pytest.raises(PlanError, match="Linear layer.* of the model have no decision"):
        p.check_against(other)
    bigger = FakeCheckpoint(wan_tensors(6, dim=128))
    with pytest.raises(PlanError, match=r"layer shape\(s\) differ, e.g. 'text_embedding.0' is \[64, 256\] in the "
                                        r"plan but \[128, 256\].*made for model.safetensors, another file"):
        p.check_against(bigger)
    fewer = FakeCheckpoint(wan_tensors(4))
    with pytest.raises(PlanError, match="not layers of the model.*another model"):
        p.check_against(fewer)


def test_check_against_same_layers_other_header_is_a_note():
    p, _ = fake_plan(6)
    t = wan_tensors(6)
    t["blocks.0.norm3.weight"] = ((64,), "BF16")     # re-saved: a different header, same Linear names/shapes
    resaved = FakeCheckpoint(t, path="resaved.safetensors")
    assert resaved.header_hash() != p.source["header_sha256"]
    p.check_against(resaved)
    assert any("header hash differs" in n and "every layer name and shape matches" in n for n in p.notes)


def test_check_against_hand_edit_errors():
    p, ck = fake_plan(6)
    d = p.layers.pop("blocks.3.ffn.0")
    p.layers["blocks.3.ffn0"] = LayerDecision("blocks.3.ffn0", d.format, d.reason, d.shape)
    with pytest.raises(PlanError, match=r"'blocks\.3\.ffn0' \(did you mean 'blocks\.3\.ffn\.0'"):
        p.check_against(ck)
    p, ck = fake_plan(6)
    p.layers["blocks.3.self_attn.norm_q"] = LayerDecision("blocks.3.self_attn.norm_q", "bf16", "x", (64, 1))
    with pytest.raises(PlanError, match="not Linear"):
        p.check_against(ck)
    p, ck = fake_plan(6)
    p.tensor_dtypes["patch_embeding.weight"] = "fp32"
    with pytest.raises(PlanError, match="did you mean 'patch_embedding.weight'"):
        p.check_against(ck)


# ---------------------------------------------------------------------------------------------------- sizes, table
def test_estimated_bytes_by_hand():
    t = {"a.weight": ((64, 256), "BF16"), "a.bias": ((64,), "F32"), "b.weight": ((32, 256), "F32"),
         "c.weight": ((48, 256), "BF16"), "n.weight": ((64,), "F32"), "idx": ((10,), "I64")}
    ck = FakeCheckpoint(t)
    layers = {"a": LayerDecision("a", NV, "r", (64, 256), 0.01, "value"),
              "b": LayerDecision("b", "fp16", "r", (32, 256)),
              "c": LayerDecision("c", FP8, "r", (48, 256))}
    p = Plan(source={"file": "m"}, preset="none", layers=layers, other_dtype="keep")
    nv = 64 * 128 + 128 * 16 + 4 + len('{"format": "nvfp4"}') + 4
    assert p.estimated_bytes(ck) == (nv + 64 * 4 + 32 * 256 * 2 + 48 * 256 + 4 + len('{"format": "float8_e4m3fn"}')
                                     + 64 * 4 + 10 * 8)
    p.other_dtype = "bf16"
    assert p.estimated_bytes(ck) == nv + 64 * 2 + 32 * 256 * 2 + 48 * 256 + 31 + 64 * 2 + 10 * 8


def test_estimated_bytes_match_the_converter(tiny_wan_file, tmp_path):
    from nvfp4_lab.quant.convert import convert
    from nvfp4_lab.quant.safetensors_io import read_header

    with open_checkpoint(tiny_wan_file) as ck:
        p = build_plan(ck, PlanOptions(other_dtype="fp16", fp8=[r"blocks\.1\.ffn\.2"], w4a16=[r"cross_attn"],
                                       include=[r"blocks\.2"], input_scale=InputScaleOptions(value=0.01)))
        est = p.estimated_bytes(ck)
    assert p.counts()[FP8] == 1 and p.counts()[W4] > 0
    out = tmp_path / "out.safetensors"
    convert(tiny_wan_file, out, p, verify=False, progress=False)
    tensors, _ = read_header(out)
    assert sum(i.nbytes for i in tensors.values()) == est
    assert p.report["output_bytes"] == est


def test_table_and_counts():
    p, _ = fake_plan(6, w4a16=[r"cross_attn\.q"])
    table = p.table()
    lines = table.splitlines()
    assert lines[0].startswith("plan for model.safetensors (wan t2v), preset wan")
    assert lines[1].startswith("layers: nvfp4 ") and "(total " in lines[1]
    assert "W4A16 2" in lines[2] and "with static input_scale" in lines[2]
    assert any(line.startswith("size: ") and "estimated from" in line for line in lines)
    row = next(line for line in lines if line.startswith("blocks.3.cross_attn.q "))
    assert "64x256" in row and W4 in row and "0.004" in row and "w4a16: /cross_attn\\.q/" in row
    assert len(p.table(layers=False).splitlines()) < len(lines)
    assert sum(p.counts().values()) == len(p.layers)


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_plan_writes_and_prints(tiny_wan_file, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = cli_main(["plan", str(tiny_wan_file), "-o", str(out), "--keep-first", "0", "--w4a16-cross-attn-qkvo",
                   "--print"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "preset wan" in captured.out and "w4a16: shortcut cross-attn-qkvo" in captured.out
    plan = Plan.load(out)
    with open_checkpoint(tiny_wan_file) as ck:
        plan.check_against(ck)
    assert plan.options["keep_first"] == 0
    assert cli_main(["plan", str(tiny_wan_file), "-o", str(out)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["plan", str(tiny_wan_file), "-o", str(out), "--force", "--mode", "all"]) == 0
    assert Plan.load(out).options["mode"] == "all"


def test_cli_plan_dry_run_json_and_errors(tiny_wan_file, tmp_path, capsys):
    assert cli_main(["plan", str(tiny_wan_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan for tiny_wan.safetensors") and "\nblocks." not in out
    assert cli_main(["plan", str(tiny_wan_file), "-o", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    assert cli_main(["plan", str(tiny_wan_file)]) == 1
    assert "give -o PLAN.json" in capsys.readouterr().err
    lst = tmp_path / "l.txt"
    lst.write_text("blocks.1.cross_atn.q\n")
    assert cli_main(["plan", str(tiny_wan_file), "-n", "--w4a16-file", str(lst)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "did you mean 'blocks.1.cross_attn.q'" in err[0]
    assert cli_main(["plan", str(tiny_wan_file), "-n", "-x", "zzz"]) == 1
    assert "error: exclude regex /zzz/ matches no Linear layer" in capsys.readouterr().err
    assert cli_main(["plan", str(tiny_wan_file), "-n", "--mode", "safe"]) == 2


def test_cli_recipe_with_original_flag_names(tiny_wan_file, tmp_path, capsys):
    from plan_fakes import wan_q5_k_m_layout, write_gguf

    with open_checkpoint(tiny_wan_file) as ck:
        model = {n: (ck.info(n).shape, ck.info(n).dtype) for n in ck.names()}
    gguf = write_gguf(tmp_path / "tiny-Q5_K_M.gguf", wan_q5_k_m_layout(model))
    lst = tmp_path / "sensitive.txt"
    lst.write_text("blocks.1.ffn.0blocks.2.self_attn.q\nblocks.1.cross_attn.norm_q")   # glued, non-Linear
    out = tmp_path / "plan.json"
    rc = cli_main(["plan", str(tiny_wan_file), "-o", str(out), "--gguf", str(gguf), "--gguf-nvfp4-max-bitdepth", "5",
                   "--gguf-keep-edge-blocks-fp16", "--keep-first", "1", "--keep-last", "1", "--other-dtype", "float16",
                   "--input-scale-value", "0.002", "--full-precision-mm-layers", str(lst),
                   "--full-precision-mm-cross-attn-qkvo"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "glued together" in captured.out and "not Linear layers" in captured.out
    plan = Plan.load(out)
    nv = plan.by_format(NV, W4)
    assert {int(n.split(".")[1]) for n in nv} == {1, 2} and len(nv) == 14       # 2 blocks x 7 (Q5_K)
    assert set(plan.by_format(W4)) == {f"blocks.{b}.cross_attn.{x}" for b in (1, 2) for x in "qko"} | {
        "blocks.1.ffn.0", "blocks.2.self_attn.q"}
    assert plan.layers["blocks.1.self_attn.v"].format == "fp16"                  # Q6_K, no --use-fp8
    assert all(plan.layers[n].input_scale == 0.002 for n in nv)


def test_budget_curve_without_budget_is_refused_before_saving(tmp_path, capsys):
    """`--budget-curve` alone used to save the plan and then fail (exit 1 with a plan file left behind)."""
    from nvfp4_lab.cli.main import main as cli_main
    from nvfp4_lab.quant.tiny_models import write_tiny_model

    src = write_tiny_model("flux", tmp_path / "f.safetensors", depth=2, depth_single=2, hidden=256)
    out = tmp_path / "plan.json"
    assert cli_main(["plan", str(src), "-o", str(out), "--budget-curve", str(tmp_path / "c.png")]) == 1
    assert "--budget-curve" in capsys.readouterr().err
    assert not out.exists()
