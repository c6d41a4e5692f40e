#!/usr/bin/env bash
# The whole test suite: install planes with its test dependencies into .venv,
# then run every test twice, with the native extensions and with their
# pure-Python twins (PLANES_NO_EXTENSIONS=1). Arguments go to pytest.
EXTRAS="test" source "$(dirname "$0")/_venv.sh"
cd "$ROOT"

suite() {
  local rc=0
  "$VENV/bin/python" -m pytest "$@" || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests: treating an empty run as a failure" >&2
    return 1
  fi
  return "$rc"
}

echo "== test suite with native extensions" >&2
suite "$@"
echo "== test suite with pure-Python twins (PLANES_NO_EXTENSIONS=1)" >&2
PLANES_NO_EXTENSIONS=1 suite "$@"
