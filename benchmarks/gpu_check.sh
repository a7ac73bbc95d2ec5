#!/usr/bin/env bash
# The one-shot GPU check (see /work/shared/GPU.md): install over the machine's own torch/triton,
# run every gpu test, run every benchmark in --quick mode, print a table last, and leave at most
# 8 files under $OUT. Every step has a time limit, and the whole run has a deadline
# ($GPU_CHECK_BUDGET_S, default 450 s) that later steps are cut to.
#
#   bash benchmarks/gpu_check.sh               # on the GPU machine (OUT=folder; default a temp dir)
#   bash benchmarks/gpu_check.sh --rehearsal   # on a CPU: tiny shapes, no install, tests collected only
#
# Files under $OUT: gpu_check.log (every step's output), results.json (environment, steps,
# pytest summary, every benchmark's records), summary.txt (the final table), bench-json.tar.gz
# (each benchmark's own JSON), and on a GPU pytest_gpu.xml (junit). Split results.json into benchmarks/results/ with
# `python benchmarks/collect_results.py split $OUT/results.json`.
set -u -o pipefail

MODE=gpu
case "${1:-}" in
  "") ;;
  --rehearsal) MODE=rehearsal ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--rehearsal]" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ "$MODE" == rehearsal && -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON="$ROOT/.venv/bin/python"
  elif command -v python3 >/dev/null; then
    PYTHON=python3  # the GPU image's torch lives in its python3
  else
    PYTHON=python
  fi
fi
OUT=${OUT:-$(mktemp -d -t gpu-check-out-XXXXXX)}
mkdir -p "$OUT"
SCRATCH=$(mktemp -d -t gpu-check-XXXXXX)
trap 'rm -rf "$SCRATCH"' EXIT
BENCH_DIR="$SCRATCH/bench"
STEPS="$SCRATCH/steps.tsv"
LOG="$OUT/gpu_check.log"
mkdir -p "$BENCH_DIR"
: >"$LOG"
: >"$STEPS"

if [[ "$MODE" == rehearsal ]]; then
  BUDGET=${GPU_CHECK_BUDGET_S:-420}
  LIMIT_SCALE=2  # step limits are sized for an H100; a shared 2-core CPU gets twice as long
  DEVICE=(--device cpu)
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" LLM2VEC_FAST_MICRO_ROUNDS=2
else
  BUDGET=${GPU_CHECK_BUDGET_S:-450}
  LIMIT_SCALE=1
  DEVICE=(--device cuda)
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
DEADLINE=$(($(date +%s) + BUDGET))

# run_step NAME LIMIT_S COMMAND...: run under `timeout`, cut to the deadline; log; record the outcome.
run_step() {
  local name=$1 limit=$(($2 * LIMIT_SCALE))
  shift 2
  local left=$((DEADLINE - $(date +%s)))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    printf '%s\t%s\t%s\t%s\n' "$name" "-" "0" "not run: out of time" >>"$STEPS"
    echo "=== $name: not run (deadline reached)" | tee -a "$LOG"
    return 0
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$(date +%s.%N) rc=0
  timeout -s INT -k 15 "$limit" "$@" >>"$LOG" 2>&1 || rc=$?  # SIGINT: pytest still writes its junit file
  local seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  local status=ok
  ((rc == 124 || rc == 137)) && status="timed out after ${limit}s"
  ((rc != 0 && rc != 124 && rc != 137)) && status="failed (exit $rc)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$status" >>"$STEPS"
  echo "=== $name: $status in ${seconds}s" | tee -a "$LOG"
}

bench() {  # bench NAME LIMIT_S SCRIPT [ARGS...]: one benchmark script in quick mode
  local name=$1 limit=$2 script=$3
  shift 3
  run_step "bench $name" "$limit" "$PYTHON" "benchmarks/$script" --quick "${DEVICE[@]}" --out "$BENCH_DIR" "$@"
}

ENVIRONMENT='
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
import triton; print("triton", triton.__version__)
import transformers; print("transformers", transformers.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
from llm2vec_fast._ext import extension_loaded
print("llm2vec_fast._C loaded:", extension_loaded())'
if [[ "$MODE" == gpu ]]; then
  nvidia-smi >>"$LOG" 2>&1 || true
  run_step install 120 env MAX_JOBS=16 "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -e .
  # without the package installed nothing below can import it: retry without the C++/CUDA extension
  if ! "$PYTHON" -c "import llm2vec_fast.kernels" >/dev/null 2>&1; then
    run_step "install without the extension" 60 env LLM2VEC_FAST_NO_EXTENSION=1 "$PYTHON" -m pip install --no-deps \
      --no-build-isolation --no-index -e .
  fi
fi
run_step environment 60 "$PYTHON" -c "$ENVIRONMENT"

if [[ "$MODE" == gpu ]]; then
  # A cold Triton cache compiles a few hundred kernel variants (~2 s each on one core; see
  # tests/compile_kernels.py): with pytest-xdist (in the GPU image) 8 workers compile in parallel.
  WORKERS=()
  "$PYTHON" -c "import xdist" >/dev/null 2>&1 && WORKERS=(-n 8)
  run_step "pytest -m gpu" 180 "$PYTHON" -m pytest -m gpu "${WORKERS[@]}" -p no:cacheprovider -v --tb=short \
    --junitxml="$OUT/pytest_gpu.xml" tests
else
  run_step "pytest -m gpu --collect-only" 90 "$PYTHON" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests
fi

# In the order of what the open issues need most: the deadline cuts the last ones first. Every
# benchmark writes its JSON after each record, so one cut short keeps what it measured.
if [[ "$MODE" == gpu ]]; then ENCODE_ARGS=(); else ENCODE_ARGS=(--configs tiny); fi
bench attention 80 bench_attention.py
bench contrastive 30 bench_contrastive.py
bench mntp_loss 30 bench_mntp_loss.py
bench encode 100 bench_encode.py --source random "${ENCODE_ARGS[@]}"

MODEL="$SCRATCH/model"
CORPUS="$SCRATCH/corpus.txt"
if [[ "$MODE" == gpu ]]; then MODEL_CONFIG=smollm2-135m; DOCS=2000; else MODEL_CONFIG=tiny; DOCS=32; fi
run_step "random model + corpus" 90 "$PYTHON" -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from random_model import write_model_folder
from workloads import write_corpus
write_model_folder('$MODEL_CONFIG', Path('$MODEL'))
write_corpus(Path('$CORPUS'), $DOCS)"
bench embed 45 bench_embed.py --model "$MODEL" --corpus "$CORPUS" --docs "$DOCS"
bench pooling 25 bench_pooling.py
bench fusions 30 bench_fusions.py
bench train 45 bench_train.py --model "$MODEL"
if [[ "$MODE" == rehearsal ]]; then
  bench encode-texts 60 bench_encode.py --source texts --model "$MODEL" --dtypes float32 --texts 8
fi
run_step micro-benchmarks 45 "$PYTHON" -m pytest benchmarks/micro --benchmark-only -q -p no:cacheprovider \
  --benchmark-json="$BENCH_DIR/micro.json"

echo "results under $OUT"
tar -czf "$OUT/bench-json.tar.gz" -C "$BENCH_DIR" . 2>>"$LOG"  # the raw files, whatever combine does
"$PYTHON" benchmarks/collect_results.py combine --mode "$MODE" --steps "$STEPS" --bench-dir "$BENCH_DIR" \
  --junit "$OUT/pytest_gpu.xml" --log "$LOG" --out "$OUT/results.json" --summary "$OUT/summary.txt"
status=$?
count=$(find "$OUT" -type f | wc -l)
((count > 8)) && echo "warning: $count files under $OUT (at most 8 wanted)"
exit $status
