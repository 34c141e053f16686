#!/usr/bin/env bash
# Check that a new user's `pip install -e ".[test]"` resolves and installs, and time it.
#
# Run it whenever pyproject.toml changes (dependencies, extras, pins):
#
#   bash tools/check_install.sh                  # dry-run resolve + real install + import check
#   bash tools/check_install.sh --dry-run-only   # resolve only (no install)
#   bash tools/check_install.sh --keep DIR       # keep the venv in DIR (must not exist yet)
#
# It makes a fresh venv (`python3 -m venv`, with the pip that venv ships: no pip upgrade,
# since that is the pip a new user's first command runs), then
#   1. times `pip install --dry-run -e "$REPO[test]"` (dependency resolution only),
#   2. times the real `pip install -e "$REPO[test]"`,
#   3. imports the main dependencies and packages, and runs `phileo-shard --help`,
#   4. prints one summary line per step,
#   5. removes the venv at exit unless --keep DIR was given.
# pip's own configuration (indexes, find-links, constraints) applies as it would for a user.
# Environment: PYTHON (default python3) picks the interpreter.
set -euo pipefail

usage() {
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
}

KEEP=""
DRY_RUN_ONLY=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --keep)
            [[ $# -ge 2 ]] || { echo "error: --keep needs a directory" >&2; exit 2; }
            KEEP="$2"; shift 2 ;;
        --keep=*) KEEP="${1#--keep=}"; shift ;;
        --dry-run-only) DRY_RUN_ONLY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"

if [[ -n "$KEEP" ]]; then
    if [[ -e "$KEEP" ]]; then
        echo "error: --keep $KEEP already exists; give a new directory" >&2
        exit 2
    fi
    mkdir -p "$(dirname "$KEEP")"
    VENV="$(cd "$(dirname "$KEEP")" && pwd)/$(basename "$KEEP")"
    WORK=""
else
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/check_install.XXXXXX")"
    VENV="$WORK/venv"
fi

cleanup() {
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", b - a }'; }

SUMMARY=()
note() { SUMMARY+=("$1"); echo "== $1"; }

echo "== repo: $REPO"
echo "== venv: $VENV"

"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
note "python: $("$PY" -c 'import platform; print(platform.python_version())')"
note "pip: $("$PY" -m pip --version | awk '{print $2}')"

# 1. dependency resolution only
echo "== pip install --dry-run -e \"$REPO[test]\""
t0=$(now)
"$PY" -m pip install --dry-run -e "$REPO[test]"
t1=$(now)
note "dry-run resolve: $(secs "$t0" "$t1") s"

if [[ "$DRY_RUN_ONLY" == 0 ]]; then
    # 2. real install
    echo "== pip install -e \"$REPO[test]\""
    t0=$(now)
    "$PY" -m pip install -e "$REPO[test]"
    t1=$(now)
    note "install: $(secs "$t0" "$t1") s"

    # 3. the install works (run outside the repo, so imports come from the venv's editable install)
    t0=$(now)
    (
        cd "${WORK:-$VENV}"
        "$PY" -c "import torch, torchvision, timm, webdataset, blosc2, rasterio, s3fs, ray; import sharding.cli, training.cli"
        "$VENV/bin/phileo-shard" --help >/dev/null
    )
    t1=$(now)
    note "import + phileo-shard --help: ok ($(secs "$t0" "$t1") s)"
    note "torch: $("$PY" -c 'import torch; print(torch.__version__)'), torchvision: $("$PY" -c 'import torchvision; print(torchvision.__version__)')"
fi

# 4. summary
size_bytes=$(du -sb "$VENV" | awk '{print $1}')
note "venv size: $(awk -v b="$size_bytes" 'BEGIN { printf "%.1f GB", b / 1e9 }')"

echo
echo "== summary"
printf '%s\n' "${SUMMARY[@]}"
if [[ -n "$KEEP" ]]; then
    echo "venv kept in $VENV"
fi
