#!/usr/bin/env bash
# Pack what bench/comfyui_parity.py needs from ComfyUI for a bare GPU machine (no internet, no
# ComfyUI): the Python sources of $COMFYUI_ROOT/comfy (no tokenizers or other data files) plus the
# few top-level modules comfy imports, into the git-ignored .comfy/ComfyUI, and wheels of its
# import-time dependencies that the lent GPU image lacks (torchsde, trampoline) into .comfy/wheels.
# ComfyUI is GPL-3.0: its LICENSE travels with the copy; nothing of it enters the repository.
#
#   COMFYUI_ROOT=/path/to/ComfyUI bash bench/pack_comfyui.sh
#
# Then carry ".comfy" (and ".whl") and put .comfy/ComfyUI on PYTHONPATH (docs/comfyui.md,
# "Parity bench"). Wheel versions: TORCHSDE_VERSION, TRAMPOLINE_VERSION (pure-Python wheels).
set -euo pipefail
root=${COMFYUI_ROOT:?set COMFYUI_ROOT to a ComfyUI tree}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=$repo/.comfy
[ -f "$root/comfy/ldm/wan/model.py" ] || { echo "$root is not a ComfyUI tree (no comfy/ldm/wan/model.py)" >&2; exit 1; }

exclude=$(git -C "$repo" rev-parse --git-path info/exclude)
case $exclude in /*) ;; *) exclude=$repo/$exclude ;; esac
grep -qxF '/.comfy/' "$exclude" 2>/dev/null || echo '/.comfy/' >>"$exclude"

rm -rf "$dest/ComfyUI"
mkdir -p "$dest/ComfyUI" "$dest/wheels"
(cd "$root" && find comfy -name '*.py' -not -path '*/__pycache__/*' -print0 | tar --null -T - -cf -) |
  (cd "$dest/ComfyUI" && tar -xf -)
for f in comfyui_version.py node_helpers.py folder_paths.py LICENSE; do
  [ -f "$root/$f" ] && cp "$root/$f" "$dest/ComfyUI/$f"
done

rm -f "$dest"/wheels/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dest/wheels" "torchsde==${TORCHSDE_VERSION:-0.2.6}" "trampoline==${TRAMPOLINE_VERSION:-0.1.2}"

version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$dest/ComfyUI/comfyui_version.py" 2>/dev/null || true)
echo "packed ComfyUI ${version:-?} from $root: $(find "$dest/ComfyUI" -name '*.py' | wc -l) files," \
  "$(du -sh "$dest" | cut -f1) in $dest; wheels: $(cd "$dest/wheels" && ls)"
