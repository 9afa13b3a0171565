#!/usr/bin/env bash
# Runs sushy-emulator (PyPI sushy-tools), a real Redfish service, from a cached virtualenv:
#   scripts/redfish-sim.sh --install          only create/refresh the virtualenv
#   scripts/redfish-sim.sh [sushy-emulator args…]
# The virtualenv lives in $KILN_CACHE/venv-sushy, keyed by the pinned version below.
set -euo pipefail

SUSHY_TOOLS_VERSION="${SUSHY_TOOLS_VERSION:-2.2.0}"
cache="${KILN_CACHE:-$HOME/.cache/kiln}"
venv="$cache/venv-sushy"
stamp="$venv/.kiln-sushy-tools-$SUSHY_TOOLS_VERSION"

if [ ! -f "$stamp" ]; then
  command -v python3 >/dev/null || { echo "python3 missing (Debian package python3-venv)" >&2; exit 1; }
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "sushy-tools==$SUSHY_TOOLS_VERSION" >&2
  touch "$stamp"
fi

if [ "${1:-}" = "--install" ]; then
  exit 0
fi
exec "$venv/bin/sushy-emulator" "$@"
