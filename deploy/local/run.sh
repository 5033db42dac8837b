#!/usr/bin/env bash
# The main job on a laptop: the embedded default (one process, no ZooKeeper, no Redis).
#   deploy/local/run.sh CONFIG   sync with your own task file
#   deploy/local/run.sh          start a local Nacos (auth on) and Polaris from the sandbox,
#                                point conf/sync-registry.json at them, and sync both ways
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="/usr/local/go/bin:$PATH"
bash deploy/local/install-deps.sh
if [ $# -ge 1 ]; then
  exec syncworker run -c "$1"
fi
syncworker sandbox up nacos-auth polaris
rendered="${XDG_CACHE_HOME:-$HOME/.cache}/syncworker-sandbox/sync-registry.local.json"
syncworker sandbox render conf/sync-registry.json -o "$rendered"
echo "syncing with $rendered; Ctrl-C stops the sync (the sandbox keeps running: syncworker sandbox down)"
exec syncworker run -c "$rendered"
