"""calibration.recorder on plain torch modules (no ComfyUI): values, buckets, one host transfer per run, no sync in
hooks, inference mode, the input-row sample sidecar."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nvfp4_lab.calibration import recorder as recmod
from nvfp4_lab.calibration.recorder import (
    Recorder,
    input_samples_path,
    load_input_samples,
    save_input_samples,
    write_run,
)
from nvfp4_lab.calibration.store import CalibrationStore
from nvfp4_lab.quant.errors import CalibrationError


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 32)
        self.act = torch.nn.GELU()
        self.b = torch.nn.Linear(32, 16)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.b(self.act(self.a(x))) * 3.0)


def linears(net):
    return [(n, m) for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)]


def reference_hooks(net, log):
    """Plain, independent hooks: per-call whole amax and per-chunk amax (chunks along dim 0)."""
    handles = []
    for name, mod in linears(net):
        def hook(m, args, name=name):
            log.setdefault(name, []).append(args[0].detach().abs().amax().item())
        handles.append(mod.register_forward_pre_hook(hook))
    return handles


def run(net, rec, steps=3, chunks=(0, 1), batch_per_chunk=2, tokens=5, seed=0, step_as_tensor=True):
    g = torch.Generator().manual_seed(seed)
    inputs = []
    with torch.inference_mode():
        for s in range(steps):
            x = torch.randn(batch_per_chunk * max(len(chunks), 1), tokens, 8, generator=g)
            x[:, 0, 0] += 10.0 * (s + 1)           # amax grows with the step
            rec.set_context(step=torch.tensor(s) if step_as_tensor else s, cond_or_uncond=chunks or None)
            net(x)
            inputs.append(x)
    rec.clear_context()
    return inputs


def test_whole_call_amax_counts_and_steps_equal_an_independent_measurement():
    torch.manual_seed(0)
    net = Net()
    rec = Recorder()
    ref: dict[str, list[float]] = {}
    handles = reference_hooks(net, ref)
    with rec.attached(linears(net)):
        run(net, rec, steps=4)
    for h in handles:
        h.remove()
    assert rec.pending_calls == 12
    summary = rec.flush()
    assert summary.layers == 3 and summary.calls == 12
    for name, vals in ref.items():
        np.testing.assert_array_equal(summary.data.calls[name], np.asarray(vals, np.float32))
        np.testing.assert_array_equal(summary.data.steps[name], [0, 1, 2, 3])
    assert rec.pending_calls == 0 and rec.flush().calls == 0
    assert all(len(m._forward_pre_hooks) == 0 for m in net.modules())


def test_chunks_are_split_along_the_batch_in_cond_or_uncond_order():
    net = Net()
    rec = Recorder()
    with rec.attached(linears(net)):
        inputs = run(net, rec, steps=2, chunks=(1, 0), batch_per_chunk=3)
    data = rec.flush().data
    for s, x in enumerate(inputs):
        first, second = x[:3].abs().amax().item(), x[3:].abs().amax().item()
        uv, us = data.chunks["a"]["uncond"]
        cv, cs = data.chunks["a"]["cond"]
        assert uv[s] == pytest.approx(first, rel=0, abs=0) and us[s] == s   # chunk 0 is uncond (layout (1, 0))
        assert cv[s] == pytest.approx(second, rel=0, abs=0) and cs[s] == s
        assert data.calls["a"][s] == max(first, second)
    assert data.conds["a"] == [None, None]    # batched calls: whole call has no single cond


def test_single_cond_calls_carry_their_label_and_unsplittable_batches_fall_back():
    net = Net()
    rec = Recorder()
    with rec.attached(linears(net)):
        run(net, rec, steps=1, chunks=(1,), batch_per_chunk=2)
        rec.set_context(step=5, cond_or_uncond=(0, 1))
        net(torch.randn(3, 8))                    # 3 rows cannot split into 2 chunks
    data = rec.flush().data
    assert data.conds["a"] == ["uncond", None]
    assert "a" not in data.chunks
    np.testing.assert_array_equal(data.steps["a"], [0, 5])


def test_write_run_fills_store_buckets_and_chunk_buckets():
    net = Net()
    rec = Recorder()
    with rec.attached(linears(net)):
        run(net, rec, steps=3, chunks=(0, 1))
        run(net, rec, steps=2, chunks=(0,), seed=1)
    store = CalibrationStore()
    rec.flush(store)
    st = store.layers["b"]
    assert st.count == 5
    assert set(st.buckets) == {(None, 0), (None, 1), (None, 2), ("cond", 0), ("cond", 1)}
    assert set(st.chunk_buckets) == {("cond", 0), ("cond", 1), ("cond", 2), ("uncond", 0), ("uncond", 1),
                                     ("uncond", 2)}
    assert sum(b.count for b in st.chunk_buckets.values()) == 6
    assert st.conds() == ["cond", "uncond"]


def test_hooks_never_synchronize_and_flush_transfers_once(monkeypatch):
    """No .item()/.cpu()/.tolist()/.numpy()/bool()/float() of a tensor while the model runs; one .cpu() per flush."""
    net = Net()
    rec = Recorder(sample_rows=4)
    forbidden = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")
    calls: dict[str, int] = {}

    def make(name, orig):
        def patched(self, *a, **k):
            calls[name] = calls.get(name, 0) + 1
            raise AssertionError(f"Tensor.{name} called inside a hook (host sync)")
        return patched

    x = torch.randn(4, 5, 8)
    with rec.attached(linears(net)):
        rec.set_context(step=torch.tensor(1), cond_or_uncond=(0, 1))
        with monkeypatch.context() as mp:
            for name in forbidden:
                mp.setattr(torch.Tensor, name, make(name, getattr(torch.Tensor, name)))
            # the model itself must not sync either: run its forward without hooks first as a control
            for _ in range(3):
                rec.observe("extra", x)          # the hook entry point, directly
                net.a(x)                          # and through a real pre-hook
    assert calls == {}
    # flush: exactly one host transfer of the recorded values (the samples are moved separately, on request)
    orig_cpu = torch.Tensor.cpu
    counted = {"n": 0}

    def counting_cpu(self, *a, **k):
        counted["n"] += 1
        return orig_cpu(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    summary = rec.flush()
    monkeypatch.setattr(torch.Tensor, "cpu", orig_cpu)
    assert counted["n"] == 1
    assert summary.calls == 6 and set(summary.data.calls) == {"a", "extra"}


def test_hook_code_contains_no_sync_calls():
    """Structural guard: the hook path's source never calls a syncing tensor method."""
    import inspect

    src = inspect.getsource(Recorder.observe) + inspect.getsource(Recorder.make_hook) + \
        inspect.getsource(Recorder._sample) + inspect.getsource(recmod._bottom_k)
    for bad in (".item(", ".cpu(", ".tolist(", ".numpy(", "float(v", "synchronize("):
        assert bad not in src, bad


def test_inference_mode_and_compaction(monkeypatch):
    monkeypatch.setattr(recmod, "_COMPACT_EVERY", 4)
    net = Net()
    rec = Recorder()
    ref: dict[str, list[float]] = {}
    handles = reference_hooks(net, ref)
    with rec.attached(linears(net)):
        run(net, rec, steps=7, step_as_tensor=False)
    for h in handles:
        h.remove()
    assert rec._compacted, "compaction did not happen"
    data = rec.flush().data
    for name, vals in ref.items():
        np.testing.assert_array_equal(data.calls[name], np.asarray(vals, np.float32))
        np.testing.assert_array_equal(data.steps[name], np.arange(7))


def test_bf16_inputs_and_non_finite_values():
    lin = torch.nn.Linear(4, 4).to(torch.bfloat16)
    rec = Recorder()
    with rec.attached([("lin", lin)]):
        x = torch.tensor([[1.5, -300.0, 0.25, 2.0]], dtype=torch.bfloat16)
        lin(x)
        lin(torch.tensor([[float("nan"), 1.0, 2.0, 3.0]], dtype=torch.bfloat16))
    store = CalibrationStore()
    data = rec.flush(store).data
    assert data.calls["lin"][0] == 300.0 and np.isnan(data.calls["lin"][1])
    assert store.layers["lin"].count == 1 and store.layers["lin"].nonfinite == 1


def test_discard_drops_a_failed_run():
    net = Net()
    rec = Recorder()
    with rec.attached(linears(net)):
        run(net, rec, steps=2)
    rec.discard()
    assert rec.pending_calls == 0 and rec.flush().calls == 0


def test_input_samples_are_real_rows_bounded_and_merge_exactly(tmp_path):
    torch.manual_seed(0)
    net = Net()
    rec = Recorder(sample_rows=16, seed=3)
    with rec.attached(linears(net)):
        inputs = run(net, rec, steps=3, chunks=(0, 1), batch_per_chunk=2, tokens=5)   # 20 rows per call, 60 total
    store_path = tmp_path / "sess.json"
    side = input_samples_path(store_path)
    assert side.name == "sess.samples.safetensors"
    first = rec.input_samples()
    assert rec.save_input_samples(side) == side
    assert rec.input_samples() == {}            # saved rows are forgotten (no duplicates on the next save)
    rows = load_input_samples(store_path)       # the store path works too
    assert set(rows) == {"a", "b", "head"}
    assert rows["a"].shape == (16, 8) and rows["b"].shape == (16, 32) and rows["head"].shape == (16, 16)
    all_rows = torch.cat([x.reshape(-1, 8) for x in inputs])
    for r in rows["a"]:
        assert bool((all_rows == r).all(dim=1).any()), "a sampled row is not one of the real input rows"
    assert len({tuple(r.tolist()) for r in rows["a"]}) == 16    # without replacement
    # a second run merges: the file keeps the bottom-16 keys of the union
    with rec.attached(linears(net)):
        run(net, rec, steps=2, seed=9)
    second = rec.input_samples()
    rec.save_input_samples(side)
    keys_union = torch.cat([first["a"][1], second["a"][1]])
    expected = torch.sort(keys_union).values[:16]
    _, keys, meta = recmod._read_samples_file(side)
    assert torch.equal(torch.sort(keys["a"]).values, expected)
    assert meta["format"] == recmod.SAMPLES_FORMAT and meta["max_rows"] == "16"
    assert load_input_samples(side)["a"].shape == (16, 8)


def test_input_samples_errors(tmp_path):
    with pytest.raises(CalibrationError, match="no input samples"):
        load_input_samples(tmp_path / "missing.json")
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.samples.safetensors"
    save_file({"x": torch.zeros(2, 2)}, str(foreign))
    with pytest.raises(CalibrationError, match="not an NVFP4 Lab input-sample file"):
        load_input_samples(foreign)
    with pytest.raises(CalibrationError, match="not an NVFP4 Lab input-sample file"):
        save_input_samples(foreign, {"x": (torch.zeros(1, 2), torch.zeros(1))})
    assert Recorder().save_input_samples(tmp_path / "off.samples.safetensors") is None   # sampling off


def test_sampling_off_by_default_keeps_nothing():
    net = Net()
    rec = Recorder()
    with rec.attached(linears(net)):
        run(net, rec, steps=1)
    assert rec.input_samples() == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (sync debug mode is CUDA-only)")
def test_no_device_sync_in_hooks_on_cuda():
    net = Net().cuda()
    rec = Recorder(sample_rows=8)
    x = torch.randn(4, 5, 8, device="cuda")
    with rec.attached(linears(net)):
        step = torch.tensor(2, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.inference_mode():
                for _ in range(3):
                    rec.set_context(step=step, cond_or_uncond=(0, 1))
                    net(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    data = rec.flush().data
    assert data.calls["a"][0] == pytest.approx(x.abs().amax().item())
    np.testing.assert_array_equal(data.steps["a"], [2, 2, 2])
