#!/usr/bin/env bash
# The main job: install planes into .venv if needed and run the kernel with
# every plane plugin installed, on embedded storage under ./var.
# Extra arguments go to `planes serve` (for example --bind 127.0.0.1:6000).
EXTRAS="" source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
exec "$VENV/bin/planes" serve "$@"
