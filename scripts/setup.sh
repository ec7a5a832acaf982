#!/usr/bin/env bash
# Developer and CI set-up: a stock ComfyUI 0.29 with its venv, and this repo installed into that venv
# (editable, with the test extras). Idempotent: a second run takes seconds.
#
#   bash scripts/setup.sh            # prints ComfyUI's python last (progress goes to stderr)
#
#   COMFYUI_PATH    where ComfyUI is, or is to be unpacked (default ~/ComfyUI)
#   COMFYUI_PYTHON  its python, when there is no ../shared snapshot (default $COMFYUI_PATH/.venv/bin/python)
#
# With ../shared/comfyui/setup.sh beside the repository (CI and the team machines) ComfyUI 0.29.0 and its venv are
# created from that snapshot. Elsewhere an existing ComfyUI is required.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
comfy="${COMFYUI_PATH:-$HOME/ComfyUI}"
snapshot_setup="$root/../shared/comfyui/setup.sh"

if [ -f "$snapshot_setup" ]; then
  echo "setup: ComfyUI 0.29 at $comfy (from $(cd "$(dirname "$snapshot_setup")" && pwd))" >&2
  py="$(bash "$snapshot_setup" "$comfy" | tail -n 1)"
else
  py="${COMFYUI_PYTHON:-$comfy/.venv/bin/python}"
  if [ ! -f "$comfy/main.py" ] || [ ! -x "$py" ]; then
    cat >&2 <<MSG
setup: error: no ComfyUI snapshot at $snapshot_setup, and no usable ComfyUI here:
  ComfyUI main.py: $comfy/main.py $( [ -f "$comfy/main.py" ] && echo "(found)" || echo "(missing)")
  its python:      $py $( [ -x "$py" ] && echo "(found)" || echo "(missing)")
Install ComfyUI >= 0.29 with its own venv, then point at it:
  COMFYUI_PATH=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/python] bash scripts/setup.sh
MSG
    exit 1
  fi
  echo "setup: using the existing ComfyUI at $comfy with $py" >&2
fi

# Install this checkout (editable, test extras) unless this venv already has exactly this checkout and pyproject.
prefix="$("$py" -c 'import sys; print(sys.prefix)')"
stamp="$prefix/.nvfp4_lab-setup"
want="$root $(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
here="$("$py" -c 'import nvfp4_lab, os; print(os.path.dirname(os.path.realpath(nvfp4_lab.__file__)))' 2>/dev/null || true)"
if [ "$(cat "$stamp" 2>/dev/null || true)" = "$want" ] && [ "$here" = "$root" ]; then
  echo "setup: nvfp4_lab already installed from $root" >&2
else
  echo "setup: pip install -e '$root[test]'" >&2
  log="$(mktemp)"
  if ! "$py" -m pip install -q --disable-pip-version-check -e "$root[test]" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup: error: pip install -e '$root[test]' failed (output above)" >&2
    exit 1
  fi
  rm -f "$log"
  printf '%s\n' "$want" > "$stamp" 2>/dev/null || true
fi
echo "$py"
