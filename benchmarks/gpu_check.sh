#!/usr/bin/env bash
# The one-shot GPU check (see ../shared/GPU.md): install over the machine's own torch/triton, run
# every gpu test, run the benchmarks in --quick mode, print a table last.
#
#   bash benchmarks/gpu_check.sh               # on the GPU machine (OUT=folder; default a temp dir)
#   bash benchmarks/gpu_check.sh --rehearsal   # on a CPU: tiny shapes, no install, tests collected
#   GPU_CHECK_ONLY=pytest,attention bash benchmarks/gpu_check.sh   # a short rerun of some steps
#
# Steps, most valuable first, so that the deadline cuts the least valuable: nvidia-smi, install
# and environment (always run), then pytest (`pytest -m gpu`), attention, encode, tuning (the
# card's table of attention configs), contrastive, mntp_loss, fusions, pooling, model (the
# random model and corpus that embed and train read), embed, train, encode-texts (rehearsal
# only), micro. GPU_CHECK_ONLY takes a comma-separated list of these keys; the last lines of a
# run print the command that reruns every step that failed, was cut or did not run.
#
# Time: GPU_CHECK_BUDGET_S (default 480 s: one 540 s device call with a minute to spare) bounds
# the whole run, the summary included; each step runs for min(its own limit, time left).
#
# Files under $OUT, each there as soon as the step that writes it ends, so a call cut short
# returns every finished step: gpu_check.log (every step's output, written as it runs),
# bench-json.tar.gz (rewritten after every step: steps.tsv, the outcome of each step, and bench/,
# each benchmark's own JSON, already named as a file of benchmarks/results/), pytest_gpu.xml
# (junit, on a GPU), <card>.json (the tuning table, rewritten after every key it measures; the
# rehearsal's is the CPU's, from the interpreter); at the end results.json (environment, steps,
# pytest summary, every benchmark's records) and summary.txt (the final table). Split results.json into
# benchmarks/results/ with `python benchmarks/collect_results.py split $OUT/results.json`.
set -u -o pipefail

# Every selectable step, in the order they run.
STEP_KEYS="pytest attention encode tuning contrastive mntp_loss fusions pooling model embed train"
STEP_KEYS+=" encode-texts micro"
COMBINE_LIMIT_S=30  # collect_results combine: imports torch, reads the files, prints the table
KILL_GRACE_S=5      # a step gets SIGINT at its limit (pytest still writes its junit), then SIGKILL
MIN_STEP_S=3        # a step with less time than this left is not started

usage() {
  echo "usage: [GPU_CHECK_ONLY=key,...] bash benchmarks/gpu_check.sh [--rehearsal]" >&2
  echo "keys: ${STEP_KEYS// /, }" >&2
  exit 2
}

# selected KEY: whether GPU_CHECK_ONLY (unset or empty: every step) asks for the step KEY.
selected() {
  [[ -z "${GPU_CHECK_ONLY:-}" || ",${GPU_CHECK_ONLY// /}," == *",$1,"* ]]
}

# cuda_archs: the card's architecture for LLM2VEC_FAST_CUDA_ARCHS (9.0 -> 9.0a, Hopper's
# wgmma/TMA target), so that the extension builds once; empty when neither nvidia-smi nor torch
# can tell.
cuda_archs() {
  local cap
  cap=$(timeout 15 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1)
  if [[ ! "$cap" =~ ^[0-9]+\.[0-9]$ ]]; then
    local query='import torch; print("%d.%d" % torch.cuda.get_device_capability())'
    cap=$(timeout 60 "$PYTHON" -c "$query" 2>/dev/null)
  fi
  [[ "$cap" =~ ^[0-9]+\.[0-9]$ ]] || return 0
  if [[ "$cap" == 9.0 ]]; then echo 9.0a; else echo "$cap"; fi
}

# setup_run [--rehearsal]: the mode, the environment, $OUT, the scratch folders and the deadline.
setup_run() {
  MODE=gpu
  case "${1:-}" in
    "") ;;
    --rehearsal) MODE=rehearsal ;;
    *) usage ;;
  esac
  local key only=${GPU_CHECK_ONLY:-}
  for key in ${only//,/ }; do
    [[ " $STEP_KEYS " == *" $key "* ]] || { echo "unknown step: $key" >&2; usage; }
  done

  ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  cd "$ROOT" || exit 2
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
  RESULTS="$SCRATCH/results"  # what bench-json.tar.gz holds
  BENCH_DIR="$RESULTS/bench"
  STEPS="$RESULTS/steps.tsv"
  LOG="$OUT/gpu_check.log"
  mkdir -p "$BENCH_DIR"
  : >"$LOG"
  : >"$STEPS"

  # The repo root on sys.path: the summary and the benchmarks' harness import llm2vec_fast even
  # when both installs failed. No network on the GPU machine: never ask the Hugging Face Hub.
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  local cores
  cores=$(nproc)
  WORKERS=$((cores < 16 ? cores : 16))
  if [[ "$MODE" == rehearsal ]]; then
    BUDGET=${GPU_CHECK_BUDGET_S:-420}
    LIMIT_SCALE=2  # step limits are sized for an H100; a shared 2-core CPU gets twice as long
    DEVICE=(--device cpu)
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" LLM2VEC_FAST_MICRO_ROUNDS=2
  else
    BUDGET=${GPU_CHECK_BUDGET_S:-480}
    LIMIT_SCALE=1
    DEVICE=(--device cuda)
    export MAX_JOBS=$WORKERS
  fi
  START=$(date +%s)
  END=$((START + BUDGET))
  STEPS_END=$((END - COMBINE_LIMIT_S - 2 * KILL_GRACE_S))  # the summary always gets its time
  echo "=== gpu_check ($MODE): budget ${BUDGET}s, steps: ${GPU_CHECK_ONLY:-all}" | tee -a "$LOG"
}

# save_results: bench-json.tar.gz under $OUT from what the steps wrote so far, replaced whole, so
# a call killed at any moment leaves the previous step's complete archive.
save_results() {
  tar -czf "$OUT/bench-json.tar.gz.part" -C "$RESULTS" . 2>>"$LOG" &&
    mv -f "$OUT/bench-json.tar.gz.part" "$OUT/bench-json.tar.gz"
}

record_step() {  # record_step NAME EXIT_CODE SECONDS STATUS
  printf '%s\t%s\t%s\t%s\n' "$@" >>"$STEPS"
  echo "=== $1: $4 (${3}s)" | tee -a "$LOG"
  save_results
}

# run_step NAME LIMIT_S COMMAND...: run under `timeout` for min(LIMIT_S, time left), log the
# output, record the outcome and save the results.
run_step() {
  local name=$1 limit=$(($2 * LIMIT_SCALE))
  shift 2
  local left=$((STEPS_END - $(date +%s))) cut_to=""
  if ((left < limit)); then
    limit=$left
    cut_to=", cut to the deadline"
  fi
  if ((limit < MIN_STEP_S)); then
    record_step "$name" - 0 "not run: deadline reached"
    return 0
  fi
  echo "=== $name (limit ${limit}s$cut_to): $*" | tee -a "$LOG"
  local start rc=0
  start=$(date +%s.%N)
  timeout -s INT -k "$KILL_GRACE_S" "$limit" "$@" >>"$LOG" 2>&1 || rc=$?
  local seconds status=ok
  seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  if ((rc == 124 || rc == 137)); then
    if [[ -n "$cut_to" ]]; then
      status="cut at the deadline after ${limit}s"
    else
      status="timed out at its ${limit}s limit"
    fi
  elif ((rc != 0)); then
    status="failed (exit $rc)"
  fi
  record_step "$name" "$rc" "$seconds" "$status"
}

step() {  # step KEY LIMIT_S COMMAND...: run_step when GPU_CHECK_ONLY selects KEY
  selected "$1" || return 0
  run_step "$@"
}

bench() {  # bench KEY LIMIT_S SCRIPT [ARGS...]: one benchmark script in quick mode
  local key=$1 limit=$2 script=$3
  shift 3
  step "$key" "$limit" "$PYTHON" "benchmarks/$script" --quick "${DEVICE[@]}" --out "$BENCH_DIR" "$@"
}

# finish: results.json and summary.txt (the table, printed last), then the rerun command.
finish() {
  local limit=$((END - $(date +%s) - KILL_GRACE_S))
  ((limit > COMBINE_LIMIT_S)) && limit=$COMBINE_LIMIT_S
  ((limit < MIN_STEP_S)) && limit=$MIN_STEP_S
  timeout -k "$KILL_GRACE_S" "$limit" "$PYTHON" benchmarks/collect_results.py combine \
    --mode "$MODE" --steps "$STEPS" --bench-dir "$BENCH_DIR" --junit "$OUT/pytest_gpu.xml" \
    --log "$LOG" --out "$OUT/results.json" --summary "$OUT/summary.txt"
  local status=$?
  local rerun="" name rc
  while IFS=$'\t' read -r name rc _; do
    [[ " $STEP_KEYS " == *" $name "* && "$rc" != 0 ]] && rerun+="${rerun:+,}$name"
  done <"$STEPS"
  local flag=""
  [[ "$MODE" == rehearsal ]] && flag=" --rehearsal"
  local line="every selected step passed"
  [[ -n "$rerun" ]] && line="rerun: GPU_CHECK_ONLY=$rerun bash benchmarks/gpu_check.sh$flag"
  echo "$line" | tee -a "$LOG"
  [[ -f "$OUT/summary.txt" ]] && echo "$line" >>"$OUT/summary.txt"
  echo "results under $OUT"
  local count
  count=$(find "$OUT" -type f | wc -l)
  ((count > 8)) && echo "warning: $count files under $OUT (at most 8 come back)"
  return $status
}

ENVIRONMENT='
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
import triton; print("triton", triton.__version__)
try:
    import transformers; print("transformers", transformers.__version__)
except ImportError:
    print("transformers: not installed")
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
from llm2vec_fast._ext import extension_status
print("llm2vec_fast._C:", extension_status())
import llm2vec_fast.kernels'

install() {  # over the machine's own torch/triton; the extension for this card only
  local archs
  archs=${LLM2VEC_FAST_CUDA_ARCHS:-$(cuda_archs)}
  [[ -n "$archs" ]] && export LLM2VEC_FAST_CUDA_ARCHS=$archs
  echo "=== LLM2VEC_FAST_CUDA_ARCHS=${LLM2VEC_FAST_CUDA_ARCHS:-unset, the setup.py default}" |
    tee -a "$LOG"
  run_step install 150 "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -e .
  # without the package installed nothing below can import it: retry without the extension
  if ! timeout 60 "$PYTHON" -c "import llm2vec_fast.kernels" >/dev/null 2>&1; then
    run_step install-no-extension 60 env LLM2VEC_FAST_NO_EXTENSION=1 "$PYTHON" -m pip install \
      --no-deps --no-build-isolation --no-index -e .
  fi
}

pytest_gpu() {  # kernel correctness first: the most valuable minutes of the call
  # A test module that fails to import (a package the machine lacks) must not stop the others.
  local args=(-m gpu --continue-on-collection-errors -p no:cacheprovider)
  if [[ "$MODE" == rehearsal ]]; then
    step pytest 90 "$PYTHON" -m pytest "${args[@]}" --collect-only -q tests
    return
  fi
  # A cold Triton cache compiles a few hundred kernel variants: pytest-xdist, where the machine
  # has it, compiles them on every core.
  local workers=()
  timeout 30 "$PYTHON" -c "import xdist" >/dev/null 2>&1 && workers=(-n "$WORKERS")
  step pytest 170 "$PYTHON" -m pytest "${args[@]}" "${workers[@]}" -q -ra --tb=short \
    --junitxml="$OUT/pytest_gpu.xml" tests
}

main() {
  setup_run "$@"
  if [[ "$MODE" == gpu ]]; then
    run_step nvidia-smi 15 nvidia-smi
    install
  fi
  run_step environment 45 "$PYTHON" -c "$ENVIRONMENT"
  pytest_gpu

  local encode_args=() model_config=smollm2-135m docs=2000
  if [[ "$MODE" == rehearsal ]]; then
    encode_args=(--configs tiny)
    model_config=tiny
    docs=32
  fi
  bench attention 70 bench_attention.py
  bench encode 100 bench_encode.py --source random "${encode_args[@]}"
  # The attention kernels' configs measured on this card: the table (<card>.json, rewritten after
  # every key) lands in $OUT at once, to be committed as llm2vec_fast/kernels/tuned/<card>.json.
  bench tuning 90 tune_kernels.py --table-dir "$OUT" --budget-s $((75 * LIMIT_SCALE))
  bench contrastive 30 bench_contrastive.py
  bench mntp_loss 30 bench_mntp_loss.py
  bench fusions 30 bench_fusions.py
  bench pooling 25 bench_pooling.py

  local model="$SCRATCH/model" corpus="$SCRATCH/corpus.txt"
  if selected model || selected embed || selected train || selected encode-texts; then
    run_step model 60 "$PYTHON" -c "
import sys; sys.path.insert(0, 'benchmarks')
from pathlib import Path
from random_model import write_model_folder
from workloads import write_corpus
write_model_folder('$model_config', Path('$model'))
write_corpus(Path('$corpus'), $docs)"
  fi
  bench embed 45 bench_embed.py --model "$model" --corpus "$corpus" --docs "$docs"
  bench train 45 bench_train.py --model "$model"
  if [[ "$MODE" == rehearsal ]]; then
    bench encode-texts 60 bench_encode.py --source texts --model "$model" --dtypes float32 --texts 8
  fi
  step micro 45 "$PYTHON" -m pytest benchmarks/micro --benchmark-only -q -p no:cacheprovider \
    --benchmark-json="$BENCH_DIR/micro.json"
  finish
}

# Sourced (the tests drive its functions with fake steps), it only defines them. Run, it exits
# before bash reads past this block, so editing the file during a run cannot derail the run.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  main "$@"
  exit
fi
