#!/usr/bin/env bash
# The one command for a GPU machine: build, prove and measure everything; the results come back as files.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine (python3 there is the one with torch)
#   bash benchmarks/gpu_check.sh --dry-run   # the same steps on a CPU: Triton interpreter, tiny shapes
#
# Steps, each with a hard time-out and guarded (a failure is recorded and the next step still runs):
#   env            card, driver, python/torch/triton/nvcc versions, the packages the checks use
#   peers          installs the wheels in $WHEELS (default .whl, see benchmarks/gpu_wheels.txt) into a
#                  scratch folder with pip --no-index --no-deps --target, when that folder holds any
#   build          the native extension for sm_90 against the torch found there (pip install -e
#                  --no-deps --no-build-isolation, TORCH_CUDA_ARCH_LIST=9.0, MAX_JOBS=16); prints its time.
#                  Dry run: skipped (a CPU-only build takes minutes on 2 cores); the state of the
#                  extension already built is recorded by the env step
#   tests          DPO_KERNELS_TEST_DEVICE=cuda pytest on the kernel test files ($GPU_CHECK_TESTS: every
#                  file but the AOT, harness, trainer and distributed ones), -m "not slow", spread over
#                  pytest-xdist workers when installed. Dry run: CPU mode, tests/test_errors.py
#   ceilings       a 4 GiB device-to-device copy (GB/s) and an 8192³ bf16 matmul (TFLOP/s), once
#   routes         the fused LM head at real scale: its forward as the fused Triton kernel against the op's
#                  cuBLAS products, a step with the rows compacted (nonzero() syncs) against all rows run,
#                  and the one-pass route's step (6·M·H·V) against the recompute route's (8·M·H·V)
#   bench-logits   python -m benchmarks --device cuda at real scale, 2B=8 T=4096 V=128256 bf16: the
#                  reference, every dpo_kernels backend, the peers that import
#   bench-lm_head  the same for the LM-head workload, H=4096, all but the peers that torch.compile
#   bench-peers    those (Liger-Kernel, Cut Cross-Entropy), when they import: their compile is the slowest part
#   report         report.md, results.csv, results.json: every provider against its floor; a short
#                  summary table is printed last
#
# Files in $OUT (default ./gpu-out), eight: report.md results.csv results.json env.log build.log
# tests.log tests.xml bench.log. The scratch folder (the harness's own outputs) is a temporary directory.
# Exit status 0 when every step passed or was skipped, else 1.
# Environment: OUT, PYTHON (default python3), WHEELS (default .whl), GPU_CHECK_BUDGET (seconds for the
# whole run; default 470 on a GPU, 280 dry), GPU_CHECK_TESTS (pytest arguments), GPU_CHECK_XDIST (workers;
# default 8, 0 = none).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1

DRY=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h | --help) sed -n '2,/^set -u/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-./gpu-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
FILES="report.md results.csv results.json env.log build.log tests.log tests.xml bench.log"
for f in $FILES; do rm -f "$OUT/$f"; done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
PEERS_DIR="$WORK/peers"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export ROOT OUT WORK PY WHEELS PEERS_DIR DRY
START=$(date +%s)
if ((DRY)); then BUDGET=${GPU_CHECK_BUDGET:-280}; else BUDGET=${GPU_CHECK_BUDGET:-470}; fi
STATUS=0

# record NAME STATUS RC SECONDS DETAIL: one line of $WORK/steps.tsv, which the report reads.
record() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$WORK/steps.tsv"
  printf -- '-- %s: %s (%s s)%s\n' "$1" "$2" "$4" "${5:+: $5}"
  case $2 in ok | skipped) ;; *) STATUS=1 ;; esac
}

# step NAME LOG FUNCTION CAP RESERVE CAP_DRY RESERVE_DRY: run FUNCTION under a hard time-out of min(CAP, the
# budget left less RESERVE, the time kept back for the later steps), its output appended to LOG; whatever it
# does, the script goes on.
step() {
  local name=$1 log=$2 fn=$3 cap=$4 reserve=$5
  if ((DRY)); then cap=$6 reserve=$7; fi
  local left=$((START + BUDGET - $(date +%s) - reserve))
  local limit=$((cap < left ? cap : left))
  if ((limit < 5)); then
    record "$name" "no time" "" 0 "not run: under 5 s left in the ${BUDGET} s budget"
    return
  fi
  echo "== $name (time-out ${limit} s) $(date -u +%H:%M:%S)" >>"$log"
  local t0=$(date +%s) rc
  STEP_LIMIT=$limit timeout -k 10 "$limit" bash -c "$fn" >>"$log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t0)) detail=""
  [ -f "$WORK/$name.detail" ] && detail=$(head -c 300 "$WORK/$name.detail" | tr '\t\n' '  ')
  case $rc in
    0) record "$name" ok 0 "$took" "$detail" ;;
    124 | 137) record "$name" timeout "$rc" "$took" "killed at ${limit} s; $detail" ;;
    99) record "$name" skipped 0 "$took" "$detail" ;;  # a step function's own "nothing to do"
    *) record "$name" failed "$rc" "$took" "see $(basename "$log"); $detail" ;;
  esac
}

# ---------------------------------------------------------------------------------------------- the steps
# Each runs in its own bash (exported below), so a crash or a time-out ends that step only. Exit 99: skipped.

do_env() {
  echo "uname: $(uname -srm)"
  if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  # Where the build step will look for the toolkit (setup.py: CUDA_HOME, else the real path of nvcc).
  echo "nvcc: $(command -v nvcc || echo not on PATH); CUDA_HOME=${CUDA_HOME:-unset}"
  ls -d /usr/local/cuda* 2>/dev/null
  "$PY" -m benchmarks.gpu_check env --work "$WORK" $( ((DRY)) && echo --dry-run)
}

do_peers() {
  shopt -s nullglob
  local wheels=("$WHEELS"/*.whl)
  if ((${#wheels[@]} == 0)); then
    echo "no wheels in $WHEELS: the peers that are not installed are reported unavailable" | tee "$WORK/peers.detail"
    exit 99
  fi
  if ((DRY)); then  # the wheels are for the GPU machine's Python 3.12, not necessarily this one
    echo "dry run: would install ${#wheels[@]} wheels: ${wheels[*]##*/}" | tee "$WORK/peers.detail"
    exit 99
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PEERS_DIR" \
    "${wheels[@]}" || exit 1
  echo "${#wheels[@]} wheels into $PEERS_DIR: ${wheels[*]##*/}"
  # A peer that does not import is reported here and by the benchmark, and fails nothing.
  PYTHONPATH="$PYTHONPATH:$PEERS_DIR" "$PY" -c '
import importlib, traceback
for m in ("trl.trainer.utils", "liger_kernel.chunked_loss", "cut_cross_entropy"):
    try:
        importlib.import_module(m)
        print(m, "imports", end="; ")
    except Exception as e:
        traceback.print_exc()
        print(m, "FAILED:", type(e).__name__, str(e)[:80], end="; ")
' | tee "$WORK/peers.detail"
}

do_build() {
  if ((DRY)); then
    echo "dry run: skipped (would run: TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 pip install -e . --no-deps" \
      "--no-build-isolation)" | tee "$WORK/build.detail"
    exit 99
  fi
  local t0=$(date +%s)
  export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 DPO_KERNELS_STRICT_BUILD=1
  if ! "$PY" -m pip install -v --no-deps --no-build-isolation --no-index -e .; then
    echo "pip install -e failed; building in place with setup.py instead"
    "$PY" setup.py build_ext --inplace || exit 1
  fi
  local took=$(($(date +%s) - t0))
  "$PY" -c "from dpo_kernels.ops import native; import sys; print('native kernels: cpu', native.has_kernel('cpu'),
'cuda', native.has_kernel('cuda')); sys.exit(0 if native.has_kernel('cuda') else 1)" || exit 1
  echo "build time ${took} s (sm_90, MAX_JOBS=16)" | tee "$WORK/build.detail"
}

do_tests() {
  local args=(-q -p no:cacheprovider -rfE --durations=25 -m "not slow" --junitxml="$OUT/tests.xml")
  # pytest-timeout's session time-out ends the run in time to still write the junit xml.
  if ((STEP_LIMIT > 60)) && "$PY" -c "import sys; from importlib.metadata import version as v
sys.exit(tuple(map(int, v('pytest-timeout').split('.')[:2])) < (2, 3))" 2>/dev/null; then
    args+=(--session-timeout=$((STEP_LIMIT - 20)))
  fi
  local files
  if ((DRY)); then
    export DPO_KERNELS_TEST_DEVICE=cpu
    files=${GPU_CHECK_TESTS:-tests/test_errors.py}
  else
    export DPO_KERNELS_TEST_DEVICE=cuda
    # Every kernel test file (new ones included), less those that exercise no GPU code: the AOT compile
    # check (CPU-bound, proven here), the harness and this script (CPU), the trainer and multi-process runs.
    files=${GPU_CHECK_TESTS:-tests --ignore=tests/test_aot_check.py --ignore=tests/test_benchmarks.py \
--ignore=tests/test_gpu_check.py --ignore=tests/test_integrations_trl.py --ignore=tests/test_distributed.py}
    # Mostly Triton compile time on a fresh machine: spread it over the CPU cores.
    local workers=${GPU_CHECK_XDIST:-8}
    if ((workers > 0)) && "$PY" -c "import xdist" 2>/dev/null; then args+=(-n "$workers"); fi
  fi
  read -r -a sel <<<"$files"
  echo "pytest ${args[*]} ${sel[*]}"
  "$PY" -m pytest "${args[@]}" "${sel[@]}"
  local rc=$?
  tail -n 1 "$OUT/tests.log" 2>/dev/null >"$WORK/tests.detail"
  exit $rc
}

do_ceilings() {
  "$PY" -m benchmarks.gpu_check ceilings --work "$WORK" $( ((DRY)) && echo --dry-run)
}

do_routes() {
  if ((DRY)); then export TRITON_INTERPRET=1; else unset TRITON_INTERPRET; fi
  "$PY" -m benchmarks.gpu_check routes --work "$WORK" $( ((DRY)) && echo --dry-run)
}

bench() {  # bench STEP WORKLOAD [PROVIDER SET: ours = all but the torch.compile peers, compiled = those]
  local shape names
  if ((DRY)); then
    # CPU tensors, the Triton providers under the interpreter; a tiny case, one timed pass, no memory
    # children (the CPU memory probe is what tests/test_benchmarks.py checks; a GPU one differs anyway).
    export TRITON_INTERPRET=1
    shape=(--device cpu --n 2 --t 16 --v 64 --h 16 --reps 1 --warmup 0 --no-memory)
  else
    unset TRITON_INTERPRET
    shape=(--device cuda --n 8 --t 4096 --v 128256 --h 4096 --reps 5 --warmup 2)
  fi
  # The peers that torch.compile at full size take the longest: a step of their own, so that a time-out
  # there costs nothing of ours. The reference runs in each (the harness checks against it).
  names=$("$PY" -c "
import sys, torch
from benchmarks import providers
device = torch.device('cpu' if $DRY else 'cuda')
want = {'ours': False, 'compiled': True}.get('${3:-}')
print(','.join(p.name for p in providers.registry() if p.workload == '$2' and p.default and p.kind != 'reference'
               and (want is None or p.compiles == want) and p.available(device) is None))") || exit 1
  if [ -z "$names" ]; then
    echo "no ${3:-} $2 provider can run here" | tee "$WORK/$1.detail"
    exit 99
  fi
  echo "providers: $names" | tee "$WORK/$1.detail"
  "$PY" -m benchmarks --workloads "$2" --providers "$names" --dtypes bf16 "${shape[@]}" --no-progress --no-plots \
    --no-modeled --out-dir "$WORK/$1"
}
do_bench_logits() { bench bench-logits logits; }
do_bench_lm_head() { bench bench-lm_head lm_head ours; }
do_bench_peers() { bench bench-peers lm_head compiled; }

export -f do_env do_peers do_build do_tests do_ceilings do_routes bench do_bench_logits do_bench_lm_head do_bench_peers

echo "gpu_check: $( ((DRY)) && echo "DRY RUN on the CPU, " )budget ${BUDGET} s, files in $OUT"
# Seconds per step: the cap, and the reserve kept back for the steps after it (GPU, then dry run). On the GPU
# about 10 s env, 1-2 min build, 3 min tests, 10 s ceilings, 30 s routes, 1 min or so per benchmark: within 470 s.
# The dry run's caps are loose (a loaded CPU is slow); its budget (GPU_CHECK_BUDGET) bounds the whole.
step env "$OUT/env.log" do_env 45 420 120 200
step peers "$OUT/env.log" do_peers 45 420 30 200
# The later steps see the peers (when installed) and the freshly built extension (in the work tree).
[ -d "$PEERS_DIR" ] && export PYTHONPATH="$PYTHONPATH:$PEERS_DIR"
step build "$OUT/build.log" do_build 150 290 10 200
step tests "$OUT/tests.log" do_tests 170 190 240 130
step ceilings "$OUT/bench.log" do_ceilings 40 160 120 100
step routes "$OUT/bench.log" do_routes 50 110 120 90
step bench-logits "$OUT/bench.log" do_bench_logits 120 70 240 45
step bench-lm_head "$OUT/bench.log" do_bench_lm_head 120 35 240 20
step bench-peers "$OUT/bench.log" do_bench_peers 150 5 120 5

# The report comes last: its summary table is the end of the output.
if ! timeout -k 5 60 "$PY" -m benchmarks.gpu_check report --work "$WORK" --out "$OUT" $( ((DRY)) && echo --dry-run)
then
  STATUS=1
  echo "gpu_check: the report step failed; the steps were:"
  cat "$WORK/steps.tsv"
  {
    echo "# dpo_kernels GPU check: the report step failed"
    echo
    echo '```'
    cat "$WORK/steps.tsv"
    echo '```'
  } >"$OUT/report.md"
fi
echo "gpu_check: $(($(date +%s) - START)) s in all, exit status $STATUS; files: $(cd "$OUT" && ls | tr '\n' ' ')"
rm -rf "$WORK"
exit $STATUS
