#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one run (CI has no GPU and skips them):
#   - the CUDA tests (`pytest -m gpu`): AMP training and tiled prediction against the
#     CPU, the speed benchmark's training part, the batch on the GPU;
#   - a real CUDA out-of-memory (the allocator capped at 1.5 GiB) in training and in
#     prediction: the batch is halved until it fits and the run goes on;
#   - AMP training (bf16, and fp16 with its gradient scaler) stopped and resumed from
#     its checkpoint, against the same run left alone;
#   - `cellfit devices` and a short `cellfit train` / `cellfit predict` on the GPU.
# Needs torch, torchvision, timm, scikit-image and tifffile on the machine; the other
# packages come as wheels in .whl/ (smp, pytest, hypothesis and their pure-Python
# dependencies). Usage: OUT=folder bash scripts/gpu_checks.sh (logs go to $OUT).
set -u
OUT=${OUT:-/tmp/cellfit-gpu-checks}
mkdir -p "$OUT"
SITE=/tmp/cellfit-site
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-200}
python -m pip install -q --no-deps --no-index --target "$SITE" .whl/*.whl 2>&1 | tail -3
export PYTHONPATH="$SITE:$PWD/src"
export CUBLAS_WORKSPACE_CONFIG=:4096:8
export HF_HUB_OFFLINE=1
{
  nvidia-smi -L
  python -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, torch.cuda.get_device_name())"
  python -m cellfit.cli devices
} 2>&1 | tee "$OUT/devices.txt"

# warnings are shown, not turned into errors: another torch may warn where ours does not
python -m pytest -q -m gpu -W default::UserWarning -p no:cacheprovider \
  --junitxml "$OUT/pytest.xml" --durations 0 \
  tests/test_gpu.py tests/test_batch.py 2>&1 | tee "$OUT/pytest.log"
status=${PIPESTATUS[0]}

# the command line on the GPU: a short training and a prediction
work=$(mktemp -d)
python - "$work" <<'PY'
import sys
from pathlib import Path
import tifffile
from cellfit.synthetic import sparse_annotation, synthetic_cells
d = Path(sys.argv[1])
(d / "images").mkdir(); (d / "labels").mkdir()
for i in range(3):
    img, lab = synthetic_cells((384, 384), n_cells=40, seed=i)
    tifffile.imwrite(d / "images" / f"s{i}.tif", img)
    tifffile.imwrite(d / "labels" / f"s{i}.tif", sparse_annotation(lab, 0.5, seed=i))
PY
{
  time python -m cellfit.cli train "$work/images" --labels "$work/labels" --out "$work/m.cellfit" \
    --device "$DEVICE" --steps "$STEPS"
  time python -m cellfit.cli predict "$work/m.cellfit" "$work/images" --out "$work/pred" --device "$DEVICE"
  ls -l "$work/pred"
} 2>&1 | tee "$OUT/cli.log"
exit "$status"
