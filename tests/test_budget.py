"""Budget planner: budget parsing, never exceeding the budget (estimate and converted file), beating a name-based
preset at equal size on measured end-to-end error, infeasible budgets, the rules/CLI hook."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from nvfp4_lab.calibration import budget as B
from nvfp4_lab.calibration import end_to_end as E
from nvfp4_lab.calibration.sensitivity import probe
from nvfp4_lab.quant import formats as F
from nvfp4_lab.quant.checkpoint import open_checkpoint
from nvfp4_lab.quant.errors import PlanError
from nvfp4_lab.quant.plan import LayerDecision, Plan


# ------------------------------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("text, kind, value", [
    ("9.5GB", "bytes", 9_500_000_000), ("900MB", "bytes", 900_000_000), ("900 mb", "bytes", 900_000_000),
    ("1.5KB", "bytes", 1500), ("850MiB", "bytes", 850 * 2**20), ("7.2GiB", "bytes", math.floor(7.2 * 2**30)),
    ("1.5KiB", "bytes", 1536), ("123456", "bytes", 123456), ("123456B", "bytes", 123456), ("2TB", "bytes", 2e12),
    ("4.8bpw", "bpw", 4.8), (" 6 BPW ", "bpw", 6.0), (1000, "bytes", 1000),
])
def test_parse_budget(text, kind, value):
    b = B.parse_budget(text)
    assert b.kind == kind and b.value == pytest.approx(value)


@pytest.mark.parametrize("text", ["9.5 parsecs", "-1GB", "0", "0MB", "abc", "", "50bpw", "0.5bpw", "1e400GB",
                                  "GB", "4.8 bits"])
def test_parse_budget_rejects(text):
    with pytest.raises(PlanError):
        B.parse_budget(text)


# ------------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Synthetic chain with two very sensitive layers, its file, a recorded-input report, eval inputs."""
    d = tmp_path_factory.mktemp("budget")
    m, sd = E.synthetic_chain(dim=64, hidden=256, depth=6, out_dim=32, sensitive=(2, 4), seed=0)
    path = d / "chain.safetensors"
    save_file(sd, str(path))
    samples = E.record_linear_inputs(m, [E.chain_inputs(2, 64, 64, seed=s) for s in range(2)], max_rows=256)
    report = probe(path, samples=samples, progress=False)
    evals = [E.chain_inputs(2, 64, 64, seed=100 + s) for s in range(2)]
    return m, sd, path, report, evals


def _plan(ck, fmt_of, name="x") -> Plan:
    layers = {n: LayerDecision(n, fmt_of(n), name, tuple(l.shape)) for n, l in ck.layers().items() if l.linear}
    return Plan(source={"file": ck.path.name, "header_sha256": ck.header_hash()}, preset=name, layers=layers)


def _edge_preset(ck) -> Plan:
    """A typical name-based preset: first and last block and the head kept in bf16, everything else NVFP4."""
    return _plan(ck, lambda n: F.BF16 if n.startswith(("blocks.0.", "blocks.5.")) or n == "head" else F.NVFP4,
                 "edge")


def _e2e(m, plan, evals) -> float:
    errs = []
    with torch.no_grad():
        for x in evals:
            ref = m(x)
            with E.emulated(m, plan):
                out = m(x)
            errs.append(E.compare_outputs(ref, out)["rel_rmse"])
    return sum(errs) / len(errs)


# ------------------------------------------------------------------------------------------------------ planner

def test_planner_never_exceeds_budget(model, tmp_path):
    _, _, path, report, _ = model
    with open_checkpoint(path) as ck:
        base = _plan(ck, lambda n: F.NVFP4, "all")
        allowance = B.header_allowance(base, ck)
        lo = base.estimated_bytes(ck) + allowance
        hi = _plan(ck, lambda n: F.BF16).estimated_bytes(ck) + allowance
        last_err = math.inf
        for frac in (0.0, 0.1, 0.33, 0.5, 0.8, 1.0):
            budget = int(lo + frac * (hi - lo))
            plan, curve = B.plan_for_budget(base, report, budget, ck)
            est = plan.estimated_bytes(ck)
            assert est + allowance <= budget
            assert curve.chosen["bytes"] == est + allowance and curve.chosen["estimated_bytes"] == est
            assert curve.chosen["predicted_error"] <= last_err + 1e-12    # more budget never hurts
            last_err = curve.chosen["predicted_error"]
            assert plan.options["budget"]["estimated_bytes"] == est
        # the curve: sizes increase, predicted error decreases, ends at the all-max point
        pts = curve.points
        assert all(a["bytes"] <= b["bytes"] for a, b in zip(pts, pts[1:]))
        assert all(a["predicted_error"] >= b["predicted_error"] - 1e-15 for a, b in zip(pts, pts[1:]))
        assert pts[0]["bytes"] == curve.min_bytes and pts[-1]["bytes"] == curve.max_bytes
        json.loads(curve.to_json())
        assert curve.save_png(tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"

        # the real converted file fits the budget too
        from nvfp4_lab.quant.convert import convert
        budget = int(lo + 0.4 * (hi - lo))
        plan, _ = B.plan_for_budget(base, report, budget, ck)
    out = tmp_path / "out.safetensors"
    convert(path, out, plan, progress=False)
    assert out.stat().st_size <= budget
    assert out.stat().st_size <= plan.estimated_bytes(ck) + allowance     # the header allowance is an upper bound
    with open_checkpoint(out) as ck2:
        got = {n: l.format for n, l in ck2.layers().items() if l.linear}
        assert got == {n: d.format for n, d in plan.layers.items()}


def test_bpw_budget(model):
    _, _, path, report, _ = model
    with open_checkpoint(path) as ck:
        base = _plan(ck, lambda n: F.NVFP4, "all")
        assert 4.5 <= B.plan_bpw(base) < 5.0     # NVFP4: 4 bits + an e4m3 scale per 16 (+ 128-row scale padding)
        for target in (5.0, 6.5, 9.0):
            plan, curve = B.plan_for_budget(base, report, f"{target}bpw", ck)
            bits, numel = B.planned_weight_bits(plan)
            assert bits / numel <= target
            assert curve.chosen["bpw"] == pytest.approx(bits / numel)
        assert B.plan_bpw(_plan(ck, lambda n: F.BF16)) == 16.0
        with pytest.raises(PlanError, match=r"smallest achievable 4\.\d+ bits per weight"):
            B.plan_for_budget(base, report, "4bpw", ck)


def test_planner_beats_preset_at_equal_size(model):
    m, _, path, report, evals = model
    with open_checkpoint(path) as ck:
        preset = _edge_preset(ck)
        base = _plan(ck, lambda n: F.NVFP4, "all")
        size = preset.estimated_bytes(ck)
        plan, _ = B.plan_for_budget(base, report, size + B.header_allowance(base, ck), ck)
        assert plan.estimated_bytes(ck) <= size
        # the very sensitive layers leave NVFP4, with an explanation
        for n in ("blocks.2.ffn.2", "blocks.4.ffn.2"):
            assert plan.layers[n].format != F.NVFP4
            assert plan.layers[n].reason.startswith("budget: ") and "beat nvfp4" in plan.layers[n].reason
        assert B.predicted_error(plan, report) < B.predicted_error(preset, report)
    e_plan, e_preset, e_all = _e2e(m, plan, evals), _e2e(m, preset, evals), _e2e(m, base, evals)
    assert e_plan < 0.6 * e_preset, (e_plan, e_preset)
    assert e_preset < e_all


def test_tight_budget_keeps_sensitive_layers_first(model):
    """With room for only a little more than all-NVFP4, the bytes go to the two sensitive layers."""
    _, _, path, report, _ = model
    with open_checkpoint(path) as ck:
        base = _plan(ck, lambda n: F.NVFP4, "all")
        allowance = B.header_allowance(base, ck)
        extra = 2 * (F.stored_weight_bytes(F.FP8, (64, 256)) - F.stored_weight_bytes(F.NVFP4, (64, 256)))
        plan, _ = B.plan_for_budget(base, report, base.estimated_bytes(ck) + allowance + extra, ck)
        moved = sorted(n for n, d in plan.layers.items() if d.format != F.NVFP4)
        assert moved == ["blocks.2.ffn.2", "blocks.4.ffn.2"]


def test_infeasible_budget_names_minimum(model):
    _, _, path, report, _ = model
    with open_checkpoint(path) as ck:
        base = _plan(ck, lambda n: F.NVFP4, "all")
        need = base.estimated_bytes(ck) + B.header_allowance(base, ck)
        with pytest.raises(PlanError, match=f"{need:,} bytes"):
            B.plan_for_budget(base, report, need - 1, ck)
        plan, _ = B.plan_for_budget(base, report, need, ck)      # exactly the minimum is feasible
        assert plan.counts() == {F.NVFP4: len(plan.layers)}


def test_kept_layers_w4a16_and_static_scales_are_respected(model):
    m, _, path, _, _ = model
    samples = E.record_linear_inputs(m, [E.chain_inputs(2, 64, 64, seed=s) for s in range(2)], max_rows=256)
    report = probe(path, samples=samples, progress=False, input_scales={"blocks.1.ffn.0": 0.01})
    assert report.by_layer()["blocks.1.ffn.0"].fp8_input_scale == pytest.approx(0.06)
    with open_checkpoint(path) as ck:
        base = _plan(ck, lambda n: F.NVFP4, "preset")
        base.layers["head"].format = F.BF16
        base.layers["head"].reason = "never_quantize: test"
        base.layers["blocks.0.ffn.0"].format = F.NVFP4_W4A16
        base.layers["blocks.1.ffn.0"].input_scale = 0.01
        base.layers["blocks.1.ffn.0"].input_scale_source = "calibration:x p99.9x1"
        big = _plan(ck, lambda n: F.BF16).estimated_bytes(ck) * 2
        rich, _ = B.plan_for_budget(base, report, big, ck, candidates=(F.NVFP4, F.FP8))
        assert rich.layers["head"].format == F.BF16 and rich.layers["head"].reason == "never_quantize: test"
        assert rich.layers["blocks.1.ffn.0"].format == F.FP8
        assert rich.layers["blocks.1.ffn.0"].input_scale == pytest.approx(0.06)     # same amax, /448
        poor_budget = base.estimated_bytes(ck) + B.header_allowance(base, ck)
        poor, _ = B.plan_for_budget(base, report, poor_budget, ck)
        assert poor.layers["blocks.0.ffn.0"].format == F.NVFP4_W4A16                # W4A16 stays W4A16
        assert poor.layers["blocks.1.ffn.0"].input_scale == pytest.approx(0.01)
        assert "nvfp4-static" in poor.layers["blocks.1.ffn.0"].reason
        # options that did not ask for FP8 input scales: an FP8 layer made by the planner gets none
        base.options = {"input_scale": {"fp8": False}}
        rich2, _ = B.plan_for_budget(base, report, big, ck, candidates=(F.NVFP4, F.FP8))
        assert rich2.layers["blocks.1.ffn.0"].format == F.FP8 and rich2.layers["blocks.1.ffn.0"].input_scale is None


def test_nonfinite_weight_layer_is_kept(tmp_path):
    g = torch.Generator().manual_seed(0)
    sd = {f"l{i}.weight": torch.randn(32, 64, generator=g).bfloat16() for i in range(3)}
    sd["l1.weight"][0, 0] = float("nan")
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    rep = probe(path, samples={f"l{i}": torch.randn(16, 64, generator=g) for i in range(3)}, progress=False)
    with open_checkpoint(path) as ck:
        base = _plan(ck, lambda n: F.NVFP4, "all")
        plan, _ = B.plan_for_budget(base, rep, "10MB", ck)
    assert plan.layers["l1"].format == F.BF16 and "non-finite weight" in plan.layers["l1"].reason


def test_report_for_another_model_is_refused(model, tmp_path):
    _, _, _, report, _ = model
    sd = {"blocks.0.ffn.0.weight": torch.randn(32, 32).bfloat16()}
    path = tmp_path / "other.safetensors"
    save_file(sd, str(path))
    with open_checkpoint(path) as ck:
        base = _plan(ck, lambda n: F.NVFP4, "all")
        with pytest.raises(PlanError, match="another model"):
            B.plan_for_budget(base, report, "1GB", ck)


def test_build_plan_hook_on_tiny_wan(tmp_path):
    """rules.build_plan(sensitivity=..., budget=...) runs the planner; preset keeps stay kept."""
    from nvfp4_lab.quant.rules import PlanOptions, build_plan
    from nvfp4_lab.quant.tiny_models import save_tiny, tiny_wan

    sd, meta = tiny_wan(dim=128, ffn_dim=256, num_layers=4, sensitive=[r"blocks\.2\.ffn\.2"])
    path = save_tiny(tmp_path / "wan.safetensors", sd, meta)
    rep = probe(path, progress=False, layers=r"^blocks\.", synthetic_rows=64)
    rep_path = rep.save(tmp_path / "rep.json")
    with open_checkpoint(path) as ck:
        preset = build_plan(ck, PlanOptions())
        size = preset.estimated_bytes(ck)
        budget = size + B.header_allowance(preset, ck) + 60_000
        plan = build_plan(ck, PlanOptions(sensitivity=str(rep_path), budget=str(budget)))
        assert plan.estimated_bytes(ck) + B.header_allowance(plan, ck) <= budget
        assert plan.report["output_bytes"] == plan.estimated_bytes(ck)
        for n, d in preset.layers.items():
            if not d.quantized:
                assert plan.layers[n].format == d.format and plan.layers[n].reason == d.reason
        assert any(d.reason.startswith("budget:") for d in plan.layers.values())
        assert plan.report["budget"]["decided_layers"] == len(preset.by_format(F.NVFP4))
        curve = B.curve_from_plan(plan)
        assert curve is not None and curve.chosen["bytes"] <= budget
        plan.save(tmp_path / "plan.json")
        json.loads((tmp_path / "plan.json").read_text())


def test_cli_probe_then_plan_with_budget(tmp_path):
    """`nvfp4 probe` → `nvfp4 plan --sensitivity --budget --budget-curve` on a tiny Wan."""
    from nvfp4_lab.cli.main import main
    from nvfp4_lab.quant.tiny_models import save_tiny, tiny_wan

    sd, meta = tiny_wan(dim=128, ffn_dim=256, num_layers=3)
    src = save_tiny(tmp_path / "wan.safetensors", sd, meta)
    rep = tmp_path / "rep.json"
    assert main(["probe", str(src), "-o", str(rep), "--device", "cpu", "--max-rows", "64",
                 "--candidates", "nvfp4,fp8,bf16"]) == 0
    out = tmp_path / "plan.json"
    png = tmp_path / "curve.png"
    assert main(["plan", str(src), "--sensitivity", str(rep), "--budget", "2.0MB", "-o", str(out),
                 "--budget-curve", str(png)]) == 0
    plan = Plan.load(out)
    with open_checkpoint(src) as ck:
        assert plan.estimated_bytes(ck) + B.header_allowance(plan, ck) <= 2_000_000
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert plan.report["budget"]["budget"] == "2.0MB"
    assert main(["plan", str(src), "--sensitivity", str(rep), "--budget", "10KB", "-o",
                 str(tmp_path / "p2.json")]) == 1                                         # infeasible: error line
