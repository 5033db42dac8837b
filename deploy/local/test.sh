#!/usr/bin/env bash
# The test command: installs what is missing, builds every real server once into
# ~/.cache/syncworker-peers (cached by version), then runs every test, real servers
# included. Extra arguments go to pytest (e.g. `deploy/local/test.sh -m "not peers"`).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="/usr/local/go/bin:$PATH"
bash deploy/local/install-deps.sh
# builds run one after another (2 cores); a route that cannot work here is reported
# and its test fails or xfails with the exact reason
syncworker sandbox install --keep-going
exec python3 -m pytest "$@"
