// Package abuse is kubetwin's abuse suite: the operator as a process, with
// its embedded broker on TLS and devices authenticated by SAS tokens, serves
// a fleet of legitimate devices that report throughout, while the attacks of
// issue 11 run against it one after another (pre-authentication memory and
// connection exhaustion, a device that never reads its socket, request-id
// reuse, oversized and amplifying documents, presence floods, abandoned
// persistent sessions, retained messages on request topics, service API
// query floods, non-canonical topic escapes and log flooding).
//
// Every attack is a subtest of TestAbuse. Besides its own checks, each one
// checks the guarantees the fleet relies on while it runs: the operator's
// resident memory stays under a bound, legitimate reports keep being
// acknowledged with a bounded p99 latency and without errors, and the
// operator's log grows at a bounded rate with bounded lines. At the end every
// report a legitimate device had acknowledged must be what the API server
// stores.
//
// TestSoak (make soak, not part of make test) runs the same harness with
// more devices, repeating all attacks for a while, and prints memory,
// goroutines, report latency and lost reports over time.
//
// Run them with
//
//	export KUBEBUILDER_ASSETS=$(hack/controlplane.sh)
//	go test ./test/abuse/ -count=1 -v
//
// They need mosquitto and mosquitto_passwd (apt-get install mosquitto
// mosquitto-clients).
package abuse
