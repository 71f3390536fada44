package controllers_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrlconfig "sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/kubetwin/kubetwin/controllers"
)

// syncBuffer is a log sink several goroutines write to.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// shutdownRun starts a manager with one controller of ConfigMaps in a new
// namespace, built with wrap; its reconciles of "stuck-*" wait in a request
// to the API server until the manager stops, that of "fails" returns an
// error at once. It stops the manager once the stuck ones are in flight and
// "fails" has failed, and returns the manager's log.
func shutdownRun(t *testing.T, wrap func(reconcile.Reconciler) reconcile.Reconciler) string {
	t.Helper()
	ns := newNamespace(t)
	logs := &syncBuffer{}
	mgr, err := ctrl.NewManager(restConfig, ctrl.Options{
		Scheme:                 testScheme,
		Logger:                 zap.New(zap.WriteTo(logs)),
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		Cache:                  cache.Options{DefaultNamespaces: map[string]cache.Config{ns: {}}},
		Controller:             ctrlconfig.Controller{SkipNameValidation: ptr.To(true)},
	})
	if err != nil {
		t.Fatal(err)
	}
	const stuck = 3
	inFlight := make(chan struct{}, stuck)
	failed := make(chan struct{}, 1)
	r := reconcile.Func(func(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
		if req.Name == "fails" {
			select {
			case failed <- struct{}{}:
			default:
			}
			return reconcile.Result{}, errors.New("the API server refused the write")
		}
		inFlight <- struct{}{}
		<-ctx.Done()
		// What a status patch in flight returns when the manager stops.
		err := k8s.Status().Patch(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: req.Name}},
			client.RawPatch("application/merge-patch+json", []byte(`{}`)))
		return reconcile.Result{}, fmt.Errorf("patching status: %w", err)
	})
	if err := ctrl.NewControllerManagedBy(mgr).For(&corev1.ConfigMap{}).Named("shutdowntest").
		WithOptions(controller.Options{MaxConcurrentReconciles: stuck + 1}).Complete(wrap(r)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	names := []string{"fails"}
	for i := range stuck {
		names = append(names, fmt.Sprintf("stuck-%d", i))
	}
	for _, name := range names {
		if err := k8s.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.After(wait)
	for range stuck {
		select {
		case <-inFlight:
		case <-deadline:
			t.Fatal("the reconciles did not start")
		}
	}
	select {
	case <-failed:
	case <-deadline:
		t.Fatal("the failing reconcile did not run")
	}
	// Its error is logged once it returns; wait for the line.
	for !strings.Contains(logs.String(), "the API server refused the write") {
		select {
		case <-deadline:
			t.Fatalf("the failing reconcile's error was not logged:\n%s", logs.String())
		case <-time.After(tick):
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("manager: %v", err)
	}
	return logs.String()
}

func TestShutdownMidReconcileIsNoError(t *testing.T) {
	logs := shutdownRun(t, controllers.QuietOnShutdown)
	var errs []string
	for _, l := range strings.Split(logs, "\n") {
		if strings.Contains(l, "Reconciler error") {
			errs = append(errs, l)
		}
	}
	// The error of a live reconcile is still reported; the reconciles the
	// shutdown cut short are not.
	if len(errs) == 0 || !strings.Contains(strings.Join(errs, "\n"), "the API server refused the write") {
		t.Errorf("a reconcile that failed while the manager ran was not logged as an error:\n%s", logs)
	}
	for _, l := range errs {
		if strings.Contains(l, "context canceled") || strings.Contains(l, "stuck-") {
			t.Errorf("a reconcile cut short by the shutdown was logged as an error: %s", l)
		}
	}

	// Without the wrapper, controller-runtime logs each of them as an
	// error: what the test would see if a controller were built without it.
	logs = shutdownRun(t, func(r reconcile.Reconciler) reconcile.Reconciler { return r })
	if n := strings.Count(logs, "context canceled"); n < 3 {
		t.Errorf("without QuietOnShutdown, %d reconcile errors with context canceled were logged, want 3:\n%s", n, logs)
	}
}
