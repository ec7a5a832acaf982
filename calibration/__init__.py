"""Calibration core: recorder, statistics store, input-scale selection, sensitivity. Never imports ComfyUI."""
