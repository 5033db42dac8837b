#!/usr/bin/env bash
# Installs what syncworker and its test bed need on a fresh Debian 12 machine.
# Idempotent and quick when everything is already there. Server builds (Polaris,
# Consul, Nacos, Eureka, kube-apiserver, etcd 3.6) are not done here: each peer
# builds itself once into ~/.cache/syncworker-peers/ the first time it is asked for.
set -euo pipefail
cd "$(dirname "$0")/../.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
[ -x /usr/share/zookeeper/bin/zkServer.sh ] || need_apt+=(zookeeper)
command -v nginx >/dev/null || need_apt+=(nginx-light)
command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || need_apt+=(maven)
command -v openssl >/dev/null || need_apt+=(openssl)
if [ "${#need_apt[@]}" -gt 0 ]; then
  echo "installing Debian packages: ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || { echo "Go is required to build Polaris, Consul and kube-apiserver (install golang from Debian or the Go toolchain)"; exit 1; }

python3 -m pip install -q --disable-pip-version-check -e ".[test,peers]"
