package operator

import (
	"context"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
)

// fakeBroker is a Broker whose listening the test decides.
type fakeBroker struct {
	ready   chan struct{}
	running atomic.Bool
}

func (b *fakeBroker) Ready() <-chan struct{} { return b.ready }
func (b *fakeBroker) Connected() bool        { return b.running.Load() }

// startAPIServer runs a kube-apiserver and etcd (no kubelet: Pods are just
// objects) for one test.
func startAPIServer(t *testing.T) (*rest.Config, client.Client) {
	t.Helper()
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Fatal("KUBEBUILDER_ASSETS is not set: run the tests with make test (it builds the control plane)")
	}
	env := &envtest.Environment{}
	cfg, err := env.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	s := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(s)
	c, err := client.New(cfg, client.Options{Scheme: s})
	if err != nil {
		t.Fatal(err)
	}
	return cfg, c
}

func createPod(t *testing.T, c client.Client, ns, name string, labels map[string]string) {
	t.Helper()
	ctx := context.Background()
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "manager", Image: "kubetwin:test"}}},
	}
	if err := c.Create(ctx, pod); err != nil {
		t.Fatal(err)
	}
}

func podLabels(t *testing.T, c client.Client, pod types.NamespacedName) map[string]string {
	t.Helper()
	p := &corev1.Pod{}
	if err := c.Get(context.Background(), pod, p); err != nil {
		t.Fatal(err)
	}
	return p.Labels
}

// TestBrokerLabeler: the leader labels its own Pod kubetwin.io/broker=active
// once its broker listens, not before; a label an earlier process left is
// removed at startup; the label goes when the manager stops; the ready
// check fails only while the Pod is labelled and the broker does not run.
func TestBrokerLabeler(t *testing.T) {
	cfg, c := startAPIServer(t)
	pod := types.NamespacedName{Namespace: "kubetwin-system", Name: "kubetwin-controller-manager-abc12"}
	// A label left behind by the container's previous process.
	createPod(t, c, pod.Namespace, pod.Name, map[string]string{"app.kubernetes.io/name": "kubetwin", BrokerLabel: BrokerLabelActive})

	mgr, err := ctrl.NewManager(cfg, ctrl.Options{Metrics: metricsserver.Options{BindAddress: "0"}, HealthProbeBindAddress: "0"})
	if err != nil {
		t.Fatal(err)
	}
	b := &fakeBroker{ready: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	l, err := AddBrokerLabeler(ctx, mgr, pod, b)
	if err != nil {
		t.Fatal(err)
	}
	if got := podLabels(t, c, pod); got[BrokerLabel] != "" || got["app.kubernetes.io/name"] != "kubetwin" {
		t.Fatalf("labels after startup = %v, want the stale %s removed and the others kept", got, BrokerLabel)
	}
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()

	// The broker does not listen yet: nothing routes to this replica, and
	// it is Ready (it serves the webhook).
	if got := podLabels(t, c, pod); got[BrokerLabel] != "" {
		t.Errorf("pod labelled %v before the broker listens", got)
	}
	if err := l.ReadyCheck(nil); err != nil {
		t.Errorf("ReadyCheck before the broker listens: %v, want ready", err)
	}

	b.running.Store(true)
	close(b.ready)
	deadline := time.Now().Add(30 * time.Second)
	for podLabels(t, c, pod)[BrokerLabel] != BrokerLabelActive || !l.Labelled() {
		if time.Now().After(deadline) {
			t.Fatalf("the pod was not labelled %s=%s once the broker listened: %v", BrokerLabel, BrokerLabelActive, podLabels(t, c, pod))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := l.ReadyCheck(nil); err != nil {
		t.Errorf("ReadyCheck with the broker listening: %v", err)
	}
	b.running.Store(false)
	if err := l.ReadyCheck(nil); err == nil || !strings.Contains(err.Error(), "its MQTT broker is not running") {
		t.Errorf("ReadyCheck of a labelled replica whose broker stopped: %v, want an error", err)
	}

	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("manager: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the manager did not stop")
	}
	if got := podLabels(t, c, pod); got[BrokerLabel] != "" {
		t.Errorf("labels after the manager stopped = %v, want no %s", got, BrokerLabel)
	}
}

// TestBrokerLabelerMissingPod: a Pod that does not exist (a wrong POD_NAME)
// stops the labeler with an error that says what it was doing, rather than
// leave devices without a route to the broker in silence.
func TestBrokerLabelerMissingPod(t *testing.T) {
	_, c := startAPIServer(t)
	b := &fakeBroker{ready: make(chan struct{})}
	close(b.ready)
	l := NewBrokerLabeler(c, types.NamespacedName{Namespace: "default", Name: "no-such-pod"}, b, ctrl.Log)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err := l.Start(ctx)
	if err == nil || !strings.Contains(err.Error(), "labelling pod default/no-such-pod kubetwin.io/broker=active") {
		t.Errorf("Start = %v, want an error naming the pod and the label", err)
	}
}
