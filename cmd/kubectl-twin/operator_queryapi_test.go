package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/internal/queryapi/queryapitest"
	"github.com/kubetwin/kubetwin/internal/queryapi/wire"
	"github.com/kubetwin/kubetwin/internal/testutil/operatorproc"
)

func withNamespace(d device, ns string) device {
	d.ns = ns
	return d
}

func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }()
	return l.Addr().String()
}

// TestOperatorServesQueryAPI: the operator binary with
// --query-api-bind-address serves the query API from its cache, behind
// kube-apiserver (its own namespace, so it reconciles only twins made
// here), under its shard's group with the certificate it issues and the
// caBundle it keeps on that group's APIService (kube-apiserver verifies
// it): the plugin asks the shard's group, and its --via api answer is the
// listing's. Registered for the cluster's group too, it refuses other
// namespaces, and the plugin lists them.
func TestOperatorServesQueryAPI(t *testing.T) {
	ctx := context.Background()
	const ns = "operated"
	shard := wire.ShardGroup(ns)
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		t.Fatal(err)
	}
	for _, d := range fleet[:3] {
		if err := createTwinNamed(ctx, withNamespace(d, ns), name(d.id)); err != nil {
			t.Fatal(err)
		}
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "manager")
	if err := operatorproc.GoBuild(filepath.Join("..", ".."), bin, "./cmd/manager"); err != nil {
		t.Fatal(err)
	}
	qaddr := freeAddr(t)
	var p operatorproc.Proc
	exited, err := p.Start(operatorproc.Spec{
		Bin: bin,
		Args: []string{"--kubeconfig=" + kubeconfig, "--namespace=" + ns, "--claims-namespace=" + ns,
			"--health-probe-bind-address=" + freeAddr(t), "--metrics-bind-address=0", "--disable-webhook",
			"--service-api-bind-address=", "--device-auth=none", "--mqtt-bind-address=" + freeAddr(t), "--mqtt-tls-bind-address=",
			"--query-api-bind-address=" + qaddr,
			// The Service queryapitest registers: the operator issues the
			// certificate for it and keeps the APIService's caBundle.
			"--query-api-service-namespace=" + queryapitest.ServiceNamespace, "--query-api-service-name=" + queryapitest.ServiceNameOf(shard)},
		Env:     operatorproc.Environ("POD_NAMESPACE="),
		LogPath: filepath.Join(dir, "operator.log"),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.SignalAndWait(syscall.SIGTERM, 10*time.Second) })
	// Wait until it listens (or died).
	deadline := time.Now().Add(60 * time.Second)
	for {
		c, err := net.Dial("tcp", qaddr)
		if err == nil {
			_ = c.Close()
			break
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(filepath.Join(dir, "operator.log"))
			t.Fatalf("the operator exited:\n%s", log)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatal("the operator's query API did not listen within 60s")
		}
	}
	if err := queryapitest.RegisterGroup(ctx, testEnv.Config, shard, qaddr, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = queryapitest.UnregisterGroup(ctx, testEnv.Config, shard) })
	// Registered without a caBundle (insecureSkipTLSVerify): the operator
	// puts its CA there, and from then on kube-apiserver verifies it.
	deadline = time.Now().Add(60 * time.Second)
	for {
		as := &unstructured.Unstructured{}
		as.SetGroupVersionKind(schema.GroupVersionKind{Group: "apiregistration.k8s.io", Version: "v1", Kind: "APIService"})
		if err := k8s.Get(ctx, client.ObjectKey{Name: queryapitest.APIServiceNameOf(shard)}, as); err != nil {
			t.Fatal(err)
		}
		ca, _, _ := unstructured.NestedString(as.Object, "spec", "caBundle")
		insecure, _, _ := unstructured.NestedBool(as.Object, "spec", "insecureSkipTLSVerify")
		if ca != "" && !insecure {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the operator did not set the APIService's caBundle within 60s (insecureSkipTLSVerify %v)", insecure)
		}
		time.Sleep(200 * time.Millisecond)
	}

	q := "SELECT * FROM devices WHERE tags.location.region = 'US' OR properties.reported.connectivity.type = 'wifi'"
	// The operator reconciles the twins as it starts: compare once it has
	// settled (two answers in a row from the same state).
	deadline = time.Now().Add(60 * time.Second)
	for {
		want := ok(t, "query", "-n", ns, "-o", "json", "--via", "list", q)
		got := ok(t, "query", "-n", ns, "-o", "json", "--via", "api", "--verbose", q)
		if !strings.Contains(got.stderr, "answered by the query API ("+shard+"/v1alpha1") {
			t.Fatalf("--verbose says %s", got.stderr)
		}
		if len(deviceIDs(t, want.stdout)) == 0 {
			t.Fatal("listing finds no twin: the test checks nothing")
		}
		if canon(t, got.stdout) == canon(t, want.stdout) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the operator answers\n%s\nlisting gives\n%s", got.stdout, want.stdout)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// The operator watches one namespace: registered for the cluster's
	// group as well, it refuses the others, and the plugin (auto) lists.
	if err := queryapitest.Register(ctx, testEnv.Config, qaddr, nil); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = queryapitest.Unregister(ctx, testEnv.Config) })
	r := ok(t, "query", "-n", fleetNS, "-o", "json", "--verbose", q)
	if !strings.Contains(r.stderr, "answered by listing") || !strings.Contains(r.stderr, "serves the DeviceTwins of namespace "+ns+" only") {
		t.Fatalf("another namespace: --verbose says %s", r.stderr)
	}
}
