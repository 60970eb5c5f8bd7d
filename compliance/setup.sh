#!/usr/bin/env bash
# compliance/setup.sh - create .venv27/ (repo root) with Autobahn|Testsuite's wstest.
#
# wstest runs only on Python 2.7. The interpreter is taken from $PYTHON27, else pyenv's 2.7.x,
# else python2.7 on PATH. virtualenv (a release that still supports 2.7) is bootstrapped into a
# temporary directory with that interpreter's own pip, so nothing outside the repo is changed.
# Every package comes from compliance/requirements-wstest.txt, installed without dependency
# resolution and then verified with `pip check`.
#
# Idempotent: a stamp file holds the hash of the requirements and of this script; when it
# matches, nothing is done. Otherwise .venv27/ is built again from scratch.
#
# Exit codes: 0 ready, 3 no Python 2.7 found (the caller decides to skip or fail), 1 otherwise.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="$root/.venv27"
requirements="$here/requirements-wstest.txt"
stamp="$venv/.wstest-ok"
virtualenv_pin="virtualenv==20.15.1"
pip_quiet=(--disable-pip-version-check -q)
export PIP_NO_PYTHON_VERSION_WARNING=1  # an environment variable: older pips ignore it

# One setup at a time: hold a lock on this script while building.
exec 9<"$0"
flock 9

find_python27() {
    if [ -n "${PYTHON27:-}" ]; then
        echo "$PYTHON27"
        return 0
    fi
    if command -v pyenv >/dev/null 2>&1; then
        local pyenv_root candidate
        pyenv_root="$(pyenv root)"
        for candidate in "$pyenv_root"/versions/2.7.18/bin/python "$pyenv_root"/versions/2.7.*/bin/python; do
            if [ -x "$candidate" ]; then
                echo "$candidate"
                return 0
            fi
        done
    fi
    command -v python2.7 2>/dev/null && return 0
    return 1
}

wanted="$(cat "$requirements" "$0" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && [ -x "$venv/bin/wstest" ]; then
    exit 0
fi

if ! python27="$(find_python27)" || ! "$python27" -c 'import sys; assert sys.version_info[:2] == (2, 7)' 2>/dev/null; then
    echo "compliance/setup.sh: no Python 2.7 found (needed by Autobahn|Testsuite's wstest)." >&2
    echo "  Install it with 'pyenv install 2.7.18', or set PYTHON27=/path/to/python2.7." >&2
    exit 3
fi

echo "compliance/setup.sh: building $venv with $python27" >&2
rm -rf "$venv"
bootstrap="$(mktemp -d)"
trap 'rm -rf "$bootstrap"' EXIT
log="$bootstrap/setup.log"

# quietly runs a step, keeping its output in the log, shown only when the step fails.
quietly() {
    "$@" >>"$log" 2>&1 || {
        status=$?
        cat "$log" >&2
        echo "compliance/setup.sh: failed ($status): $*" >&2
        exit 1
    }
}

if "$python27" -m virtualenv --version >/dev/null 2>&1; then
    virtualenv=("$python27" -m virtualenv)
else
    quietly "$python27" -m pip install "${pip_quiet[@]}" --target "$bootstrap" "$virtualenv_pin"
    virtualenv=(env "PYTHONPATH=$bootstrap" "$python27" -m virtualenv)
fi
quietly "${virtualenv[@]}" -q --no-download --no-periodic-update "$venv"

quietly "$venv/bin/python" -m pip install "${pip_quiet[@]}" --no-deps -r "$requirements"
quietly "$venv/bin/python" -m pip check --disable-pip-version-check
quietly "$venv/bin/wstest" --autobahnversion
echo "$wanted" >"$stamp"
echo "compliance/setup.sh: wstest ready in $venv" >&2
