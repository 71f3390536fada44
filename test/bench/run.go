package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap/zapcore"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8sruntime "k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/bridge"
	"github.com/kubetwin/kubetwin/internal/bus"
)

const (
	// baselineNS holds the baseline's twins; the operator does not watch it.
	baselineNS = "bench-baseline"
	// devicesNS holds the devices' twins; the operator watches only it.
	devicesNS = "bench-devices"
)

var scheme = k8sruntime.NewScheme()

// run does the whole benchmark and returns the exit code.
func run(ctx context.Context, cfg config) (code int) {
	res := &results{
		Twins: cfg.twins, Devices: cfg.devices, RatePerDevice: cfg.rate, InflightPerDevice: cfg.inflight,
		MaxConcurrentRecs: cfg.workers, DurationSec: cfg.duration.Seconds(),
	}
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return fail("scheme", err)
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		return fail("scheme", err)
	}

	opLog := &lineLog{prefix: "[operator] ", limit: int64(cfg.operatorLogLimit), out: os.Stderr}
	level := zapcore.Level(-cfg.operatorVerbosity)
	if cfg.operatorVerbosity == 0 {
		level = zapcore.ErrorLevel
	}
	ctrl.SetLogger(zap.New(zap.WriteTo(opLog), zap.Level(level), zap.StacktraceLevel(zapcore.PanicLevel)))
	devLog := &lineLog{prefix: "[device] ", limit: int64(cfg.deviceLogLimit), out: os.Stderr}

	crdDir, err := findCRDs()
	if err != nil {
		return fail("finding the CRDs", err)
	}
	progress("starting the control plane (envtest kube-apiserver + etcd from %s)", os.Getenv("KUBEBUILDER_ASSETS"))
	env := &envtest.Environment{CRDDirectoryPaths: []string{crdDir}, ErrorIfCRDPathMissing: true}
	restCfg, err := env.Start()
	if err != nil {
		return fail("starting envtest", err)
	}
	defer func() {
		progress("stopping the control plane")
		if err := env.Stop(); err != nil {
			progress("stopping envtest: %v", err)
		}
	}()
	restCfg = rest.CopyConfig(restCfg)
	restCfg.QPS, restCfg.Burst = float32(cfg.qps), cfg.burst

	// The non-caching client of the baseline, the checks and the desired changes.
	k8s, err := client.New(restCfg, client.Options{Scheme: scheme})
	if err != nil {
		return fail("client", err)
	}
	for _, ns := range []string{baselineNS, devicesNS} {
		if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fail("creating namespace "+ns, err)
		}
	}

	// (a) Baseline, before the operator exists.
	if err := createTwins(ctx, k8s, baselineNS, "base-", cfg.twins, "baseline twins"); err != nil {
		return fail("creating the baseline twins", err)
	}
	if err := runBaseline(ctx, k8s, cfg, res); err != nil {
		return fail("baseline", err)
	}

	// The devices' twins, then the operator.
	if err := createTwins(ctx, k8s, devicesNS, "dev-", cfg.devices, "device twins"); err != nil {
		return fail("creating the device twins", err)
	}
	op, err := startOperator(ctx, restCfg, cfg)
	if err != nil {
		return fail("starting the operator", err)
	}
	var devs []*simDevice
	defer func() {
		// The operator goes first, so closing devices costs no status writes.
		op.stop()
		closeDevices(devs)
	}()

	devs, err = connectDevices(ctx, op.brokerURL, cfg, devLog)
	if err != nil {
		return fail("connecting the devices", err)
	}
	waitQuiet(ctx, k8s, op)
	res.SetupSec = time.Since(benchStart).Seconds()

	// (b) Reports.
	if err := runReports(ctx, devs, cfg, res); err != nil {
		return fail("report phase", err)
	}
	if err := verify(ctx, k8s, devs, res); err != nil {
		return fail("verifying the twins", err)
	}

	// (c) Desired.
	if err := runDesired(ctx, k8s, devs, cfg, res); err != nil {
		return fail("desired phase", err)
	}

	res.OperatorErrorLogs = opLog.lines.Load()
	res.DeviceLogLines = devLog.lines.Load()
	res.TotalSec = time.Since(benchStart).Seconds()
	printResults(res)
	if res.Mismatches > 0 {
		progress("FAIL: %d twins do not hold their device's last acknowledged report", res.Mismatches)
		return 1
	}
	return 0
}

func fail(what string, err error) int {
	progress("FAILED %s: %v", what, err)
	return 2
}

// findCRDs finds config/crd/bases from the working directory or this file.
func findCRDs() (string, error) {
	var starts []string
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if _, file, _, ok := runtime.Caller(0); ok {
		starts = append(starts, filepath.Dir(file))
	}
	for _, dir := range starts {
		for d := dir; ; d = filepath.Dir(d) {
			p := filepath.Join(d, "config", "crd", "bases")
			if st, err := os.Stat(p); err == nil && st.IsDir() {
				return p, nil
			}
			if filepath.Dir(d) == d {
				break
			}
		}
	}
	return "", errors.New("config/crd/bases not found above the working directory: run from the repository")
}

// createTwins creates n empty DeviceTwins <prefix>0000... in ns, 32 at a time.
func createTwins(ctx context.Context, k8s client.Client, ns, prefix string, n int, what string) error {
	progress("creating %d %s in namespace %s", n, what, ns)
	start := time.Now()
	var next, done atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	stopTicker := make(chan struct{})
	go func() {
		t := time.NewTicker(2 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				progress("  %s: %d/%d created", what, done.Load(), n)
			case <-stopTicker:
				return
			}
		}
	}()
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				t := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: twinName(prefix, i)}}
				if err := k8s.Create(ctx, t); err != nil && !apierrors.IsAlreadyExists(err) {
					errOnce.Do(func() { firstErr = fmt.Errorf("creating %s/%s: %w", ns, t.Name, err) })
					return
				}
				done.Add(1)
			}
		}()
	}
	wg.Wait()
	close(stopTicker)
	if firstErr != nil {
		return firstErr
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	el := time.Since(start)
	progress("  %s: %d created in %.1fs (%.0f/s)", what, n, el.Seconds(), float64(n)/el.Seconds())
	return nil
}

func twinName(prefix string, i int) string { return fmt.Sprintf("%s%04d", prefix, i) }

// operator is the in-process kubetwin operator.
type operator struct {
	brokerURL string
	cancel    context.CancelFunc
	done      chan error
}

func (o *operator) stop() {
	progress("stopping the operator")
	o.cancel()
	select {
	case <-o.done:
	case <-time.After(15 * time.Second):
		progress("the operator did not stop within 15s")
	}
}

// startOperator starts the manager, the bridge, the embedded broker and the
// reconciler as controllers/suite_test.go does, watching devicesNS only.
func startOperator(ctx context.Context, restCfg *rest.Config, cfg config) (*operator, error) {
	progress("starting the operator (manager + embedded broker, %d reconcilers, watching %s)", cfg.workers, devicesNS)
	mgr, err := ctrl.NewManager(rest.CopyConfig(restCfg), ctrl.Options{
		Scheme:                 scheme,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		Cache:                  cache.Options{DefaultNamespaces: map[string]cache.Config{devicesNS: {}}},
	})
	if err != nil {
		return nil, fmt.Errorf("manager: %w", err)
	}
	br := bridge.New(bridge.Options{
		Logger: ctrl.Log.WithName("bridge"),
		Resolve: func(ctx context.Context, id string) (*v1alpha1.DeviceTwin, error) {
			return controllers.ResolveDeviceID(ctx, mgr.GetClient(), id)
		},
	})
	emb, err := bus.NewEmbedded(bus.EmbeddedOptions{
		Listen: "127.0.0.1:0", Handler: br.Handle, Presence: br.Presence, Logger: ctrl.Log.WithName("broker"),
	})
	if err != nil {
		return nil, fmt.Errorf("broker: %w", err)
	}
	br.SetBus(emb)
	if err := mgr.Add(emb); err != nil {
		return nil, fmt.Errorf("adding broker: %w", err)
	}
	mctx, cancel := context.WithCancel(ctx)
	r := &controllers.DeviceTwinReconciler{
		Client: mgr.GetClient(), Bridge: br, Recorder: mgr.GetEventRecorder("kubetwin"),
		MaxConcurrentReconciles: cfg.workers,
	}
	if err := r.SetupWithManager(mctx, mgr); err != nil {
		cancel()
		return nil, fmt.Errorf("controller: %w", err)
	}
	op := &operator{cancel: cancel, done: make(chan error, 1)}
	go func() { op.done <- mgr.Start(mctx) }()
	select {
	case <-emb.Ready():
	case err := <-op.done:
		cancel()
		return nil, fmt.Errorf("manager stopped: %w", err)
	case <-time.After(60 * time.Second):
		op.stop()
		return nil, errors.New("embedded broker did not start within 60s")
	}
	syncCtx, syncCancel := context.WithTimeout(ctx, 60*time.Second)
	defer syncCancel()
	if !mgr.GetCache().WaitForCacheSync(syncCtx) {
		op.stop()
		return nil, errors.New("the operator's cache did not sync within 60s")
	}
	op.brokerURL = "tcp://" + emb.Addr()
	progress("operator running; embedded broker at %s", op.brokerURL)
	return op, nil
}

// statusWrites returns the operator's successful and failed status patches so far.
func statusWrites() (ok, failed int64) {
	return int64(counterValue(bridge.StatusWrites.WithLabelValues("ok"))),
		int64(counterValue(bridge.StatusWrites.WithLabelValues("error")))
}

// waitQuiet waits until the operator has written the status of every twin
// once and stopped writing (initial reconciles and presence), so the report
// phase counts only what reports cause.
func waitQuiet(ctx context.Context, k8s client.Client, op *operator) {
	progress("waiting for the operator to settle (no status writes for 2s)")
	deadline := time.Now().Add(60 * time.Second)
	last, _ := statusWrites()
	lastChange := time.Now()
	for time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(250 * time.Millisecond)
		n, _ := statusWrites()
		if n != last {
			last, lastChange = n, time.Now()
		}
		if time.Since(lastChange) >= 2*time.Second {
			break
		}
	}
	ok, failed := statusWrites()
	var list v1alpha1.DeviceTwinList
	connected := -1
	if err := k8s.List(ctx, &list, client.InNamespace(devicesNS)); err == nil {
		connected = 0
		for i := range list.Items {
			if list.Items[i].Status.ConnectionState == v1alpha1.ConnectionStateConnected {
				connected++
			}
		}
	}
	progress("operator settled: %d status writes so far (%d failed); %d/%d twins say Connected", ok, failed, connected, len(list.Items))
}
