#!/usr/bin/env bash
# The GPU check of the training core: the gpu-marked tests and the benchmark suites, one report folder.
#
#   bench/gpu_check.sh --fetch-wheels        here, with PyPI: put the wheels the GPU machine lacks into .whl/
#   bench/gpu_check.sh [--device cuda|cpu] [--out DIR]
#
# On a GPU (default --device cuda) it runs, within about 8 minutes on one H100/H200-class GPU:
#   1. pytest -m gpu on tests/trainables (CUDA augmentation equals the CPU's, no host sync in a warm step, resume
#      on CUDA compared on values, bf16 within the fp32 accuracy band, the memory probe)
#   2. python -m trainables.bench --suite augment,step,reference,packing (WRN-28-2, B=64, mu=2, FixMatch+DASO)
# `--device cpu` tries the same script on a CPU with a small network and few steps (the gpu tests skip there).
# The report folder (default $OUT where the device tool sets it, else bench-report/) gets env.txt, gpu-tests.txt,
# bench.txt and bench.json. Needs torch, numpy, Pillow, PyYAML, filelock and pytest; pydantic comes from .whl/ when
# the machine lacks it.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
REPORT="${OUT:-bench-report}"
# pydantic and its own needs, at the versions constraints.txt pins
mapfile -t WHEELS < <(grep -iE '^(pydantic|pydantic_core|annotated-types|typing-inspection)==' constraints.txt)
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) REPORT="$2"; shift 2 ;;
    --fetch-wheels)
      grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
      exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" ;;
    *) echo "gpu_check.sh: unknown argument $1 (valid: --device cuda|cpu, --out DIR, --fetch-wheels)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu, not $DEVICE" >&2; exit 2 ;; esac
mkdir -p "$REPORT"
PY=python3
[ -x .venv/bin/python ] && [ "$DEVICE" = cpu ] && PY=.venv/bin/python

if ! $PY -c "import pydantic" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_check.sh: pydantic is missing and .whl/ is empty; run --fetch-wheels where PyPI is reachable and carry .whl" >&2; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8

{
  date -u +"%Y-%m-%d %H:%M UTC"
  $PY -c "import torch, platform; print('torch', torch.__version__, '| python', platform.python_version(), '| cuda', torch.version.cuda, '| devices', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])"
  nproc
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
} > "$REPORT/env.txt" 2>&1
cat "$REPORT/env.txt"

status=0
echo "== gpu tests"
timeout 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests/trainables -rs 2>&1 | tee "$REPORT/gpu-tests.txt" || status=1

echo "== benchmark"
if [ "$DEVICE" = cuda ]; then
  ARGS=(--steps 50 --warmup 10 --aug-rounds 5 --aug-seconds 1 --workers "$(( $(nproc) < 8 ? $(nproc) : 8 ))" --pack 1,2,4 --pack-seconds 15)
else
  ARGS=(--depth 10 --widen 1 --steps 3 --warmup 1 --variants fp32,bf16 --pack-variant bf16 --aug-rounds 3 --aug-seconds 0.5 --workers 2 --pack 1,2 --pack-seconds 3)
fi
timeout 420 $PY -m trainables.bench --suite augment,step,reference,packing --device "$DEVICE" --out "$REPORT" "${ARGS[@]}" \
  2>&1 | tee "$REPORT/bench.txt" || status=1
echo "== report in $REPORT (exit $status)"
exit $status
