#!/usr/bin/env bash
# The GPU verification of issue #20, in one run on the device machine (results under $OUT):
#   1. the wheels it lacks (./wheels, made here by scripts/gpu_wheels.sh and carried), installed
#      offline;
#   2. random-weight Llama checkpoints written by transformers (no model hub there): tiny, and the
#      shapes in SHARD_GPU_CHECK_SHAPES ("1b 8b"), quantized to Q4_0 at load;
#   3. the int4 layer tests and the device model tests on the GPU (SHARD_TEST_DEVICE), which
#      include the cross-check against transformers on the same GPU;
#   4. a static two-Scout swarm on the GPU answering like a single process (gpu_swarm_check.py);
#   5. bench/engine.py --device cuda per shape: prefill, decode at batch 1/8/32, GPU memory, against
#      plain torch (dequantized weights, bf16 F.linear) on the same shapes.
# Every step runs even if an earlier one failed; the exit status says whether all passed.
# Dry run on a CPU: SHARD_GPU_CHECK_DEVICE=cpu SHARD_GPU_CHECK_SHAPES= OUT=/tmp/gpu bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=${SHARD_GPU_CHECK_DEVICE:-cuda}
SHAPES=${SHARD_GPU_CHECK_SHAPES-1b 8b}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 SHARD_TEST_DEVICE=$DEVICE
status=0
step() {  # step NAME COMMAND...: its output in $OUT/NAME.log, its result in $OUT/summary.txt
    local name=$1
    shift
    local t0=$SECONDS
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: $([ $rc -eq 0 ] && echo passed || echo "FAILED ($rc)") in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    [ $rc -eq 0 ] || status=1
}
: >"$OUT/summary.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" \
    | tee -a "$OUT/summary.txt"
if [ -d wheels ]; then
    step wheels python3 -m pip install --quiet --no-index --no-deps --break-system-packages --find-links wheels -r wheels/requirements.txt
fi
step models python3 -m bench.random_models --out "$WORK" tiny $SHAPES
step tests python3 -m pytest -q -p no:cacheprovider tests/unit/test_int4_layers.py tests/model/test_device.py
step swarm python3 scripts/gpu_swarm_check.py --model "$WORK/tiny" --device "$DEVICE" --out "$OUT"
for shape in $SHAPES; do
    step "bench-$shape" python3 bench/engine.py --model "$WORK/$shape" --quantize q4_0 --device "$DEVICE" --new-tokens 64 \
        --name "engine-$DEVICE-$shape"
    cp bench/results/"engine-$DEVICE-$shape".json "$OUT/" 2>/dev/null
done
rm -rf "$WORK"
cat "$OUT/summary.txt"
exit $status
