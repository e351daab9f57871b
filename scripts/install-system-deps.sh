#!/usr/bin/env bash
# Debian packages the tests and `kvpack up` use, installed only when missing (needs root or sudo).
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v unzip >/dev/null || need+=(unzip)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
# The Debian package starts a redis-server on 6379 as a service; kvpack never relies on it.
