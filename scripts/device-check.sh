#!/usr/bin/env bash
# One prepared run on the GPU machine (see scripts/gpu-bundle.sh): every GPU test, the example
# in each mode with and without offload, and the benches. Writes logs and summary.json to $OUT.
# GPU requirements are strict here: a missing driver or NVRTC fails instead of skipping.
set -uo pipefail
cd "$(dirname "$0")/.."
B=.gpu
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
export BURN_OFFLOAD_REQUIRE_GPU=1 BURN_OFFLOAD_REQUIRE_NVRTC=1 RUST_LOG=${RUST_LOG:-info}
export CUDA_PATH=${CUDA_PATH:-/usr/local/cuda}
summary="$OUT/summary.jsonl"
: > "$summary"
run() { # name, command...
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '{"step":"%s","rc":%d,"seconds":%d}\n' "$name" "$rc" "$((SECONDS - start))" >> "$summary"
  printf '%-40s rc=%d (%ds)\n' "$name" "$rc" "$((SECONDS - start))"
  tail -n 5 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv > "$OUT/gpu.csv" 2>&1
cat "$OUT/gpu.csv"
for t in "$B"/tests/*; do
  run "test-$(basename "$t")" "$t" --test-threads=1
done
for mode in uva copy auto; do
  run "example-$mode" "$B/examples/llama" --device cuda --preset small --offload-gb 0.05 --mode "$mode"
done
run "example-resident" "$B/examples/llama" --device cuda --preset small --offload-gb 0
for b in "$B"/benches/*; do
  run "bench-$(basename "$b")" env BANDWIDTH_JSON="$OUT/bandwidth.json" \
    OFFLOAD_BENCH_JSON="$OUT/offload_cuda.json" "$b" --bench
done
python3 - "$summary" > "$OUT/summary.json" <<'PY'
import json, sys
print(json.dumps([json.loads(l) for l in open(sys.argv[1])], indent=1))
PY
echo "failed steps: $(grep -vc '"rc":0' "$summary")"
