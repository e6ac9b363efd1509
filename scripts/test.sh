#!/usr/bin/env bash
# The whole check, as CI runs it: set-up, lint, types, then every test (servers are started by
# the tests' own fixtures). Extra arguments go to pytest. Exit status is pytest's; "no tests
# collected" counts as a failure.
set -euo pipefail

cd "$(dirname "$0")/.."

bash scripts/setup.sh

export SIGNGATE_TOOLS=$PWD/.tools/bin

echo "test: ruff check"
.venv/bin/ruff check src tests benchmarks

echo "test: mypy (strict)"
.venv/bin/mypy

echo "test: pytest"
status=0
.venv/bin/pytest -q -p no:cacheprovider "$@" || status=$?
if ((status == 5)); then
    echo "test: FAILED: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
