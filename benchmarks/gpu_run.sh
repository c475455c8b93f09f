#!/usr/bin/env bash
# On the GPU machine: set up (once per machine) what benchmarks/comfyui_gpu.py needs, then
# run it with the arguments given. Carried in .gpu/ (ignored by git, see README):
#   .gpu/carry/site.tar.xz     ComfyUI's and the project's missing wheels, unpacked
#   .gpu/carry/comfyui.tar.xz  the ComfyUI source (../shared/comfyui, trimmed)
# Random full-size Wan 2.2 A14B T2V weights are generated there (scripts/comfyui_models.py).
set -euo pipefail
cd "$(dirname "$0")/.."
B=/tmp/stv-gpu
if [ ! -f $B/ready ]; then
  mkdir -p $B/site $B/comfyui $B/models
  t=$(date +%s)
  xz -dc -T0 .gpu/carry/site.tar.xz | tar -C $B/site -xf -
  xz -dc -T0 .gpu/carry/comfyui.tar.xz | tar -C $B/comfyui -xf -
  echo "unpacked in $(( $(date +%s) - t ))s"
  (cd $B/comfyui && PYTHONPATH=$B/site python3 "$OLDPWD/scripts/comfyui_models.py" full $B/models)
  touch $B/ready
fi
export PYTHONPATH=$B/site:$PWD/benchmarks/gpu_shims PYTHONUNBUFFERED=1
exec python3 benchmarks/comfyui_gpu.py --comfyui $B/comfyui --models $B/models "$@"
