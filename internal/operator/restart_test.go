package operator

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"runtime/trace"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrlconfig "sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/deviceauth"
)

// TestRestartCost measures an operator restart on a settled fleet: N twins
// (KUBETWIN_RESTART_TWINS; skipped when unset) are created and reconciled
// by one operator, which is stopped; a fresh one is then started and the
// test reports start → cache synced → every twin reconciled, the bytes and
// objects allocated per twin, the heap in use and live after it, and the GC
// cycles. KUBETWIN_RESTART_PROFILE=prefix writes prefix.cpu.pprof and
// prefix.heap-{before,after}.pprof (diff alloc_space with pprof -base)
// and an execution trace, prefix.trace (go tool trace -pprof=sync, or
// =sched, for where the reconciles wait).
// KUBETWIN_RESTART_BASELINE=1 sets the operator up as before this
// measurement's changes (eager log fields, controller-runtime's mapper).
// KUBETWIN_RESTART_ROUNDS restarts that many times (default 2): the first
// round warms the process (code pages, shared strings, metric series).
// KUBETWIN_RESTART_KEYS=1 runs the operator with device keys (the chart's
// default, --device-auth=sas): every twin has a key Secret, cached too.
// KUBETWIN_RESTART_WATCH_DECODER=client-go decodes the twins' and claims'
// watches with client-go's decoder instead of the default one-pass one
// (--watch-decoder); a list (one-pass,client-go) takes them in turn,
// round by round.
//
//	export KUBEBUILDER_ASSETS=$(hack/controlplane.sh)
//	KUBETWIN_RESTART_TWINS=5000 go test ./internal/operator/ -run TestRestartCost -v -count=1
func TestRestartCost(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("KUBETWIN_RESTART_TWINS"))
	if n <= 0 {
		t.Skip("KUBETWIN_RESTART_TWINS is not set")
	}
	rounds, _ := strconv.Atoi(os.Getenv("KUBETWIN_RESTART_ROUNDS"))
	if rounds <= 0 {
		rounds = 2
	}
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Fatal("KUBEBUILDER_ASSETS is not set: export KUBEBUILDER_ASSETS=$(hack/controlplane.sh)")
	}
	baseline := os.Getenv("KUBETWIN_RESTART_BASELINE") != ""
	restartKeys = os.Getenv("KUBETWIN_RESTART_KEYS") != ""
	if baseline {
		ctrl.SetLogger(zap.New(zap.Level(zapcore.ErrorLevel)))
	} else {
		ctrl.SetLogger(zap.New(zap.Level(zapcore.ErrorLevel), zap.RawZapOpts(LazyFields())))
	}
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
	}
	cfg, err := env.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	cfg.QPS, cfg.Burst = 2000, 4000 // the test's own client; the operator's is the default
	scheme := k8sruntime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	k8s, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	const ns = "fleet"
	if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := parallel(n, 16, func(i int) error {
		tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("dev-%06d", i)}}
		tw.Spec.Tags = &apiextensionsv1.JSON{Raw: fmt.Appendf(nil, `{"location":{"plant":"P%d","line":%d},"model":"m1"}`, i%7, i%50)}
		tw.Spec.Desired = &apiextensionsv1.JSON{Raw: fmt.Appendf(nil, `{"telemetry":{"interval":%d},"led":true}`, 10+i%5)}
		return k8s.Create(ctx, tw)
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d twins created in %.1fs", n, time.Since(start).Seconds())

	op := startRestartOperator(t, cfg, scheme, baseline)
	waitSettled(t, ctx, k8s, ns, n)
	op.stop(t)

	decoders := strings.Split(os.Getenv("KUBETWIN_RESTART_WATCH_DECODER"), ",")
	for round := 1; round <= rounds; round++ {
		restartDecoder = decoders[(round-1)%len(decoders)]
		measureRestart(t, cfg, scheme, n, round, round == rounds, baseline)
	}
}

// measureRestart starts an operator on the settled fleet and logs what
// the restart cost.
func measureRestart(t *testing.T, cfg *rest.Config, scheme *k8sruntime.Scheme, n, round int, profile, baseline bool) {
	prefix := os.Getenv("KUBETWIN_RESTART_PROFILE")
	profile = profile && prefix != ""
	runtime.GC()
	var m0, m1, m2 runtime.MemStats
	runtime.ReadMemStats(&m0)
	r0 := reconciles()
	if profile {
		writeHeapProfile(t, prefix+".heap-before.pprof")
		f, err := os.Create(prefix + ".cpu.pprof")
		if err != nil {
			t.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			t.Fatal(err)
		}
		tf, err := os.Create(prefix + ".trace")
		if err != nil {
			t.Fatal(err)
		}
		if err := trace.Start(tf); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	op := startRestartOperator(t, cfg, scheme, baseline)
	synced := time.Since(start)
	var done time.Duration
	deadline := time.Now().Add(10 * time.Minute)
	for {
		r := reconciles()
		if r.total-r0.total >= float64(n) && r.depth == 0 && r.active == 0 {
			done = time.Since(start)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("round %d: %.0f of %d twins reconciled after 10m", round, r.total-r0.total, n)
		}
		time.Sleep(50 * time.Millisecond) // polling a counter, not synchronising
	}
	runtime.ReadMemStats(&m1)
	if profile {
		trace.Stop()
		pprof.StopCPUProfile()
		writeHeapProfile(t, prefix+".heap-after.pprof")
	}
	runtime.GC()
	runtime.ReadMemStats(&m2)
	r := reconciles()
	load, _ := os.ReadFile("/proc/loadavg")
	t.Logf("round %d (watch decoder %q), %d twins: cache synced %.2fs, every twin reconciled %.2fs (%.0f reconciles, %.0f errors); "+
		"per twin %.0f B, %.1f objects allocated; heap in use %.1f MiB, live after a GC %.1f MiB; %d GC cycles; loadavg %s",
		round, restartDecoder, n, synced.Seconds(), done.Seconds(), r.total-r0.total, r.errors-r0.errors,
		float64(m1.TotalAlloc-m0.TotalAlloc)/float64(n), float64(m1.Mallocs-m0.Mallocs)/float64(n),
		float64(m1.HeapInuse)/(1<<20), float64(m2.HeapAlloc)/(1<<20), m1.NumGC-m0.NumGC, load[:len(load)-1])
	op.stop(t)
}

// restartKeys: the operators of TestRestartCost keep device keys.
var restartKeys bool

type restartOperator struct {
	cancel context.CancelFunc
	done   chan error
}

// restartDecoder is the watch decoder of the next operator started
// (empty: the default).
var restartDecoder string

// restartCacheOptions are cmd/manager's cache options, with the watch
// decoder restartDecoder.
func restartCacheOptions(t *testing.T, cfg *rest.Config) cache.Options {
	t.Helper()
	o, err := CacheOptions(cfg, "", "", restartDecoder)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// startRestartOperator starts the operator as cmd/manager assembles it
// (cache options, bridge, embedded broker, reconcilers) and returns once
// its caches have synced.
func startRestartOperator(t *testing.T, cfg *rest.Config, scheme *k8sruntime.Scheme, baseline bool) *restartOperator {
	t.Helper()
	mapper := NewRESTMapper
	if baseline {
		mapper = nil
	}
	mgr, err := ctrl.NewManager(rest.CopyConfig(cfg), ctrl.Options{
		MapperProvider:         mapper,
		Scheme:                 scheme,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		Cache:                  restartCacheOptions(t, cfg),
		Controller:             ctrlconfig.Controller{SkipNameValidation: ptr.To(true)},
	})
	if err != nil {
		t.Fatal(err)
	}
	br := NewBridge(mgr, BridgeOptions{IdleStateTTL: 5 * time.Minute})
	eo := bus.EmbeddedOptions{Listen: "127.0.0.1:0", Handler: br.Handle, Presence: br.Presence}
	var auth *deviceauth.Authenticator
	if restartKeys { // as cmd/manager with --device-auth=sas
		auth = &deviceauth.Authenticator{HubHostname: "restart.kubetwin.test",
			Lookup: controllers.DeviceLookup(Resolver(mgr, DefaultClaimsNamespace))}
		eo.Auth = auth
	}
	emb, err := bus.NewEmbedded(eo)
	if err != nil {
		t.Fatal(err)
	}
	var creds *controllers.Credentials
	if auth != nil {
		creds = &controllers.Credentials{HubHostname: auth.HubHostname, Provisioner: deviceauth.EmbeddedProvisioner{Broker: emb, Auth: auth}}
	}
	if err := AddBus(mgr, br, emb); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	if err := AddReconciler(ctx, mgr, br, ReconcilerOptions{Credentials: creds}); err != nil {
		cancel()
		t.Fatal(err)
	}
	op := &restartOperator{cancel: cancel, done: make(chan error, 1)}
	t.Cleanup(cancel) // before the API server stops, should the test fail
	go func() { op.done <- mgr.Start(ctx) }()
	syncCtx, syncCancel := context.WithTimeout(ctx, 5*time.Minute)
	defer syncCancel()
	if !mgr.GetCache().WaitForCacheSync(syncCtx) {
		op.stop(t)
		t.Fatal("the operator's cache did not sync in 5m")
	}
	return op
}

func (op *restartOperator) stop(t *testing.T) {
	op.cancel()
	if err := <-op.done; err != nil {
		t.Errorf("operator: %v", err)
	}
}

// waitSettled waits until every twin of ns carries the finalizer, its
// mirrored labels and a status for its generation, and the reconciler is
// idle: the state a running operator leaves its fleet in.
func waitSettled(t *testing.T, ctx context.Context, k8s client.Client, ns string, n int) {
	t.Helper()
	start := time.Now()
	for {
		// Pages: a single list of 10,000 twins can outlast the API
		// server's stream on a busy machine; an error is retried.
		settled, cont := 0, ""
		for {
			var list v1alpha1.DeviceTwinList
			if err := k8s.List(ctx, &list, client.InNamespace(ns), client.Limit(500), client.Continue(cont)); err != nil {
				t.Logf("listing twins (retrying): %v", err)
				settled = -1
				break
			}
			for i := range list.Items {
				tw := &list.Items[i]
				if len(tw.Finalizers) == 1 && tw.Labels["model"] == "m1" && tw.Status.ObservedGeneration == tw.Generation &&
					len(tw.Status.Conditions) > 0 {
					settled++
				}
			}
			if cont = list.Continue; cont == "" {
				break
			}
		}
		r := reconciles()
		if settled == n && r.depth == 0 && r.active == 0 {
			t.Logf("%d twins settled in %.1fs", n, time.Since(start).Seconds())
			return
		}
		if time.Since(start) > 15*time.Minute {
			t.Fatalf("%d of %d twins settled after 15m", settled, n)
		}
		time.Sleep(2 * time.Second) // polling the API server, not synchronising
	}
}

type reconcileCounts struct{ total, errors, depth, active float64 }

// reconciles reads the DeviceTwin controller's counters and gauges from
// controller-runtime's metrics.
func reconciles() reconcileCounts {
	var c reconcileCounts
	mfs, _ := ctrlmetrics.Registry.Gather()
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			var ctl, result string
			for _, l := range m.GetLabel() {
				switch l.GetName() {
				case "controller", "name":
					ctl = l.GetValue()
				case "result":
					result = l.GetValue()
				}
			}
			if ctl != "devicetwin" {
				continue
			}
			switch mf.GetName() {
			case "controller_runtime_reconcile_total":
				c.total += m.GetCounter().GetValue()
				if result == "error" {
					c.errors += m.GetCounter().GetValue()
				}
			case "workqueue_depth":
				c.depth += m.GetGauge().GetValue()
			case "controller_runtime_active_workers":
				c.active += m.GetGauge().GetValue()
			}
		}
	}
	return c
}

func writeHeapProfile(t *testing.T, path string) {
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	if err := pprof.Lookup("allocs").WriteTo(f, 0); err != nil {
		t.Fatal(err)
	}
}

// parallel calls f(0..n-1), par at a time, and returns the first error.
func parallel(n, par int, f func(i int) error) error {
	var next atomic.Int64
	var mu sync.Mutex
	var first error
	var wg sync.WaitGroup
	for range par {
		wg.Go(func() {
			for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
				if err := f(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	return first
}
