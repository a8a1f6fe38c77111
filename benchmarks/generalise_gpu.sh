#!/bin/bash
# The correction loop of benchmarks/generalise.py on a machine with a GPU and many cores:
# one process per (set, seed, variant), JOBS at a time, results packed into
# $OUT/results.tgz after LIMIT seconds at most. The real images travel packed:
#   .venv/bin/python benchmarks/generalise.py --pack .gpu/data --seeds 0 1 2 \
#       --sets nuclei-u2os nuclei-he-monuseg cells-phase-usiigaci
# and, where segmentation_models_pytorch is missing, its wheel in .whl/.
# env: VARIANTS (required), SYNV (variants on synthetic sets), SEEDS, SETS, SYN, JOBS,
# LIMIT, DEVICE (cuda), PY (python3), EXTRA (more arguments), ENGINE_COMMIT
# Then: .venv/bin/python benchmarks/generalise.py --report <the result files>
set -u
PY=${PY:-python3}
if [ -d .whl ] && [ "$PY" = python3 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PY DEVICE=${DEVICE:-cuda} OUT EXTRA=${EXTRA:-}
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
$PY -c "import torch, segmentation_models_pytorch as smp, timm, cellfit.train; print('torch', torch.__version__, 'smp', smp.__version__, 'timm', timm.__version__, 'cuda', torch.cuda.is_available())" || exit 1
mkdir -p $OUT/res
{
for v in $VARIANTS; do for seed in ${SEEDS:-0 1 2}; do for s in ${SETS:-nuclei-u2os nuclei-he-monuseg cells-phase-usiigaci}; do
  echo "$s $seed $v --data .gpu/data"; done; done; done
for v in ${SYNV:-$VARIANTS}; do for s in ${SYN:-synthetic-fluo_nuclei synthetic-he synthetic-phase}; do
  echo "$s 0 $v"; done; done
} > $OUT/res/jobs.txt
one() {  # set seed variant [more args]
  local s=$1 seed=$2 v=$3; shift 3
  $PY benchmarks/generalise.py --sets $s --seeds $seed --parts cellfit --variant $v \
      --device $DEVICE --threads 1 --out $OUT/res --tag=-$v $EXTRA "$@" > $OUT/res/$s-$seed-$v.log 2>&1
}
export -f one
setsid bash -c "xargs -P ${JOBS:-16} -L 1 bash -c 'one \"\$@\"' _ < $OUT/res/jobs.txt" &
end=$((SECONDS + ${LIMIT:-520})); sleep 15
while [ $SECONDS -lt $end ] && { pgrep -f "generalise.py" >/dev/null || pgrep -x xargs >/dev/null; }; do sleep 5; done
echo "waited $SECONDS s; still running: $(pgrep -f generalise.py | wc -l)"
pkill -f xargs; pkill -f generalise.py; sleep 1
grep -h "round\|Error" $OUT/res/*.log | tail -n 100
(cd $OUT && tar czf results.tgz res && rm -rf res)
