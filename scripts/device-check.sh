#!/usr/bin/env bash
# One prepared run on the GPU machine (see scripts/gpu-bundle.sh). The steps, declared below in
# their default order (most valuable first): the GPU tests (cuda_target one test at a time, its
# linear/matmul sweeps later), the example in uva mode, the offload_model bench (whole LLaMA
# models, offloaded vs plain burn-cuda), the 50b example (a model larger than the card), the
# sweeps, the example in the other modes and without offload, then the bandwidth and
# offload_cuda benches. GPU requirements are strict here: a missing driver or NVRTC fails
# instead of skipping.
#
# What comes back is limited to a few files, so every step's log is appended to $OUT/all.log
# as it finishes (it survives a kill), and a one-line-per-step summary goes to
# $OUT/summary.jsonl. Each step has its own time limit, so one hang cannot eat the whole device
# lease, and the whole script a deadline (TOTAL_S seconds, default 540): a step gets at most
# what is left, and none starts with under 20 s left. STEPS (a regex over step names, default
# all) picks steps; ORDER (regexes separated by spaces) runs first the steps that match its
# first regex, then those that match the second, and so on, each group in the default order;
# steps that match none of them do not run. Its default puts the steps that have never run
# on a GPU first (the copy engine's test, then prefetching through it beside CubeCL's copies
# on whole models (issue #25: which path wins per row decides the default), the copy engine's
# bench, the in-place quantized kernels' tests),
# then the quick tests (nvrtc compiles the quantized kernels too), then more steps
# that have never run (the fused-Cuda test, the unfused example, the Hugging Face
# directories, the example's training on 1b), then everything else. E.g.
#   ORDER="bench-offload_model example-big cuda_target-llama ." bash .gpu/device-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
B=.gpu
OUT=${OUT:-/tmp/device-check}
STEPS=${STEPS:-.}
ORDER=${ORDER:-"^test-cuda_copy_engine\$ ^bench-offload_model-engine\$ ^bench-copy_engine\$ ^cuda_target-quantized_ ^test- _fused\$ example-uva-unfused example-hf ^example-train- ."}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
TOTAL_S=${TOTAL_S:-540}
mkdir -p "$OUT"
# gpu-bundle.sh packs the stripped binaries (the carried tree is limited to 64 MiB).
if [ -f "$B/bin.tar.xz" ]; then tar xJf "$B/bin.tar.xz" -C "$B" || exit 1; fi
logs=$(mktemp -d)
# CubeCL tunes each new matmul/reduce shape (about 10 s a shape on an H100 with cubecl 0.10)
# and compiles kernels with NVRTC. Both caches live under target/ (autotune/, cuda/ for PTX,
# enabled by this cubecl.toml): restored from .gpu/cubecl-cache.tar.gz when carried, and saved
# to $OUT after every step, so that a later lease can skip the tuning.
[ -f cubecl.toml ] || printf '[compilation]\ncache = "target"\n' > cubecl.toml
mkdir -p target
if [ -f "$B/cubecl-cache.tar.gz" ]; then tar xzf "$B/cubecl-cache.tar.gz" -C target; fi
save_cache() {
  local dirs=()
  for d in autotune cuda; do [ -d "target/$d" ] && dirs+=("$d"); done
  [ "${#dirs[@]}" -gt 0 ] && tar czf "$OUT/cubecl-cache.tar.gz" -C target "${dirs[@]}"
}
export BURN_OFFLOAD_REQUIRE_GPU=1 BURN_OFFLOAD_REQUIRE_NVRTC=1 RUST_LOG=${RUST_LOG:-info}
export RUST_BACKTRACE=1 BANDWIDTH_REPS=${BANDWIDTH_REPS:-3}
if [ -z "${CUDA_PATH:-}" ]; then
  for c in /usr/local/cuda /usr/local/cuda-13.0 /usr/local/cuda-13 /opt/cuda; do
    [ -f "$c/include/cuda.h" ] && export CUDA_PATH=$c && break
  done
fi
echo "CUDA_PATH=${CUDA_PATH:-unset}"
summary="$OUT/summary.jsonl"
: > "$summary"
capped() { # a step's time limit, cut to what the TOTAL_S deadline leaves (less 5 s)
  local left=$((TOTAL_S - SECONDS - 5))
  echo $(($1 < left ? $1 : left))
}
names=() limits=() cmds=()
step() { # name, timeout, command...: declares a step (run later, in ORDER)
  [[ $1 =~ $STEPS ]] || return 0
  names+=("$1") limits+=("$2"); shift 2
  cmds+=("$(printf '%q ' "$@")")
}
run() { # index of a declared step
  local name=${names[$1]} limit; limit=$(capped "${limits[$1]}")
  if [ $((TOTAL_S - SECONDS)) -lt 20 ]; then
    printf '{"step":"%s","rc":-1,"seconds":0,"skipped":"deadline"}\n' "$name" >> "$summary"
    echo "$name: skipped (TOTAL_S deadline)"; return 0
  fi
  local start=$SECONDS
  # STEP_LIMIT: the step's own (deadline-trimmed) limit, for commands that pace themselves.
  STEP_LIMIT=$limit timeout -k 10 "$limit" bash -c "${cmds[$1]}" > "$logs/$name.log" 2>&1
  local rc=$?
  printf '{"step":"%s","rc":%d,"seconds":%d}\n' "$name" "$rc" "$((SECONDS - start))" >> "$summary"
  printf '%-32s rc=%d (%ds)\n' "$name" "$rc" "$((SECONDS - start))"
  { echo "===== $name rc=$rc ($((SECONDS - start))s)"; cat "$logs/$name.log"; } >> "$OUT/all.log"
  if [ "$rc" != 0 ]; then tail -n 25 "$logs/$name.log"; fi
  save_cache
}
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current --format=csv 2>&1 | tee "$OUT/gpu.csv"
bench() { # name, timeout: one bench binary, every JSON path in its environment
  [ -x "$B/benches/$1" ] || return 0
  # The model bench stops starting measurements 45 s before its (deadline-trimmed) limit (a
  # quarter of it under 60 s), so its table is printed before the kill.
  step "bench-$1" "$2" env BANDWIDTH_JSON="$OUT/bandwidth.json" \
    OFFLOAD_BENCH_JSON="$OUT/offload_cuda.json" MODEL_BENCH_JSON="$OUT/offload_model.json" \
    bash -c 'MODEL_BENCH_BUDGET_S=${MODEL_BENCH_BUDGET_S:-$((STEP_LIMIT > 60 ? STEP_LIMIT - 45 : STEP_LIMIT * 3 / 4))} exec "$0" --bench' \
    "$B/benches/$1"
}
# The steps, most valuable first (the deadline cuts the tail; ORDER can change the order).
# Never run on a GPU yet (issue #14): the copy engine's own stream, ring and flag kernels
# (test-cuda_copy_engine), and the bench that compares it with CubeCL's uploads on the same
# layers against the DMA bound at those sizes (bench-copy_engine, declared below).
# The integration tests are one binary (tests/it), a module per area: a step runs a module.
for t in cuda_copy_engine cuda_transfer nvrtc; do
  [ -x "$B/tests/it" ] && step "test-$t" 60 "$B/tests/it" "$t::" --test-threads=1
done
[ -x "$B/tests/burn_offload" ] && step "test-burn_offload" 60 "$B/tests/burn_offload" --test-threads=1
# cuda_target one test at a time (a slow one cannot hide the others), progress shown; the
# linear/matmul sweeps (many shapes, each autotuned by Burn's plain matmul) come after the
# whole-model steps.
target_tests=$("$B/tests/it" --list cuda_target:: 2>/dev/null | sed -n 's/^cuda_target::\(.*\): test$/\1/p')
# Never run on a GPU yet (issue #13): Burn's fused `Cuda` wrapped, in-place reads as lazy
# fusion custom ops, prefetched copies registered on the op thread.
fused=llama_generates_the_same_tokens_offloaded_fused
grep -qx "$fused" <<< "$target_tests" && step "cuda_target-$fused" 120 "$B/tests/it" --exact "cuda_target::$fused" --nocapture
# Never run on a GPU yet: quantized weights read in place (qmatmul_host.cu, qgather_host.cu):
# the kernels against an exact product and the codec's rows (every scheme, f32/f16/bf16), the
# in-place matmul's rate against the kernel-read bound (prints the fraction; the goal is
# >= 0.91), and a quantized model in uva/copy on the unfused and fused backends.
for t in $(grep '^quantized_' <<< "$target_tests"); do
  step "cuda_target-$t" 150 "$B/tests/it" --exact "cuda_target::$t" --nocapture
done
for t in $(grep -v -e '^linear_matmul' -e '^quantized_' -e "^$fused\$" <<< "$target_tests"); do
  step "cuda_target-$t" 120 "$B/tests/it" --exact "cuda_target::$t" --nocapture
done
# The example in uva mode first (on Burn's fused `Cuda`, the example's default, then the
# unfused backend): warm-up vs steady state shows where the time goes.
small=("$B/examples/llama" --device cuda --preset small --warmup 1)
step example-uva 60 "${small[@]}" --offload-gb 0.05 --mode uva
step example-uva-unfused 60 "${small[@]}" --fusion off --offload-gb 0.05 --mode uva
# Never run on a GPU yet (issue #15): a Hugging Face directory (the transformers fixture with
# its tokenizer, checked against a resident run) and a 7B-shaped random one (13.5 GB in bf16,
# written here with PyTorch) fitted into an 8 GiB budget: the plan, predicted against measured.
step example-hf-fixture 60 "$B/examples/llama" --device cuda --model tests/fixtures/hf/llama3-tied \
  --prompt "The quick brown fox" --gpu-budget-gb 0.0002 --reserve-gb 0 --mode uva
step example-hf-7b-fit 300 bash -c 'python3 scripts/make-hf-model.py --preset 7b --dtype bf16 "$2" &&
  "$1" --device cuda --dtype bf16 --model "$2" --gpu-budget-gb 8 --prompt-len 32 --gen-tokens 16 \
    --no-check --warmup 1 --mode auto; rc=$?; rm -rf "$2"; exit $rc' _ "$B/examples/llama" /tmp/hf-7b
# Never run on a GPU yet: `llama train` (examples/llama/train.rs) on the 1b preset in bf16
# (1.04 B parameters, 1.94 GiB), every weight offloaded (copy mode: the training step's 128 rows
# are beyond the in-place kernels' 16), Adam's state (bf16, 3.87 GiB) in host memory, then on
# the device: each prints the loss, the step time (step 1 apart: it autotunes every new matmul
# shape of the forward and backward pass, about 20 at 10 to 13 s each on the H100, so the first
# run gets the longer limit and the second reuses CubeCL's autotune cache), the bytes moved per
# step (weights uploaded, state up and back) and the peak device memory (total - free sampled
# every 10 ms); it fails if the loss does not go down. ORDER=^example-train- runs just these.
train1b=("$B/examples/llama" train --device cuda --dtype bf16 --preset 1b --offload-gb 4 --mode copy
  --steps 6 --batch 1 --seq-len 128 --log-every 1 --lr 1e-3)
step example-train-1b-state-host 420 "${train1b[@]}" --state host
step example-train-1b-state-device 180 "${train1b[@]}" --state device
bench copy_engine 90
# Never run on a GPU yet (issue #25): prefetching through the copy engine (`prefetch:engine`:
# the ring, one fill per group of the learned read order, acquire/release at group boundaries
# behind a drain of the fused stream) beside CubeCL's copies (`prefetch`), on the same
# weights, 1b and 7b in bf16, everything offloaded; both checked bit for bit against copy
# mode's logits. The table's last lines say which path wins per row, with each one's
# efficiency against its own bound.
[ -x "$B/benches/offload_model" ] && step bench-offload_model-engine 300 env \
  MODEL_BENCH_FRACTIONS=0,1 MODEL_BENCH_QUANT=none MODEL_BENCH_JSON="$OUT/offload_model_engine.json" \
  bash -c 'MODEL_BENCH_BUDGET_S=${MODEL_BENCH_BUDGET_S:-$((STEP_LIMIT > 60 ? STEP_LIMIT - 45 : STEP_LIMIT * 3 / 4))} exec "$0" --bench' \
  "$B/benches/offload_model"
# 1b and 7b in bf16: plain fused burn-cuda (Burn's default `Cuda`) vs 0/25/50/100 % offloaded
# in uva, copy and prefetch mode
# (stops starting measurements after MODEL_BENCH_BUDGET_S to print its table).
bench offload_model "${MODEL_BENCH_TIMEOUT:-400}"
# 50b (100.7 GB in bf16) on an 80 GB card: 40 GiB of weights created directly in pinned host
# memory, 53.8 GiB resident; prints the materialisation time, tokens/s and peak device memory.
step example-big 240 "$B/examples/llama" --device cuda --dtype bf16 --preset 50b --offload-gb 40 \
  --no-check --prompt-len 16 --gen-tokens 4 --warmup 1
for t in $(grep '^linear_matmul' <<< "$target_tests"); do
  step "cuda_target-$t" 60 "$B/tests/it" --exact "cuda_target::$t" --nocapture
done
for mode in copy prefetch auto; do
  step "example-$mode" 45 "${small[@]}" --offload-gb 0.05 --mode "$mode"
done
step example-resident 45 "${small[@]}" --offload-gb 0
bench bandwidth 90
bench offload_cuda "$STEP_TIMEOUT"
# Run the declared steps in ORDER.
done_steps=()
read -ra patterns <<< "$ORDER" # no glob expansion of the regexes
for pattern in "${patterns[@]}"; do
  for i in "${!names[@]}"; do
    [[ -z ${done_steps[$i]:-} && ${names[$i]} =~ $pattern ]] || continue
    done_steps[i]=1
    run "$i"
  done
done
echo "failed steps: $(grep -vc '"rc":0' "$summary")"
