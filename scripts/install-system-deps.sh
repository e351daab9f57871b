#!/usr/bin/env bash
# Debian packages the tests and `kvpack up` use, installed only when missing (needs root or sudo).
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-cli >/dev/null || need+=(redis-tools)
command -v prometheus >/dev/null || need+=(prometheus)       # the end-to-end test scrapes with it
command -v docker-compose >/dev/null || need+=(docker-compose)  # validates deploy/compose without an engine
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing Debian packages: ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
# The Debian packages may start redis-server/prometheus services on their default ports; kvpack's
# tests never rely on them (fixtures start their own on free ports).
