#!/usr/bin/env bash
# One prepared GPU run for issue 12: the CUDA tests, then the benchmarks on --device cuda.
# Everything goes to benchmarks/results/gpu_* (or $OUT/ when set, e.g. the device machine's $OUT).
#   bash benchmarks/gpu.sh            # from the repository root, with .venv installed
# Sized to fit about 10 minutes on one H200; each step has its own timeout so one slow step
# cannot eat the others' time.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RES=${OUT:-benchmarks/results}
mkdir -p "$RES"
export PYTHONPATH=.
step() {  # step NAME TIMEOUT CMD...: run, keep its output and exit status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$RES/gpu_$name.txt" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$RES/gpu_summary.txt"
}
: > "$RES/gpu_summary.txt"
step nvidia_smi 30 nvidia-smi
step tests 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_lipsdp_core.py tests/test_compositional.py
# LipSDP-Neuron and the compositional tier on the GPU (target: 784-1000x10-10 in < 10 s); no SCS here
step lipsdp_speed 300 "$PY" benchmarks/lipsdp_speed.py --device cuda --widths 100,300,1000 --depths 2,5,10 \
    --scs-eps "" --threads 8 --json "$RES/gpu_lipsdp_speed.json"
# ResNet-18 at 224x224 with product / rslmi / layerwise (target: < 5 s of bound computation)
step resnet18 240 "$PY" benchmarks/scalable.py --models resnet18 --device cuda --lower-budget 5
cat "$RES/gpu_summary.txt"
