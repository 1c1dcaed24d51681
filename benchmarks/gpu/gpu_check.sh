#!/usr/bin/env bash
# GPU readiness check of mcvi-ops on an air-gapped GPU node (issue 12, item 6).
#
# The node has no internet; its Python already has torch (a CUDA build), lightning, numpy,
# pandas, scikit-learn and scikit-image. benchmarks/gpu/gpu_wheels.sh, run beforehand on a machine
# with internet, puts everything else (and mcvi-ops' own wheel) into a folder of wheels. This
# script, run from a checkout of the repository on the node:
#
#   1. installs that folder offline, without touching the preinstalled packages;
#   2. runs the `gpu`-marked tests;
#   3. measures training (64 and 100 px, bf16-mixed, with and without channels_last and
#      torch.compile), loader and embedding throughput and peak GPU memory
#      (benchmarks/gpu/gpu_check.py);
#   4. prints one table.
#
# Everything runs within a time budget (8 minutes by default), each part under its own limit.
# Without CUDA the GPU parts are reported as skipped; the install and the tests still run.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: benchmarks/gpu/gpu_check.sh (or benchmarks/gpu_check.sh) [-w DIR] [-o FILE] [--no-install] [--budget SECONDS] [-h]

Install mcvi-ops offline from a folder of wheels made by benchmarks/gpu/gpu_wheels.sh, run the
`gpu` tests and the GPU benchmarks, and print one table.

Options:
  -w, --wheels DIR     folder of wheels (default: benchmarks/_wheels)
  -o, --out FILE       also write the table as markdown to FILE
                       (e.g. benchmarks/results/gpu_check.md)
  --no-install         use what is installed already; skip the install step
  --budget SECONDS     time for everything (default: 480); the benchmarks get what the
                       install and the tests leave
  -h, --help           show this help

Environment:
  PYTHON               interpreter to install into and run with (default: python3)
  GPU_CHECK_SMOKE=1    without CUDA, run the benchmarks on the CPU at toy sizes (tests this
                       script; the numbers mean nothing)
  LOG                  log file (default: /tmp/gpu_check-<date>.log)
  TMPDIR               where the simulated crop stores go (~3 GB; removed at the end)
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WHEELS="$ROOT/benchmarks/_wheels"
OUT_MD=""
INSTALL=1
BUDGET=480
while [[ $# -gt 0 ]]; do
    case "$1" in
        -w | --wheels) WHEELS="$2"; shift 2 ;;
        -o | --out) OUT_MD="$2"; shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        --budget) BUDGET="$2"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

PYTHON="${PYTHON:-python3}"
SMOKE="${GPU_CHECK_SMOKE:-0}"
LOG="${LOG:-/tmp/gpu_check-$(date +%Y%m%d-%H%M%S).log}"
# time limits of the steps before the benchmarks, and what the table needs at the end
INSTALL_LIMIT=120
TEST_LIMIT=120
TABLE_RESERVE=20

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
RESULTS="$WORK/results.jsonl"
FAILED=0
: > "$LOG"

say() { echo "== $*"; }
driver() { "$PYTHON" "$ROOT/benchmarks/gpu/gpu_check.py" "$@"; }
# one status row of the table: check, setting, result, seconds
status_row() {
    driver row --results "$RESULTS" --check "$1" --setting "$2" --result "$3" --seconds "$4"
}
# versions of the packages the node brought; the install must leave them as they are
node_packages() {
    "$PYTHON" -m pip list --format=freeze --disable-pip-version-check 2>/dev/null |
        grep -iE '^(torch|lightning|numpy|pandas|scikit-learn|scikit-image|triton|nvidia-[a-z0-9-]+)==' |
        sort || true
}
# run "$@" under a time limit; the whole process group (data-loader workers too) is stopped
limited() {
    local seconds="$1"; shift
    timeout --kill-after=10 "$seconds" "$@"
}

say "mcvi-ops GPU check: $PYTHON, budget ${BUDGET} s, log $LOG"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "gpu_check.sh: $PYTHON is missing or older than Python 3.11" >&2
    exit 2
fi
PY_TAG="$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
MISSING="$("$PYTHON" - <<'PY'
import importlib.util
names = {"torch": "torch", "lightning": "lightning", "numpy": "numpy", "pandas": "pandas",
         "sklearn": "scikit-learn", "skimage": "scikit-image"}
print(" ".join(p for m, p in names.items() if importlib.util.find_spec(m) is None))
PY
)"
if [[ -n "$MISSING" ]]; then
    # the wheel folder leaves these out on purpose: they must come with the node's Python
    echo "gpu_check.sh: $PYTHON lacks preinstalled packages: $MISSING" >&2
    status_row "preinstalled packages" "torch lightning numpy pandas scikit-learn scikit-image" \
        "missing: $MISSING" 0
    FAILED=1
fi

# --- 1. offline install ------------------------------------------------------------------
if [[ "$INSTALL" == 1 ]]; then
    say "1/4 installing offline from $WHEELS"
    start=$SECONDS
    result="ok"
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    project=("$WHEELS"/mcvi_ops-*.whl)
    shopt -u nullglob
    # compiled wheels carry the interpreter they were built for (e.g. cp312)
    wheel_tag="$(printf '%s\n' "${wheels[@]##*/}" | grep -oE -- '-cp3[0-9]+-' | head -n1 | tr -d -)"
    if [[ ${#project[@]} -ne 1 ]]; then
        result="failed: no single mcvi_ops-*.whl in $WHEELS (run benchmarks/gpu/gpu_wheels.sh)"
    elif [[ -n "$wheel_tag" && "$wheel_tag" != "$PY_TAG" ]]; then
        result="failed: wheels are for $wheel_tag, $PYTHON is $PY_TAG (gpu_wheels.sh: PY_VERSION)"
    else
        if [[ -n "$(find "$ROOT/src" -name '*.py' -newer "${project[0]}" -print -quit)" ]]; then
            echo "   note: src/ changed after ${project[0]##*/} was built; the tests run the wheel"
        fi
        before="$(node_packages)"
        # --no-deps: install exactly the folder's wheels; pip must neither fetch anything nor
        # "upgrade" the node's torch etc. (they are not in the folder, so nothing replaces them).
        # The project wheel is reinstalled even if its version number did not change.
        # --no-compile: byte-compile on first import instead, only what is imported (saves most
        # of the install time).
        if limited "$INSTALL_LIMIT" "$PYTHON" -m pip install --no-index --no-deps --no-compile \
            --disable-pip-version-check "${wheels[@]}" >> "$LOG" 2>&1 &&
            limited "$INSTALL_LIMIT" "$PYTHON" -m pip install --no-index --no-deps --no-compile \
                --force-reinstall --disable-pip-version-check "${project[0]}" >> "$LOG" 2>&1; then
            after="$(node_packages)"
            if [[ "$before" != "$after" ]]; then
                result="failed: the install changed preinstalled packages (see the log)"
                diff <(echo "$before") <(echo "$after") >> "$LOG" || true
            fi
            # requirements pip cannot see satisfied: those gpu_wheels.sh left out on purpose
            # (left-out.txt) are expected, anything else is reported
            "$PYTHON" -m pip check --disable-pip-version-check > "$WORK/pip-check.txt" 2>&1 || true
            cat "$WORK/pip-check.txt" >> "$LOG"
            expected='^$'
            if [[ -s "$WHEELS/left-out.txt" ]]; then
                expected="requires ($(paste -sd'|' "$WHEELS/left-out.txt")), which is not installed"
            fi
            unexpected="$(grep -v 'No broken requirements' "$WORK/pip-check.txt" |
                grep -ivE "$expected" || true)"
            if [[ -n "$unexpected" ]]; then
                echo "   pip check reports problems beyond the packages left out on purpose:"
                while read -r line; do echo "     $line"; done <<< "$unexpected"
                [[ "$result" == ok ]] && result="ok; pip check: $(wc -l <<< "$unexpected") problem(s), see above"
            fi
            if ! "$PYTHON" -c 'import mcvi_ops, scvi, zarr, anndata' >> "$LOG" 2>&1; then
                result="failed: mcvi_ops does not import (see the log)"
            fi
        else
            result="failed: pip install (see the log)"
        fi
    fi
    echo "   $result"
    [[ "$result" == failed* ]] && FAILED=1
    status_row "install (offline)" "${#wheels[@]} wheels, pip --no-index --no-deps" "$result" \
        $((SECONDS - start))
else
    status_row "install (offline)" "" "skipped (--no-install)" 0
fi

# --- 2. gpu tests -----------------------------------------------------------------------
say "2/4 pytest -m gpu"
start=$SECONDS
# only the files that hold gpu tests: collecting the whole suite would need the test extras
mapfile -t test_files < <(cd "$ROOT" && grep -rlE 'pytest\.mark\.gpu' tests --include='*.py' | sort)
if [[ ${#test_files[@]} -eq 0 ]]; then
    result="no gpu tests found"
else
    set +e
    # run from the scratch folder, so that training logs do not land in the checkout
    (cd "$WORK" && limited "$TEST_LIMIT" "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider \
        -c "$ROOT/pyproject.toml" --rootdir "$ROOT" "${test_files[@]/#/$ROOT/}") \
        > "$WORK/pytest.txt" 2>&1
    rc=$?
    set -e
    cat "$WORK/pytest.txt" >> "$LOG"
    summary="$(grep -E '(passed|failed|skipped|error|deselected|no tests ran)' "$WORK/pytest.txt" |
        tail -n1 | sed -E 's/^=+ //; s/ =+$//')"
    case $rc in
        0) result="$summary" ;;
        124 | 137) result="timed out after ${TEST_LIMIT} s"; FAILED=1 ;;
        5) result="no gpu tests collected" ;;
        *) result="FAILED: ${summary:-exit $rc} (see the log)"; FAILED=1 ;;
    esac
fi
echo "   $result"
status_row "pytest -m gpu" "${test_files[*]:-}" "$result" $((SECONDS - start))

# --- 3. benchmarks ----------------------------------------------------------------------
left=$((BUDGET - SECONDS - TABLE_RESERVE))
CUDA="$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
if [[ "$CUDA" == 1 ]]; then
    say "3/4 benchmarks on the GPU (${left} s)"
elif [[ "$SMOKE" == 1 ]]; then
    say "3/4 no CUDA device: benchmarks on the CPU at toy sizes (GPU_CHECK_SMOKE=1)"
else
    say "3/4 no CUDA device: GPU benchmarks skipped (GPU_CHECK_SMOKE=1 runs them on the CPU at toy sizes)"
fi
BENCH_ARGS=(--results "$RESULTS" --workdir "$WORK/data" --budget $((left - 15)))
[[ "$SMOKE" == 1 ]] && BENCH_ARGS+=(--smoke)
if ((left < 30)); then
    echo "   only ${left} s left of the budget: benchmarks not run"
else
    set +e
    # the driver's own budget ends before the hard limit, so it can write its last row
    limited "$left" "$PYTHON" "$ROOT/benchmarks/gpu/gpu_check.py" bench "${BENCH_ARGS[@]}" 2>> "$LOG"
    rc=$?
    set -e
    case $rc in
        0) ;;
        124 | 137) echo "   benchmarks stopped at the time limit (${left} s)" ;;
        *) echo "   some benchmarks failed (exit $rc; see the log)"; FAILED=1 ;;
    esac
fi

# --- 4. the table -----------------------------------------------------------------------
say "4/4 results (${SECONDS} s in all)"
driver table --results "$RESULTS" ${OUT_MD:+--out "$OUT_MD"}
echo
echo "log: $LOG"
exit "$FAILED"
