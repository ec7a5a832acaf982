"""Quantization core: formats, checkpoint reader/writer, plans, converter, inspection. Never imports ComfyUI."""
