package main

import (
	"flag"
	"slices"
	"strings"
	"testing"
)

// TestQueryAPIFlags: the query API is off unless its address is set, and
// its bounds must be positive.
func TestQueryAPIFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		err  string
	}{
		{nil, ""},
		{[]string{"--query-api-max-concurrent-queries=0"}, ""}, // off: not checked
		{[]string{"--query-api-bind-address=:8444"}, ""},
		{[]string{"--query-api-bind-address=:8444", "--query-api-max-concurrent-queries=0"}, "--query-api-max-concurrent-queries must be at least 1, got 0"},
		{[]string{"--query-api-bind-address=:8444", "--query-api-max-response-bytes=-1"}, "--query-api-max-response-bytes must be at least 1, got -1"},
		{[]string{"--query-api-bind-address=:8444", "--query-api-secret-name="}, `--query-api-secret-name "" is not a valid name`},
		{[]string{"--query-api-bind-address=:8444", "--query-api-service-name=Query_API"}, `--query-api-service-name "Query_API" is not a valid name`},
		{[]string{"--query-api-bind-address=:8444", "--query-api-apiservice-name=v1/x"}, `--query-api-apiservice-name "v1/x" is not a valid name`},
		{[]string{"--query-api-bind-address=:8444", "--query-api-apiservice-name="}, ""},                            // the caBundle is someone else's
		{[]string{"--query-api-bind-address=:8444", "--query-api-cert-dir=/certs", "--query-api-secret-name="}, ""}, // not used
	} {
		fs := flag.NewFlagSet("manager", flag.ContinueOnError)
		var q queryAPIOptions
		bindQueryAPIFlags(fs, &q)
		if err := fs.Parse(c.args); err != nil {
			t.Fatal(err)
		}
		err := checkQueryAPIFlags(q)
		if (err == nil) != (c.err == "") || err != nil && !strings.Contains(err.Error(), c.err) {
			t.Errorf("%v: error %v, want %q", c.args, err, c.err)
		}
	}
}

// TestQueryAPICertOptions: the operator-issued certificate names the
// Service as kube-apiserver dials it (<service>.<namespace>.svc), its
// Secret lives in that namespace, and the APIService gets the caBundle;
// the namespace is the pod's unless the flag sets it, and without one the
// operator does not issue (it runs outside a cluster).
func TestQueryAPICertOptions(t *testing.T) {
	fs := flag.NewFlagSet("manager", flag.ContinueOnError)
	var q queryAPIOptions
	bindQueryAPIFlags(fs, &q)
	if err := fs.Parse([]string{"--query-api-bind-address=:8444", "--query-api-service-name=twins-query-api",
		"--query-api-secret-name=twins-query-api-server-cert", "--query-api-host=query.example.com"}); err != nil {
		t.Fatal(err)
	}
	t.Setenv("POD_NAMESPACE", "")
	if ns := q.serviceNamespace(); ns != "" {
		t.Errorf("no POD_NAMESPACE, no flag: namespace %q, want none", ns)
	}
	t.Setenv("POD_NAMESPACE", "iot")
	ns := q.serviceNamespace()
	if ns != "iot" {
		t.Fatalf("namespace %q, want the pod's", ns)
	}
	co := queryAPICertOptions(q, ns, "")
	wantHosts := []string{"twins-query-api.iot.svc", "twins-query-api.iot.svc.cluster.local", "query.example.com"}
	if co.Purpose != "query-api" || co.SecretNamespace != "iot" || co.SecretName != "twins-query-api-server-cert" ||
		co.APIServiceName != "v1alpha1.query.kubetwin.io" || !slices.Equal(co.Hosts, wantHosts) {
		t.Errorf("options %+v, want hosts %v", co, wantHosts)
	}
	// An operator of one namespace keeps its shard's APIService, unless
	// the flag names one (or none).
	if got := queryAPICertOptions(q, ns, "fleet-07").APIServiceName; got != "v1alpha1.fleet-07.query.kubetwin.io" {
		t.Errorf("--namespace fleet-07: APIService %q, want the shard's", got)
	}
	for _, name := range []string{"v1alpha1.query.kubetwin.io", ""} {
		if err := fs.Parse([]string{"--query-api-apiservice-name=" + name}); err != nil {
			t.Fatal(err)
		}
		if got := queryAPICertOptions(q, ns, "fleet-07").APIServiceName; got != name {
			t.Errorf("--query-api-apiservice-name=%s: APIService %q", name, got)
		}
	}
	if err := fs.Parse([]string{"--query-api-service-namespace=edge"}); err != nil {
		t.Fatal(err)
	}
	if ns := q.serviceNamespace(); ns != "edge" {
		t.Errorf("namespace %q, want the flag's", ns)
	}
}
