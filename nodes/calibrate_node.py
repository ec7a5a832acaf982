"""Calibrate (NVFP4): record every Linear's input amax while the real workflow samples, into a calibration session.

Why inside a prompt: static input scales must match the activations of the user's own prompts, resolutions, LoRAs,
samplers and cfg. This node returns the same MODEL (same weights) with a recorder attached through
`nodes.comfy_glue.attach_recorder`: forward pre-hooks exist only while a sampler runs this MODEL, statistics are
accumulated on the device and moved to the host once per sampler run, then merged into
`<output>/nvfp4_calibration/<session>.json` (locked, atomic; accumulates across prompts, processes and restarts).

`fingerprint_inputs` returns NaN (never equal to itself), so re-queuing an identical prompt executes this node and
every node after it again: each queued prompt records again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_api.latest import io

from ..calibration.recorder import Recorder, input_samples_path
from ..calibration.store import CalibrationStore
from . import comfy_glue
from .types import CATEGORY, Calibration

log = logging.getLogger("nvfp4_lab.nodes")

DEFAULT_SAMPLE_ROWS = 256
SESSION_UI_KEY = "nvfp4_session"      # ui entry naming the session file (read by `nvfp4 calib run` from /history)


@dataclass(frozen=True)
class CalibrationSession:
    """The value on Calibrate's `calibration` output: where the session is stored (see nodes.types)."""

    name: str
    store_path: Path
    samples_path: Path | None = None

    def __str__(self) -> str:
        return str(self.store_path)


def store_totals(store: CalibrationStore) -> dict:
    """Counts shown in the UI: layers with data, recorded calls, prompts."""
    return {"layers": sum(1 for st in store.layers.values() if st.count),
            "calls": int(sum(st.count for st in store.layers.values())),
            "prompts": int(store.provenance.get("prompts", 0))}


def calibrate(model: Any, session: str, *, record_input_samples: bool = False,
              sample_rows: int = DEFAULT_SAMPLE_ROWS, node_id: str | None = None) -> tuple[Any, CalibrationSession, str]:
    """(MODEL with recorder, session, status text). Opens (validates) the session store now, so a corrupt file or a
    session recorded with another model fails here, before sampling."""
    name = comfy_glue.sanitize_session(session)
    path = comfy_glue.session_store_path(name)
    comfy_glue.check_store_dir(path)
    store = CalibrationStore.open(path)
    src = comfy_glue.model_file(model)
    store.set_model(file=src.name if src else None, header_sha256=comfy_glue.model_header_hash(src),
                    architecture=comfy_glue.model_architecture(model))
    store.note_comfyui_version(comfy_glue.comfyui_version())
    store.add_source("comfyui", name, recorder="Calibrate (NVFP4)")
    samples = input_samples_path(path) if record_input_samples else None
    recorder = Recorder(sample_rows=sample_rows if record_input_samples else 0)
    state = {"prompt_counted": False, "runs": 0}

    def on_flush(summary, run) -> None:
        if not summary.calls:
            log.warning("Calibrate (NVFP4) %s: the sampler ran but no Linear input was recorded", name)
            return
        if not state["prompt_counted"]:
            store.count_prompt()
            state["prompt_counted"] = True
        state["runs"] += 1
        store.save()
        if samples is not None:
            recorder.save_input_samples(samples)
        totals = store_totals(store)
        missing = sorted(set(run.layers) - set(summary.data.calls))
        if missing:
            log.info("Calibrate (NVFP4) %s: %d hooked Linear(s) were not called, e.g. %s", name, len(missing),
                     missing[0])
        comfy_glue.send_event(comfy_glue.CALIBRATION_EVENT, {
            "node": node_id, "prompt_id": run.prompt_id, "session": name, "path": str(path),
            "run": {"layers": summary.layers, "calls": summary.calls, "hooked": len(run.layers)},
            "runs_this_prompt": state["runs"], **totals})
        log.info("Calibrate (NVFP4) %s: +%d calls over %d layers -> %d layers, %d calls, %d prompts in %s", name,
                 summary.calls, summary.layers, totals["layers"], totals["calls"], totals["prompts"], path.name)

    patched = comfy_glue.attach_recorder(model, recorder, store, on_flush)
    totals = store_totals(store)
    text = (f"session {name}: {path}\n"
            f"so far: {totals['layers']} layers, {totals['calls']} calls, {totals['prompts']} prompts\n"
            f"records while a sampler runs this MODEL" + (" (+ input row samples)" if samples else ""))
    return patched, CalibrationSession(name, path, samples), text


class NVFP4Calibrate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NVFP4Calibrate",
            display_name="Calibrate (NVFP4)",
            category=CATEGORY,
            description="Returns the same MODEL with a recorder attached: while a sampler runs it, every Linear "
                        "layer's input amax (what ComfyUI's dynamic NVFP4 scale uses) is recorded per step and "
                        "cond/uncond into output/nvfp4_calibration/<session>.json. Accumulates over prompts and "
                        "restarts; every queued prompt records (never cached).",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("session", default="calibration",
                                tooltip="Session name: the file output/nvfp4_calibration/<session>.json (letters, "
                                        "digits, . _ - ; other characters become _). Same session = accumulate."),
                io.Boolean.Input("record_input_samples", default=False,
                                 tooltip="Also keep a uniform sample of real input rows per layer (at most "
                                         "sample_rows) in <session>.samples.safetensors for the Sensitivity Probe."),
                io.Int.Input("sample_rows", default=DEFAULT_SAMPLE_ROWS, min=16, max=4096, advanced=True,
                             tooltip="Rows kept per layer when record_input_samples is on."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                Calibration.Output(display_name="calibration"),
                io.String.Output(display_name="store_path"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> float:
        return float("nan")  # never equal to the last value: an identical re-queued prompt records again

    @classmethod
    def execute(cls, model: Any, session: str = "calibration", record_input_samples: bool = False,
                sample_rows: int = DEFAULT_SAMPLE_ROWS) -> io.NodeOutput:
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        patched, sess, text = calibrate(model, session, record_input_samples=record_input_samples,
                                        sample_rows=sample_rows, node_id=node_id)
        return io.NodeOutput(patched, sess, str(sess.store_path),
                             ui={"text": [text], SESSION_UI_KEY: [{"session": sess.name, "path": str(sess.store_path)}]})
