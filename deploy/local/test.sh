#!/usr/bin/env bash
# The test command: installs what is missing, then runs every test, real servers included.
# Extra arguments go to pytest (e.g. `deploy/local/test.sh -m "not peers"`).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="/usr/local/go/bin:$PATH"
bash deploy/local/install-deps.sh
exec python3 -m pytest "$@"
