#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh installs on an air-gapped GPU node.
#
# Run this on a machine WITH internet (any OS/Python that has pip >= 22.2; the wheels are picked
# for the node's interpreter, not this one's). The node already has torch, lightning, numpy,
# pandas, scikit-learn and scikit-image, so this script leaves out those packages and everything
# they depend on (nvidia-*, triton, scipy, pillow, fsspec, ...): the folder stays small, and the
# node's CUDA build of torch is never touched.
#
# How it works (why not a plain `pip download`): `pip download` resolves and fetches the whole
# tree, which for torch means ~3 GB of CUDA wheels. Instead pip resolves the full tree in a dry
# run (reading only wheel metadata) and writes a JSON report; this script drops the node's
# packages and their dependency closure from it and downloads the rest with --no-deps, pinned to
# the resolved versions.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: benchmarks/gpu/gpu_wheels.sh [-o DIR] [--node-freeze FILE] [-h]

Download, for CPython 3.12 on manylinux x86_64, the wheels mcvi-ops needs beyond what the GPU
node already has, and build mcvi-ops' own wheel, into DIR (default: benchmarks/_wheels). Then
copy DIR to the node and run benchmarks/gpu_check.sh there.

Options:
  -o, --out DIR          wheel folder (emptied of *.whl first); default benchmarks/_wheels
  --node-freeze FILE     output of `python -m pip list --format=freeze` on the node: its versions
                         constrain the resolution, and every package in it is left out. Without
                         it the node is assumed to have recent releases of the packages below.
  -h, --help             show this help

Environment:
  PYTHON        interpreter whose pip does the work here (default: python3)
  PY_VERSION    the node's Python version (default: 3.12)
  PLATFORMS     wheel platform tags the node accepts, space separated
                (default: "manylinux_2_28_x86_64 manylinux2014_x86_64"; glibc >= 2.28)
  NODE_HAS      packages the node already has (their dependencies are left out too)
                (default: "torch lightning numpy pandas scikit-learn scikit-image")
  SKIP          packages left out (with what only they need) although something requires
                them, because nothing the check runs imports them and they are large
                (default: "pyarrow duckdb statsmodels tensorboard"; SKIP="" for all).
                gpu_check.sh installs the folder with --no-deps, so pip does not ask for them;
                their names go to DIR/left-out.txt
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="$ROOT/benchmarks/_wheels"
NODE_FREEZE=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -o | --out) OUT="$2"; shift 2 ;;
        --node-freeze) NODE_FREEZE="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_wheels.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

PYTHON="${PYTHON:-python3}"
PY_VERSION="${PY_VERSION:-3.12}"
PLATFORMS="${PLATFORMS:-manylinux_2_28_x86_64 manylinux2014_x86_64}"
NODE_HAS="${NODE_HAS:-torch lightning numpy pandas scikit-learn scikit-image}"
# Large packages that neither the gpu tests nor the benchmarks import (checked by running both
# with them absent), left out together with the dependencies only they need:
#   pyarrow (~40 MB)      decoupler -> marsilea -> pandas[parquet], to read parquet files
#   duckdb (~24 MB)       copairs (mAP scores), which mcvi-ops does not import on start
#   statsmodels (~12 MB)  scanpy, imported only by sc.pp.regress_out and a few plots
#   tensorboard (~13 MB with grpcio, protobuf)  scvi-tools, which logs with its own logger
# What stays is dominated by llvmlite (~57 MB, numba's compiler, which scvi-tools and scanpy
# import on start). SKIP="" downloads the complete set.
SKIP_DEFAULT="pyarrow duckdb statsmodels tensorboard"
SKIP="${SKIP-$SKIP_DEFAULT}"
# Pure-Python dependencies published as source only: built into wheels here, because the node
# cannot build anything offline and the resolution below accepts wheels only.
SDIST_ONLY="${SDIST_ONLY:-docrep}"
ABI="cp${PY_VERSION//./}"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
rm -f "$OUT"/*.whl "$OUT"/report.json "$OUT"/MANIFEST.txt "$OUT"/left-out.txt

# pip options that select wheels for the node's interpreter and platform instead of this one's.
TARGET=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp --abi "$ABI")
for platform in $PLATFORMS; do
    TARGET+=(--platform "$platform")
done

echo "== building the mcvi-ops wheel from $ROOT"
"$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$OUT" "$ROOT"
PROJECT_WHEEL="$(ls "$OUT"/mcvi_ops-*.whl)"

echo "== building wheels of source-only pure-Python dependencies: $SDIST_ONLY"
for name in $SDIST_ONLY; do
    "$PYTHON" -m pip wheel --quiet --no-deps --wheel-dir "$WORK/sdist" "$name"
done
for wheel in "$WORK"/sdist/*.whl; do
    [[ -e "$wheel" ]] || continue  # SDIST_ONLY=""
    # a wheel built here is only usable on the node if it is pure Python
    [[ "$wheel" == *-py3-none-any.whl || "$wheel" == *-py2.py3-none-any.whl ]] || {
        echo "gpu_wheels.sh: $wheel is not pure Python; cannot build it for the node here" >&2
        exit 1
    }
    cp "$wheel" "$OUT/"
done

CONSTRAINTS=()
if [[ -n "$NODE_FREEZE" ]]; then
    # the node's versions: plain `name==version` lines only (no editable or URL installs), local
    # labels dropped (torch==2.5.1+cu124 -> torch==2.5.1, which PyPI's torch 2.5.1 satisfies)
    grep -E '^[A-Za-z0-9._-]+==[^ @]+$' "$NODE_FREEZE" | sed 's/+.*$//' \
        > "$WORK/node-constraints.txt" || true
    CONSTRAINTS=(--constraint "$WORK/node-constraints.txt")
fi

echo "== resolving mcvi-ops + pytest for CPython $PY_VERSION ($PLATFORMS), metadata only"
# --ignore-installed + --target: resolve as if into an empty environment, whatever this machine has
if ! "$PYTHON" -m pip install --dry-run --ignore-installed --target "$WORK/target" \
    --report "$OUT/report.json" "${TARGET[@]}" --find-links "$OUT" "${CONSTRAINTS[@]}" \
    "$PROJECT_WHEEL" pytest > "$WORK/resolve.log" 2>&1; then
    # pip's explanation of the conflict (e.g. a node's pandas 3 against anndata's pandas<3)
    grep -vE '^(Collecting|Processing|  Using cached|  Downloading|WARNING: Location)' \
        "$WORK/resolve.log" | tail -n 30 >&2
    echo "gpu_wheels.sh: no set of wheels satisfies mcvi-ops${NODE_FREEZE:+ and $NODE_FREEZE}" >&2
    exit 1
fi

echo "== leaving out what the node has ($NODE_HAS${NODE_FREEZE:+ + $NODE_FREEZE}) and: $SKIP"
"$PYTHON" - "$OUT" "$PY_VERSION" "$NODE_HAS" "$SKIP" "${NODE_FREEZE:-}" \
    > "$WORK/download.txt" <<'PY'
"""Print `name==version` of the resolved packages to download; write left-out.txt."""

import json
import re
import sys

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement

out, py_version, node_has, skip, node_freeze = sys.argv[1:6]
report = json.load(open(f"{out}/report.json"))


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


# markers are evaluated for the node (pip reports this machine's environment)
env = {**default_environment(), **report["environment"]}
env.update(python_version=py_version, python_full_version=f"{py_version}.0",
           sys_platform="linux", platform_system="Linux", platform_machine="x86_64")
installs = {norm(i["metadata"]["name"]): i for i in report["install"]}


def closure(roots, stop=frozenset()):
    """Names reachable from (name, extras) roots through active requirements, not entering stop."""
    reached, seen, stack = set(), set(), [r for r in roots if r[0] in installs]
    while stack:
        name, extras = stack.pop()
        if name in stop or (name, extras) in seen:
            continue
        seen.add((name, extras))
        reached.add(name)
        for line in installs[name]["metadata"].get("requires_dist") or []:
            req = Requirement(line)
            if req.marker is None or any(
                req.marker.evaluate({**env, "extra": e}) for e in {"", *extras}
            ):
                stack.append((norm(req.name), frozenset(req.extras)))
    return reached


node = {norm(n) for n in node_has.split()}
if node_freeze:  # everything installed on the node
    for line in open(node_freeze):
        if match := re.match(r"^([A-Za-z0-9._-]+)\s*(==|@)", line.strip()):
            node.add(norm(match.group(1)))
on_node = closure([(n, frozenset()) for n in node])
requested = [
    (norm(i["metadata"]["name"]), frozenset(i.get("requested_extras") or ()))
    for i in report["install"] if i.get("requested")
]
# what mcvi-ops + pytest need without entering the skipped packages (nor the node's)
needed = closure(requested, stop=frozenset({norm(n) for n in skip.split()} | on_node))
left_out = sorted(set(installs) - needed - on_node)
for name in sorted(needed):
    item = installs[name]
    if not item["download_info"]["url"].startswith(f"file://{out}/"):  # not built here already
        print(f"{item['metadata']['name']}=={item['metadata']['version']}")
with open(f"{out}/left-out.txt", "w") as fh:
    fh.write("".join(f"{name}\n" for name in left_out))
print(f"   on the node ({len(on_node)}): {' '.join(sorted(on_node))}", file=sys.stderr)
print(f"   left out on purpose ({len(left_out)}): {' '.join(left_out) or '-'}", file=sys.stderr)
PY

echo "== downloading $(wc -l < "$WORK/download.txt") wheels into $OUT"
"$PYTHON" -m pip download --quiet --no-deps "${TARGET[@]}" --dest "$OUT" \
    --requirement "$WORK/download.txt"

# what gpu_check.sh installs (with --no-deps): every wheel in the folder, listed for review
for wheel in "$OUT"/*.whl; do echo "${wheel##*/}"; done > "$OUT/MANIFEST.txt"
rm -f "$OUT/report.json"
echo "== $(wc -l < "$OUT/MANIFEST.txt") wheels, $(du -sh "$OUT" | cut -f1) in $OUT; largest:"
du -h "$OUT"/*.whl | sort -rh | head -n 5 | sed "s|$OUT/||; s|^|   |"
