// Package e2e holds kubetwin's end-to-end tests. They start a real control
// plane (kube-apiserver and etcd, through envtest), build the operator and
// the device simulator, and run the operator as a separate process against
// its embedded MQTT broker or a real Mosquitto, so that it can be stopped,
// restarted and killed. Devices are the Mosquitto command-line tools, the Go
// device library and the simulator.
//
// Run them with
//
//	export KUBEBUILDER_ASSETS=$(hack/controlplane.sh)
//	go test ./test/e2e/ -count=1 -v
//
// They need mosquitto, mosquitto_pub and mosquitto_sub
// (apt-get install mosquitto mosquitto-clients).
package e2e
