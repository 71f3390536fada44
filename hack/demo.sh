#!/usr/bin/env bash
# The getting-started scenario, end to end, on this machine:
#   hack/demo.sh up    start a local control plane, the operator (embedded
#                      broker) and a simulated device; run the scenario;
#                      leave everything running.
#   hack/demo.sh down  stop it all.
# `make demo` and `make demo-down` call this. KUBEBUILDER_ASSETS must hold
# kube-apiserver, etcd and kubectl (make demo builds them on first use).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
state=$root/.demo
mqtt_port=${KUBETWIN_DEMO_MQTT_PORT:-8883}
webhook_port=${KUBETWIN_DEMO_WEBHOOK_PORT:-9443}
webhook_url=https://127.0.0.1:$webhook_port

# running <pid>: the process exists and is not a zombie (an exited child
# that nobody reaped, as under a container's init that does not reap).
running() {
	local st
	st=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
	[[ $st != Z* ]]
}

down() {
	local alive=() pid
	for p in device manager localcluster; do
		if [ -f "$state/$p.pid" ]; then
			pid=$(cat "$state/$p.pid")
			if kill "$pid" 2>/dev/null; then
				# localcluster exits once it has stopped etcd and
				# kube-apiserver, so waiting for it waits for them.
				for _ in $(seq 300); do
					running "$pid" || break
					sleep 0.1
				done
				if running "$pid"; then alive+=("$p (pid $pid)"); fi
			fi
			rm -f "$state/$p.pid"
		fi
	done
	if [ ${#alive[@]} -gt 0 ]; then
		echo "demo: still running 30s after SIGTERM: ${alive[*]}" >&2
		exit 1
	fi
	echo "demo stopped"
}

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

# The two queries of the scenario, in IoT Hub's query language.
by_plant="SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'"
by_cellular="$by_plant AND properties.reported.connectivity.type = 'cellular'"

twin_query() { # twin_query <query>: show kubectl twin query and its table
	printf '$ kubectl twin query "%s"\n' "$1"
	kubectl twin query "$1"
}

twin_ids() { # twin_ids <query>: the device ids a query returns, comma-separated
	local out
	out=$(kubectl twin query --no-headers "$1" 2>/dev/null) || return 1
	printf '%s\n' "$out" | awk 'NF {print $1}' | paste -sd, -
}

has_ids() { # has_ids <query> <ids>: whether the query returns exactly ids
	local got
	got=$(twin_ids "$1") || return 1
	[ "$got" = "$2" ]
}

expect_ids() { # expect_ids <query> <ids>: fail the demo unless the query returns exactly ids
	if ! has_ids "$1" "$2"; then
		echo "demo: kubectl twin query \"$1\" returned '$(twin_ids "$1")', expected '$2'" >&2
		exit 1
	fi
}

wait_for() { # wait_for <seconds> <what> <command...>
	local n=$1 what=$2; shift 2
	for _ in $(seq "$n"); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 1
	done
	echo "demo: timed out waiting for $what" >&2
	return 1
}

up() {
	: "${KUBEBUILDER_ASSETS:?KUBEBUILDER_ASSETS must point at kube-apiserver, etcd and kubectl (run make demo)}"
	# bin holds kubectl-twin: on the PATH, kubectl runs it as `kubectl twin`.
	export PATH=$root/bin:$KUBEBUILDER_ASSETS:$PATH
	[ -x bin/manager ] && [ -x bin/device-sim ] && [ -x bin/kubectl-twin ] || { echo "demo: run make build first (make demo does)" >&2; exit 1; }
	if [ -f "$state/localcluster.pid" ]; then
		echo "demo: already running (make demo-down first)"; exit 1
	fi
	mkdir -p "$state"
	export KUBECONFIG=$state/kubeconfig
	rm -f "$KUBECONFIG"

	step "Starting a local control plane (etcd + kube-apiserver $(kube-apiserver --version 2>/dev/null | awk '{print $2}')) with the DeviceTwin CRD"
	go build -o bin/localcluster ./hack/localcluster
	bin/localcluster --write-kubeconfig "$KUBECONFIG" >"$state/localcluster.log" 2>&1 &
	echo $! >"$state/localcluster.pid"
	wait_for 60 "the control plane" test -s "$KUBECONFIG"
	run kubectl get crd devicetwins.kubetwin.io

	step "Registering the admission webhooks (config/webhook), served by the operator"
	run kubectl apply -f config/webhook/manifests.yaml

	step "Starting the operator with its embedded MQTT broker (TLS, devices authenticated) on :$mqtt_port and its webhooks on $webhook_url"
	# Outside a cluster the API server reaches the webhooks by URL: the operator
	# points the configurations at it, issues its own CA and serving
	# certificate (Secret default/kubetwin-webhook-server-cert) and sets the
	# caBundle.
	# The broker's TLS certificate is the operator's too (Secret
	# default/kubetwin-mqtt-server-cert); devices trust the CA it publishes in
	# the ConfigMap default/kubetwin-mqtt-ca.
	# The service API (IoT Hub's REST API for Azure IoT service SDKs) needs
	# port 443: the SDKs always use it. Served when this user may bind it.
	service_api=
	if [ "$(id -u)" = 0 ] && ! (exec 3<>/dev/tcp/127.0.0.1/443) 2>/dev/null; then
		service_api=127.0.0.1:443
	fi
	bin/manager --mqtt-tls-bind-address "127.0.0.1:$mqtt_port" --hub-hostname localhost --health-probe-bind-address 127.0.0.1:0 \
		--webhook-port "$webhook_port" --webhook-url "$webhook_url" --webhook-config-name admission \
		--webhook-cert-dir "$state/webhook-certs" --service-api-bind-address "$service_api" >"$state/manager.log" 2>&1 &
	echo $! >"$state/manager.pid"
	wait_for 30 "the embedded broker" bash -c "exec 3<>/dev/tcp/127.0.0.1/$mqtt_port"
	wait_for 30 "the webhook server" bash -c "exec 3<>/dev/tcp/127.0.0.1/$webhook_port"
	wait_for 30 "the caBundle" bash -c "kubectl get validatingwebhookconfiguration admission -o jsonpath='{.webhooks[0].clientConfig.caBundle}' | grep -q ."
	run kubectl get validatingwebhookconfiguration admission -o jsonpath='{.webhooks[0].name} -> {.webhooks[0].clientConfig.url} (failurePolicy {.webhooks[0].failurePolicy}){"\n"}'

	step "1-2. The back end creates device myDeviceId with tags location.region=US, location.plant=Redmond43"
	run cat config/samples/kubetwin_v1alpha1_devicetwin.yaml
	run kubectl apply -f config/samples/kubetwin_v1alpha1_devicetwin.yaml
	wait_for 30 "tags mirrored into labels" bash -c "kubectl get devicetwins -l location.plant=Redmond43 -o name | grep -q mydeviceid"

	step "3. Query by tag: kubectl get devicetwins -l location.plant=Redmond43"
	run kubectl get devicetwins -l location.plant=Redmond43
	echo "(the device has not connected or reported yet:)"
	run kubectl get devicetwin mydeviceid -o jsonpath='{.status.conditions[*].reason}{"\n"}'

	step "3. The same in IoT Hub's query language, with the kubectl plugin: kubectl twin query"
	twin_query "$by_plant"
	expect_ids "$by_plant" myDeviceId
	twin_query "$by_cellular"
	expect_ids "$by_cellular" ""
	echo "(nothing yet: the device has not reported its connectivity)"
	echo "How the plugin runs it: the tag condition goes to the API server as a label selector, the rest is checked on what it returns:"
	printf '$ kubectl twin explain-query "%s"\n' "$by_cellular"
	kubectl twin explain-query "$by_cellular"

	step "4. The device connects over MQTT (TLS, a SAS token signed with its own key), gets its twin, applies desired and reports cellular connectivity"
	echo "Its connection string, from the Secret mydeviceid-device-key the operator keeps for every twin:"
	wait_for 30 "the device's keys" kubectl get secret mydeviceid-device-key
	printf '$ kubectl twin connection-string mydeviceid\n'
	conn=$(kubectl twin connection-string mydeviceid)
	echo "${conn%%SharedAccessKey=*}SharedAccessKey=(the primary key)"
	kubectl get configmap kubetwin-mqtt-ca -o jsonpath='{.data.ca\.crt}' >"$state/ca.crt"
	bin/device-sim --connection-string "$conn" --broker "ssl://localhost:$mqtt_port" --ca-file "$state/ca.crt" --apply-desired \
		--report '{"connectivity":{"type":"cellular"}}' >"$state/device.log" 2>&1 &
	echo $! >"$state/device.pid"
	wait_for 30 "the device to connect" grep -q connected "$state/device.log"
	sed 's/^/  device | /' "$state/device.log"

	step "5. The twin converges: kubectl wait --for=condition=InSync"
	run kubectl wait --for=condition=InSync devicetwin/mydeviceid --timeout=60s
	run kubectl get devicetwins -o wide
	run kubectl get devicetwin mydeviceid -o jsonpath='reported: {.status.reported}{"\n"}'
	echo "devices in Redmond43 reporting cellular:"
	run bash -c "kubectl get devicetwins -l location.plant=Redmond43 -o jsonpath='{range .items[?(@.status.reported.connectivity.type==\"cellular\")]}{.status.deviceId}{\"\n\"}{end}'"

	step "5. The scenario's two queries now both return myDeviceId"
	wait_for 30 "kubectl twin query to see the cellular report" has_ids "$by_cellular" myDeviceId
	twin_query "$by_plant"
	expect_ids "$by_plant" myDeviceId
	twin_query "$by_cellular"
	expect_ids "$by_cellular" myDeviceId
	printf '$ %s\n' "kubectl twin query -o json \"SELECT deviceId, properties.reported.connectivity.type AS connectivity FROM devices WHERE tags.location.region = 'US'\""
	kubectl twin query -o json "SELECT deviceId, properties.reported.connectivity.type AS connectivity FROM devices WHERE tags.location.region = 'US'"

	step "6. Change a desired property; the device receives it and reports it back"
	run kubectl patch devicetwin mydeviceid --type merge -p '{"spec":{"desired":{"telemetryConfig":{"sendFrequencyInSecs":30}}}}'
	wait_for 30 "the device to receive desired v2" grep -q "desired v2" "$state/device.log"
	grep "desired v2" "$state/device.log" | sed 's/^/  device | /'
	gen=$(kubectl get devicetwin mydeviceid -o jsonpath='{.metadata.generation}')
	run kubectl wait --for=jsonpath='{.status.observedGeneration}'="$gen" devicetwin/mydeviceid --timeout=60s
	run kubectl wait --for=condition=InSync devicetwin/mydeviceid --timeout=60s
	run kubectl get devicetwin mydeviceid -o jsonpath='desired v{.status.desiredVersion}, reported v{.status.reportedVersion}: {.status.reported}{"\n"}'

	step "7. A bad manifest is refused at apply time, naming the field and the rule, and nothing is stored"
	run cat config/samples/bad/devicetwin_array.yaml
	printf '$ %s\n' "kubectl apply -f config/samples/bad/devicetwin_array.yaml"
	if kubectl apply -f config/samples/bad/devicetwin_array.yaml; then
		echo "demo: the bad manifest was accepted" >&2; exit 1
	fi
	printf '$ %s\n' "kubectl get devicetwin bad-array"
	if kubectl get devicetwin bad-array; then
		echo "demo: the bad twin was stored" >&2; exit 1
	fi
	echo "(the same rule holds for changes to an existing twin:)"
	printf '$ %s\n' "kubectl patch devicetwin mydeviceid --type merge -p '{\"spec\":{\"desired\":{\"telemetryConfig\":{\"sendFrequencyInSecs\":4503599627370497}}}}'"
	if kubectl patch devicetwin mydeviceid --type merge -p '{"spec":{"desired":{"telemetryConfig":{"sendFrequencyInSecs":4503599627370497}}}}'; then
		echo "demo: the bad change was accepted" >&2; exit 1
	fi
	run kubectl get devicetwin mydeviceid -o jsonpath='desired: {.spec.desired}{"\n"}'

	step "8. A fleet configuration (TwinConfiguration) moves every Redmond43 device to a new telemetry interval"
	echo "A twin's own manifest wins over any configuration, and mydeviceid sets its interval itself (steps 1 and 6):"
	echo "it hands the setting over to the fleet first."
	run kubectl patch devicetwin mydeviceid --type merge -p '{"spec":{"desired":{"telemetryConfig":null}}}'
	cat >"$state/twinconfiguration.yaml" <<'YAML'
apiVersion: kubetwin.io/v1alpha1
kind: TwinConfiguration
metadata:
  name: redmond43-telemetry
spec:
  targetCondition: tags.location.plant = 'Redmond43'
  priority: 10
  content:
    desired:
      telemetryConfig:
        sendFrequencyInSecs: 15
YAML
	printf '$ cat twinconfiguration.yaml\n'
	cat "$state/twinconfiguration.yaml"
	printf '$ kubectl apply -f twinconfiguration.yaml\n'
	kubectl apply -f "$state/twinconfiguration.yaml"
	echo "The operator applies the content to every targeted twin (one server-side apply each, field manager"
	echo "kubetwin-configuration-redmond43-telemetry); the rollout is done when the devices report it back:"
	run kubectl twin rollout status redmond43-telemetry --timeout 60s
	run kubectl get twinconfig
	run kubectl get devicetwin mydeviceid -o jsonpath='desired: {.spec.desired}{"\n"}configuration label: {.metadata.labels.configurations\.kubetwin\.io/redmond43-telemetry}{"\n"}'
	run kubectl get devicetwin mydeviceid --show-managed-fields -o jsonpath='{range .metadata.managedFields[*]}{.manager}{" "}{end}{"\n"}'
	run kubectl wait --for=jsonpath='{.status.reported.telemetryConfig.sendFrequencyInSecs}'=15 devicetwin/mydeviceid --timeout=60s
	grep '"sendFrequencyInSecs":15' "$state/device.log" | sed 's/^/  device | /'
	by_config="SELECT deviceId FROM devices WHERE configurations.[[redmond43-telemetry]].status = 'Applied'"
	twin_query "$by_config"
	expect_ids "$by_config" myDeviceId

	if [ -n "$service_api" ] && command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
		step "9. An unmodified Azure IoT service SDK program (Node.js, npm package azure-iothub) runs the scenario's queries over IoT Hub's REST API"
		sdk=test/e2e/testdata/iothub
		[ -d "$sdk/node_modules/azure-iothub" ] || (cd "$sdk" && npm ci --no-audit --no-fund --loglevel=error)
		kubectl get configmap kubetwin-mqtt-ca -o jsonpath='{.data.ca\.crt}' >"$state/ca.crt"
		wait_for 30 "the service API" bash -c "exec 3<>/dev/tcp/127.0.0.1/443"
		cs=$(kubectl twin service-connection-string -n default)
		printf '$ %s\n' "kubectl twin service-connection-string -n default"
		echo "${cs%%SharedAccessKey=*}SharedAccessKey=(the iothubowner policy's key, from the Secret kubetwin-service-policies)"
		printf '$ %s\n' "IOTHUB_CONNECTION_STRING=... NODE_EXTRA_CA_CERTS=ca.crt node $sdk/AddTagsAndQuery.js query"
		(cd "$sdk" && IOTHUB_CONNECTION_STRING="$cs" NODE_EXTRA_CA_CERTS="$state/ca.crt" node AddTagsAndQuery.js query) | sed 's/^/  node | /'

		step "10. The service SDK registers a device; the device SDK (azure-iot-device over MQTT) connects with its key and reports"
		printf '$ %s\n' "node $sdk/Registry.js Lab:Sensor.7 create"
		created=$(cd "$sdk" && IOTHUB_CONNECTION_STRING="$cs" NODE_EXTRA_CA_CERTS="$state/ca.crt" node Registry.js Lab:Sensor.7 create)
		key=${created##* }
		echo "  node | ${created% *} (primary key)"
		run kubectl get devicetwins -o custom-columns='NAME:.metadata.name,DEVICE ID:.spec.deviceId'
		printf '$ %s\n' "DEVICE_CONNECTION_STRING='HostName=localhost:$mqtt_port;DeviceId=Lab:Sensor.7;SharedAccessKey=...' node $sdk/ReportConnectivity.js"
		(cd "$sdk" && DEVICE_CONNECTION_STRING="HostName=localhost:$mqtt_port;DeviceId=Lab:Sensor.7;SharedAccessKey=$key" \
			NODE_EXTRA_CA_CERTS="$state/ca.crt" node ReportConnectivity.js) | sed 's/^/  node | /'
		run kubectl twin query "SELECT deviceId, properties.reported.connectivity.type AS connectivity FROM devices"
		echo "(docs/iothub.md: what the IoT Hub endpoints serve and how they map onto DeviceTwins)"
	else
		echo "(skipping the Azure IoT SDK step: it needs Node.js and npm, and root to serve the service API on port 443)"
	fi

	step "The demo environment keeps running"
	echo "  export KUBECONFIG=$KUBECONFIG"
	echo "  export PATH=$root/bin:$KUBEBUILDER_ASSETS:\$PATH    # kubectl v1.37 matching the control plane, and kubectl twin"
	echo "  logs: $state/{manager,device,localcluster}.log"
	echo "  stop: make demo-down"
}

case "${1:-}" in
up) up ;;
down) down ;;
*) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
