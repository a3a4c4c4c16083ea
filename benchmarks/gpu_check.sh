#!/usr/bin/env bash
# One prepared GPU check for a bare CUDA machine: the `gpu` tests, then the CUDA benchmarks.
#
# Usage, from the repository root, with a plain `python3` that holds a CUDA build of torch:
#
#     bash benchmarks/gpu_check.sh [OUTPUT_DIR]          # default ./gpu-results
#
# Writes into OUTPUT_DIR (7 files): summary.txt (environment + one line per step), pytest.log,
# pytest.xml (JUnit), train_step.json + train_step.log, augment.json + augment.log. Every step runs
# even when an earlier one failed; the exit status is non-zero when any step failed.
#
# Steps (each under its own `timeout`, about 9 minutes at most in all, so it fits one 10-minute
# device command):
#   1. wheels   install the carried wheels in $WHEELS (default .whl/) into $SITE (default /tmp/site)
#               with `pip --no-index --no-deps --target` (or by unzipping them when pip is missing);
#               skipped when $WHEELS has no wheel.
#   2. imports  the packages the steps need are importable (names each missing one).
#   3. cuda     torch sees a CUDA device (else the benchmarks are not run and this step fails).
#   4. pytest   python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu tests/trainers/test_augment.py
#   5. train_step   python3 benchmarks/train_step.py --device cuda --quick
#   6. augment      python3 benchmarks/augment.py --device cuda --size 256 --batch 64
#
# What must be on the machine or carried in .whl/ (python 3.12, x86_64). Imports, read from the code:
#   - benchmarks/train_step.py --device cuda: stdlib + torch + trainers.models.unet -> monai
#     (monai needs numpy). No pydantic.
#   - benchmarks/augment.py: torch + trainers.augment -> pydantic; monai.transforms (+ numpy).
#   - the tests: pytest, torch, numpy (tests/trainers/test_augment.py, trainers.checkpoint),
#     pydantic (configs), monai (U-Net blocks, DiceCELoss); trainers.* and datastore.conventions
#     (pure python) from the repo. Nothing imports ray, zarr, mlflow, tensorstore or the orchestrator;
#     tests/conftest.py imports only torch and pytest, so collection imports nothing else.
# Wheels to carry (versions = the project's venv, within pyproject's pins):
#   monai-1.6.1-py3-none-any.whl                     (pin monai>=1.6.1,<1.7)
#   pydantic-2.14.4-py3-none-any.whl                 (pin pydantic>=2.8,<3)
#   pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl  (pydantic 2.14.4 pins ==2.50.5)
#   annotated_types-0.8.0-py3-none-any.whl           (pydantic: >=0.6.0)
#   typing_inspection-0.4.5-py3-none-any.whl         (pydantic: >=0.4.4)
#   typing_extensions-4.16.0-py3-none-any.whl        (pydantic 2.14.4 requires >=4.16.0; torch's own copy may be older)
# and, only if the machine lacks them (step 2 says so):
#   numpy-2.x cp312 manylinux x86_64 wheel           (pin numpy>=2.0,<3; monai needs >=1.24)
#   pytest-9.2.0, pluggy-1.7.0, iniconfig-2.3.1, packaging-26.4, pygments-2.21.0 (all py3-none-any)
# torch.compile (the compile test and the "ours" recipe of train_step.py) also needs a C compiler
# for Triton's launcher; step 2 prints whether `cc`/`gcc` is there.
#
# On a machine without CUDA (a sanity check of this script) the gpu tests are skipped, the cuda
# step fails with "no CUDA device visible to torch", the benchmarks are not run, and it exits 1.

set -u -o pipefail

START_DIR=$(pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-./gpu-results}
case "$OUT" in /*) ;; *) OUT="$START_DIR/$OUT" ;; esac
WHEELS=${WHEELS:-$REPO/.whl}
SITE=${SITE:-/tmp/site}
T_TESTS=${T_TESTS:-270}        # seconds per step (torch.compile of the test U-Net takes most of the tests' time)
T_TRAIN=${T_TRAIN:-200}        # train_step.py --quick: "< 2 minutes" (two compiles of the paper U-Net)
T_AUGMENT=${T_AUGMENT:-90}

cd "$REPO" || exit 2
mkdir -p "$OUT" || exit 2
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"

FAILED=0
LAST_STATUS=
declare -a RESULTS=()

log() { echo "$*" | tee -a "$SUMMARY"; }
record() {  # record NAME RC [NOTE]
    local name=$1 rc=$2 note=${3:-} status=PASS
    if [ "$rc" -eq 124 ]; then status=TIMEOUT; elif [ "$rc" -ne 0 ]; then status=FAIL; fi
    LAST_STATUS=$status
    [ "$status" = PASS ] || FAILED=1
    RESULTS+=("$(printf '%-11s %-7s rc=%-3s %s' "$name" "$status" "$rc" "$note")")
    log "== $name: $status (rc=$rc) $note"
}

log "# sspctl gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
log "repo: $REPO   output: $OUT"
log "python3: $(command -v python3 || echo 'not found')  $(python3 --version 2>&1)"
log "C compiler (Triton/torch.compile): $(command -v cc || command -v gcc || echo 'none found')"
log "-- nvidia-smi -L"
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>&1 | tee -a "$SUMMARY"; else log "nvidia-smi: not found"; fi

# 1. wheels -------------------------------------------------------------------------------------
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if [ ${#wheels[@]} -eq 0 ]; then
    RESULTS+=("$(printf '%-11s %-7s        %s' wheels SKIP "no wheel in $WHEELS")")
    log "== wheels: SKIP (no wheel in $WHEELS)"
else
    mkdir -p "$SITE"
    if python3 -m pip --version >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --target "$SITE" "${wheels[@]}" 2>&1 | tee -a "$SUMMARY"
        record wheels $? "pip --target $SITE: ${#wheels[@]} wheels"
    else
        rc=0
        for w in "${wheels[@]}"; do python3 -m zipfile -e "$w" "$SITE" 2>&1 | tee -a "$SUMMARY" || rc=1; done
        record wheels $rc "no pip: unzipped ${#wheels[@]} wheels into $SITE"
    fi
fi

# 2. imports ------------------------------------------------------------------------------------
python3 - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import importlib, sys
missing = []
for name in ("torch", "numpy", "monai", "pydantic", "pydantic_core", "pytest", "trainers.pretrain", "trainers.finetune"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name:18s} {getattr(mod, '__version__', '')}  {getattr(mod, '__file__', '')}")
    except Exception as exc:  # noqa: BLE001
        missing.append(name)
        print(f"  {name:18s} MISSING: {type(exc).__name__}: {exc}")
import torch
print(f"  torch {torch.__version__}  cuda build {torch.version.cuda}  cudnn {torch.backends.cudnn.version()}")
sys.exit(1 if missing else 0)
EOF
record imports $?

# 3. cuda ---------------------------------------------------------------------------------------
python3 - <<'EOF' 2>&1 | tee -a "$SUMMARY"
import sys
import torch
if not torch.cuda.is_available():
    print("  error: no CUDA device visible to torch")
    sys.exit(1)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}  {p.total_memory / 2**30:.0f} GiB  sm_{p.major}{p.minor}  bf16={torch.cuda.is_bf16_supported()}")
EOF
rc=$?
record cuda $rc "$([ $rc -eq 0 ] || echo 'no CUDA device visible to torch')"
if [ "$LAST_STATUS" = PASS ]; then HAVE_CUDA=1; else HAVE_CUDA=0; fi

# 4. pytest (gpu-marked tests) ------------------------------------------------------------------
timeout "$T_TESTS" python3 -m pytest -q -p no:cacheprovider -m gpu --junitxml="$OUT/pytest.xml" \
    tests/gpu tests/trainers/test_augment.py 2>&1 | tee "$OUT/pytest.log"
rc=$?
record pytest $rc "$(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|deselected|xfailed|error)' "$OUT/pytest.log" | tail -1 | tr -d '=')"

# 5-6. CUDA benchmarks --------------------------------------------------------------------------
bench() {  # bench NAME TIMEOUT ARGS...
    local name=$1 limit=$2
    shift 2
    if [ "$HAVE_CUDA" -ne 1 ]; then
        : > "$OUT/$name.json"
        echo "not run: no CUDA device visible to torch" > "$OUT/$name.log"
        record "$name" 1 "not run: no CUDA device visible to torch"
        return
    fi
    timeout "$limit" python3 "$@" > "$OUT/$name.json" 2> "$OUT/$name.log"
    local rc=$?
    tail -n 3 "$OUT/$name.log" | sed 's/^/  | /'
    record "$name" $rc "$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('ratios', json.dumps(d.get('ratios')))" "$OUT/$name.json" 2>/dev/null || echo 'no JSON')"
}
bench train_step "$T_TRAIN" benchmarks/train_step.py --device cuda --quick
bench augment "$T_AUGMENT" benchmarks/augment.py --device cuda --size 256 --batch 64

# summary ---------------------------------------------------------------------------------------
log ""
log "# summary"
for line in "${RESULTS[@]}"; do log "$line"; done
if [ "$FAILED" -ne 0 ]; then log "RESULT: FAILED (see $OUT)"; else log "RESULT: all steps passed"; fi
exit "$FAILED"
