#!/usr/bin/env bash
# One-shot check on a machine with a CUDA GPU: exactness on the device, then the figures that
# docs/benchmarks.md leaves open for GPUs (explain vs forward, and the HTTP load at 224 px fp16).
# At most 9 minutes on one H100/H200 (a first, shorter form took 148 s on an H200); each step has its own time limit, so
# one slow step cannot eat the others' time. Results go to OUT_DIR (default: $OUT if set, else gpu-out/).
#
#   bash benchmarks/gpu_wheels.sh                 # here, once: wheels the GPU image lacks -> .whl/
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # there, from the repository root, .whl carried
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import app.main, uvicorn" 2>"$OUT_DIR/import_error.txt"; then
    echo "the service does not import (no .whl/ carried? run benchmarks/gpu_wheels.sh here first):"
    cat "$OUT_DIR/import_error.txt"
    exit 1
fi
rm -f "$OUT_DIR/import_error.txt"  # only result files in OUT_DIR (7 of them)
{ nvidia-smi; "$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } \
    > "$OUT_DIR/machine.txt" 2>&1
WORKERS=${WORKERS:-4}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its output, go on either way
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    # SIGINT first, so that the load test stops the servers it started; SIGKILL 20 s later
    timeout -s INT -k 20 "$limit" "$@" > "$OUT_DIR/$name.txt" 2>&1
    echo "== $name: exit $?"
    tail -n 25 "$OUT_DIR/$name.txt"
}

# 1. The CPU's exactness contracts, on the device (tests/unit/test_cuda.py), and the tensor image
#    path (nvJPEG decode, resize, rendering) against the Pillow path.
step cuda_tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/unit/test_cuda.py \
    tests/unit/test_device_images_cuda.py
# 2. Explanation vs forward pass, batch 64, fp32/fp16/bf16 (targets: b/a >= 0.9, b/c >= 10).
step bench_engine 120 "$PY" benchmarks/bench_engine.py --device cuda --reference-iters 2
# 3. The same at batch 256 in fp16, where the forward is no longer bound by kernel launches.
step bench_engine_b256 60 "$PY" benchmarks/bench_engine.py --device cuda --batch 256 --dtypes fp16 \
    --models deit_small_patch16_224,deit_base_patch16_224 --reference-iters 0
# 4. Where explain makes the host wait for the device, and profiler tables of explain and forward:
#    deit_small fp16 batch 64 (bound by kernel launches) and deit_base, the b/a target's model.
step profile 45 "$PY" benchmarks/profile_explain.py --device cuda
step profile_base 45 "$PY" benchmarks/profile_explain.py --device cuda --model deit_base_patch16_224
# 5. HTTP load at 224 px, fp16, batches up to 128, WORKERS HTTP workers feeding one shared engine
#    process (target: 3,000 explained images/s); the variant server gives every worker its own model
#    and batcher (--engine per-worker). One 320x320 JPEG per request, decoded on the GPU by the
#    workers (image_path auto) and handed to the engine by CUDA IPC, from 4 load-generator processes
#    (each reports its own CPU, so it is seen not to be the limit).
step load_test 210 "$PY" benchmarks/load_test.py --arch deit_small_patch16_224 --device cuda \
    --dtype fp16 --endpoint explain --image-size 320 --images-per-request 1 --client-processes 4 \
    --concurrency 64 256 512 --requests 2048 --rounds 1 --max-batch 128 --workers "$WORKERS" \
    --variant-serve '--engine per-worker'
