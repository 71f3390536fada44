#!/usr/bin/env bash
# Installs what `make test` needs beyond Go, so the README's test command works
# on a fresh Debian machine by itself (make test runs this first):
#   - Debian packages mosquitto and mosquitto-clients (the end-to-end tests run
#     a real Mosquitto and drive it with mosquitto_pub/mosquitto_sub), nodejs
#     and npm (they run the unmodified Azure IoT SDKs);
#   - the SDKs themselves: npm ci in test/e2e/testdata/iothub, pinned by its
#     package-lock.json;
#   - kube-apiserver, etcd and kubectl (hack/controlplane.sh; ~10 minutes on
#     2 cores the first time, cached in ~/.cache/kubetwin).
# Quick and silent when everything is there. As root it installs what is
# missing with apt-get; as another user it names what to install and fails.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

log() { printf '[deps] %s\n' "$*" >&2; }

# Debian installs mosquitto in /usr/sbin, which a non-root PATH may lack.
has_mosquitto() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }

missing=()
has_mosquitto || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)

if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		log "make test needs these Debian packages, which are not installed: ${missing[*]}"
		log "install them as root, then run make test again:"
		log "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}"
		exit 1
	fi
	log "installing ${missing[*]} from Debian's packages"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	# Debian's package starts a system broker on :1883. The tests start their
	# own on free ports; stop the system one so nothing answers on the
	# default port that a test did not start.
	if [[ " ${missing[*]} " == *" mosquitto "* ]]; then
		if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
			systemctl stop mosquitto || true
			systemctl disable mosquitto >/dev/null 2>&1 || true
		elif [ -x /etc/init.d/mosquitto ]; then
			/etc/init.d/mosquitto stop >/dev/null 2>&1 || true
		fi
	fi
	for p in "${missing[@]}"; do
		case $p in
		mosquitto) has_mosquitto ;;
		mosquitto-clients) command -v mosquitto_pub >/dev/null ;;
		nodejs) command -v node >/dev/null ;;
		npm) command -v npm >/dev/null ;;
		esac || { log "apt-get installed $p but its command is still missing"; exit 1; }
	done
fi

# The Azure IoT SDK packages. npm ci deletes and reinstalls node_modules, so
# it runs only when package-lock.json differs from the one last installed.
sdk=$root/test/e2e/testdata/iothub
stamp=$sdk/node_modules/.kubetwin-package-lock.sha256
want=$(sha256sum "$sdk/package-lock.json" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -d "$sdk/node_modules/azure-iothub" ]; then
	log "npm ci in test/e2e/testdata/iothub (the Azure IoT SDKs, pinned by package-lock.json)"
	(cd "$sdk" && npm ci --no-audit --no-fund --loglevel=error >&2)
	echo "$want" >"$stamp"
fi

# The control plane; prints nothing here (make reads its folder itself).
"$root/hack/controlplane.sh" >/dev/null
