#!/usr/bin/env bash
# One device session's worth of checks, in the order of what matters most, each stage under its own
# timeout so a slow one cannot eat the rest; results are written as they come.
#
#   1. cifar10: `ddpmctl bench` and diffusers side by side (benchmarks/peer_diffusers.py)
#   2. the CUDA path of the CLI: train shapes (compiled), resume, sample ddpm and dpm-solver++,
#      bench --preset shapes; plus benchmarks/check_fast_paths.py (fast paths vs fp32 eager)
#   3. celeba: bench and diffusers' 64x64 example model side by side (sampling uncompiled, to fit)
#   4. cifar10 against lucidrains' denoising-diffusion-pytorch, when installed and time is left
#
# On the GPU machine (wheels for what its image lacks in .whl/, see docs/performance.md):
#   bash benchmarks/gpu_check.sh                      # OUT must name an empty folder
# Rehearsal on a CPU (tiny sizes, same code paths where the CPU has them):
#   DEVICE=cpu TINY=1 OUT=/tmp/gpucheck bash benchmarks/gpu_check.sh
#
# $OUT receives at most 8 files: env.txt log.txt cifar10.json celeba.json cli.jsonl fast_paths.json
# lucidrains.json
# (run directories and images stay under $WORK).
set -u
: "${OUT:?set OUT to an output folder}"
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
WORK=${WORK:-/tmp/ddpmctl-gpucheck}
TOTAL=${TOTAL:-405}          # seconds for the whole script; celeba gets what is left
T_CIFAR=${T_CIFAR:-185}
T_CLI=${T_CLI:-75}
START=$(date +%s)
export PYTHONUNBUFFERED=1
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK"
LOG="$OUT/log.txt"
CLI="$OUT/cli.jsonl"
: >"$CLI"

if [ -n "${TINY:-}" ]; then
  PEER_ARGS=(--batch-size 2 --sample-batch-size 2 --steps 1 --warmup 1 --repeats 1 --sample-steps 2 --no-tuned)
  TRAIN_ARGS=(--max-steps 3 --set train.batch_size=4 --set sample.grid_size=4 --set sample.steps=2
              --set model.base_channels=16 --set model.groups=8 --set model.head_channels=16 --set model.time_embed_dim=32)
  RESUME_ARGS=(--max-steps 4)
  SAMPLE_N=2
  BENCH_ARGS=(--batch-size 2 --steps 1 --repeats 1 --warmup 1 --sample-batch-size 2 --sample-steps 2)
else
  PEER_ARGS=(--steps 15 --warmup 8 --repeats 3 --sample-steps 30)
  TRAIN_ARGS=(--max-steps 30)
  RESUME_ARGS=(--max-steps 40)
  SAMPLE_N=8
  BENCH_ARGS=(--steps 10 --repeats 3 --sample-steps 30)
fi

{
  date -u
  nvidia-smi 2>&1 || true
  "$PY" - <<'EOF'
import platform, sys, torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print(torch.cuda.get_device_name(), torch.cuda.get_device_capability(), torch.cuda.mem_get_info())
try:
    import diffusers, pydantic
    print("diffusers", diffusers.__version__, "pydantic", pydantic.__version__)
except Exception as exc:
    print("import failed:", exc)
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage() {  # stage NAME TIMEOUT CMD...: run, log, and record rc and seconds in cli.jsonl
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*" | tee -a "$LOG"
  local t0 t1 rc
  t0=$(date +%s.%N)
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $secs}" | tee -a "$CLI"
  tail -n 3 "$LOG"
}

# 1. cifar10 side by side
stage peer_cifar10 "$T_CIFAR" "$PY" benchmarks/peer_diffusers.py --preset cifar10 --device "$DEVICE" \
  --json-out "$OUT/cifar10.json" "${PEER_ARGS[@]}"

# 2. the CLI's CUDA path, and beside it (correctness only, no timings taken) the fast-path check
RUN="$WORK/run"
(
  stage train "$T_CLI" "$PY" -m ddpmctl train shapes --device "$DEVICE" --out "$RUN" --json "${TRAIN_ARGS[@]}"
  stage resume 40 "$PY" -m ddpmctl resume "$RUN" --json "${RESUME_ARGS[@]}"
  stage sample_ddpm 30 "$PY" -m ddpmctl sample "$RUN" --n "$SAMPLE_N" --sampler ddpm --device "$DEVICE" \
    --out "$WORK/ddpm" --json
  stage sample_dpm 30 "$PY" -m ddpmctl sample "$RUN" --n "$SAMPLE_N" --sampler dpm-solver++ --device "$DEVICE" \
    --out "$WORK/dpm" --json
  echo "{\"stage\": \"pngs\", \"ddpm\": $(ls "$WORK"/ddpm/*.png 2>/dev/null | wc -l), \"dpm\": $(ls "$WORK"/dpm/*.png 2>/dev/null | wc -l)}" | tee -a "$CLI"
) &
CHAIN=$!
LOG="$WORK/fast_paths.log" stage fast_paths 100 "$PY" benchmarks/check_fast_paths.py --device "$DEVICE" \
  --json-out "$OUT/fast_paths.json"
wait "$CHAIN"
cat "$WORK/fast_paths.log" >>"$LOG" 2>/dev/null

# 3. celeba side by side, in the time left
LEFT=$(( TOTAL - ($(date +%s) - START) ))
if [ "$LEFT" -gt 30 ]; then
  stage peer_celeba "$LEFT" "$PY" benchmarks/peer_diffusers.py --preset celeba --device "$DEVICE" \
    --json-out "$OUT/celeba.json" --no-sample-compile "${PEER_ARGS[@]}"
else
  echo "{\"stage\": \"peer_celeba\", \"skipped\": \"only ${LEFT}s left\"}" | tee -a "$CLI"
fi
# 4. lucidrains' denoising-diffusion-pytorch on cifar10, only if installed and time is left
LEFT=$(( TOTAL - ($(date +%s) - START) ))
if "$PY" -c "import denoising_diffusion_pytorch" 2>/dev/null && { [ -n "${TINY:-}" ] || [ "$LEFT" -gt 90 ]; }; then
  LUC_ARGS=()
  for a in "${PEER_ARGS[@]}"; do [ "$a" = --no-tuned ] || LUC_ARGS+=("$a"); done  # a diffusers-only flag
  stage peer_lucidrains $(( LEFT > 60 ? LEFT - 30 : 60 )) "$PY" benchmarks/peer_lucidrains.py --preset cifar10 \
    --device "$DEVICE" --json-out "$OUT/lucidrains.json" "${LUC_ARGS[@]}"
else
  echo "{\"stage\": \"peer_lucidrains\", \"skipped\": \"not installed or only ${LEFT}s left\"}" | tee -a "$CLI"
fi
if [ -n "${TINY:-}" ] || [ "$(( TOTAL - ($(date +%s) - START) ))" -gt 40 ]; then
  stage bench_cli 40 "$PY" -m ddpmctl bench --preset shapes --device "$DEVICE" --json "${BENCH_ARGS[@]}"
fi

echo "=== summary"
cat "$CLI"
grep -A 14 -E "^(cifar10|celeba) on " "$LOG" || true
