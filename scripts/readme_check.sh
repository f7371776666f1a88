#!/usr/bin/env bash
# Runs every code block of README.md in order, at reduced sizes, in a temporary folder, and fails on the
# first one that does not do what the README says (see scripts/readme_check.py). CI runs it after the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export MUJOCO_GL="${MUJOCO_GL:-egl}"
exec "${PYTHON:-python3}" scripts/readme_check.py "$@"
