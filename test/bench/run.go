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
	"k8s.io/utils/ptr"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrlconfig "sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/bridge"
	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/deviceauth"
	kubetwin "github.com/kubetwin/kubetwin/internal/operator"
)

const (
	// baselineNS holds the baseline's twins (deleted before the operator starts).
	baselineNS = "bench-baseline"
	// devicesNS holds the devices' twins.
	devicesNS = "bench-devices"
)

var scheme = k8sruntime.NewScheme()

// run does the whole benchmark and returns the exit code.
func run(ctx context.Context, cfg config) (code int) {
	res := &results{
		Twins: cfg.twins, Devices: cfg.devices, RatePerDevice: cfg.rate, InflightPerDevice: cfg.inflight,
		MaxConcurrentRecs: cfg.workers, DurationSec: cfg.duration.Seconds(),
	}
	opLog := &lineLog{prefix: "[operator] ", limit: int64(cfg.operatorLogLimit), out: os.Stderr}
	cp, err := startControlPlane(ctx, &cfg, opLog, baselineNS, devicesNS, serviceNS)
	if err != nil {
		return fail("starting the control plane", err)
	}
	defer cp.stop()
	// k8s is the non-caching client of the baseline, the checks and the
	// desired changes.
	env, restCfg, k8s := cp.env, cp.restCfg, cp.k8s

	// (a) Baseline, before the operator exists; its twins are deleted
	// before the operator starts, so the operator (which watches every
	// namespace, as in controllers/suite_test.go) never sees them.
	if err := createTwins(ctx, k8s, baselineNS, "base-", cfg.twins, "baseline twins"); err != nil {
		return fail("creating the baseline twins", err)
	}
	if err := runBaseline(ctx, k8s, cfg, res); err != nil {
		return fail("baseline", err)
	}
	if err := deleteTwins(ctx, k8s, baselineNS); err != nil {
		return fail("deleting the baseline twins", err)
	}

	// The devices' twins, then the operator, then the devices.
	if err := createTwins(ctx, k8s, devicesNS, "dev-", cfg.devices, "device twins"); err != nil {
		return fail("creating the device twins", err)
	}
	if cfg.serviceTwins > 0 {
		if err := createServiceTwins(ctx, k8s, cfg.serviceTwins); err != nil {
			return fail("creating the service twins", err)
		}
	}
	op, err := startOperator(ctx, restCfg, cfg)
	if err != nil {
		return fail("starting the operator", err)
	}
	// Twins created without the webhook, as these are, get their device id
	// claim from the reconciler; until then the id resolves to no twin and
	// a connecting device is answered 404.
	if err := waitClaims(ctx, k8s, cfg.devices+cfg.serviceTwins); err != nil {
		op.stop()
		return fail("waiting for the device id claims", err)
	}
	var dp *deviceProc
	defer func() {
		op.stop()
		if dp != nil {
			progress("closing the devices")
			res.DeviceLogLines = dp.shutdown()
		}
	}()
	dp, err = startDeviceProc(childConfig{
		BrokerURL: op.brokerURL, Devices: cfg.devices, ConnectParallel: cfg.connectParallel,
		RequestTimeout: cfg.requestTimeout, Rate: cfg.rate, Inflight: cfg.inflight,
		Warmup: cfg.warmup, Duration: cfg.duration, DrainTimeout: cfg.drainTimeout,
		DeviceLogLimit: cfg.deviceLogLimit, StartUnixNano: benchStart.UnixNano(),
	})
	if err != nil {
		return fail("starting the device process", err)
	}
	devicePID.Store(int64(dp.cmd.Process.Pid))
	var connected childMsg
	if err := dp.next(ctx, msgConnected, 10*time.Minute, &connected); err != nil {
		return fail("connecting the devices", err)
	}
	waitQuiet(ctx, k8s)
	res.SetupSec = time.Since(benchStart).Seconds()

	// (b) Reports.
	sum, err := runReportsPhase(ctx, dp, cfg, res)
	if err != nil {
		return fail("report phase", err)
	}
	if err := verify(ctx, k8s, sum, res); err != nil {
		return fail("verifying the twins", err)
	}

	// (c) Desired.
	if err := runDesired(ctx, k8s, dp, cfg, res); err != nil {
		return fail("desired phase", err)
	}

	// (e) Service API, with the operator running; its baselines follow
	// once the operator has stopped.
	if cfg.serviceTwins > 0 {
		if err := runServicePhase(ctx, k8s, op.service, cfg, res); err != nil {
			return fail("service API phase", err)
		}
	}

	// The operator goes first, so the devices' goodbyes cost no status
	// writes. (Its errors are counted before: stopping cancels writes.)
	res.OperatorErrorLogs = opLog.lines.Load()
	res.DeviceLogLines = dp.logLines(ctx)
	op.stop()
	progress("closing the devices")
	_ = dp.shutdown()
	dp = nil
	if cfg.baselineAfter > 0 {
		if err := runBaselineDeviceTwins(ctx, k8s, cfg, res); err != nil {
			return fail("baseline on the device twins", err)
		}
		if res.BaselineDeviceTwins > 0 {
			res.WriteRateVsDevBase = 100 * res.WritesPerSec / res.BaselineDeviceTwins
		}
	}
	if cfg.serviceTwins > 0 {
		if err := runServiceBaselines(ctx, cfg, res); err != nil {
			return fail("service API baselines", err)
		}
	}
	// (d) Queries: last, with the operator stopped, so nothing reconciles
	// the query fleet and its 10,000 objects weigh on no earlier phase.
	if cfg.queryTwins > 0 {
		if err := runQueryPhase(ctx, env, k8s, cfg, res); err != nil {
			return fail("query phase", err)
		}
	}
	res.TotalSec = time.Since(benchStart).Seconds()
	printResults(res)
	code = 0
	if res.Mismatches > 0 {
		progress("FAIL: %d twins do not hold their device's last acknowledged report", res.Mismatches)
		code = 1
	}
	if res.QueryMismatches > 0 {
		progress("FAIL: %d query answers differ from the full scan", res.QueryMismatches)
		code = 1
	}
	if n := res.serviceMismatches(); n > 0 {
		progress("FAIL: %d wrong service API answers (reads %d, update replies %d, setpoints %d, queries %d)", n,
			res.ServiceReadMismatches, res.ServiceUpdateMismatches, res.ServiceSetpointMismatches, res.ServiceQueryMismatches)
		code = 1
	}
	return code
}

// controlPlane is envtest's kube-apiserver and etcd with kubetwin's CRDs,
// and a non-caching client: make bench and make bench-scale start it alike.
type controlPlane struct {
	env *envtest.Environment
	// restCfg has cfg's client QPS and burst.
	restCfg *rest.Config
	k8s     client.Client
}

// startControlPlane registers the API types, sends the operator's log
// (controller-runtime's logger) to opLog, starts the control plane, sets
// cfg.restCfg and creates namespaces.
func startControlPlane(ctx context.Context, cfg *config, opLog *lineLog, namespaces ...string) (*controlPlane, error) {
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("scheme: %w", err)
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("scheme: %w", err)
	}
	level := zapcore.Level(-cfg.operatorVerbosity)
	if cfg.operatorVerbosity == 0 {
		level = zapcore.ErrorLevel
	}
	ctrl.SetLogger(zap.New(zap.WriteTo(opLog), zap.Level(level), zap.StacktraceLevel(zapcore.PanicLevel),
		zap.RawZapOpts(kubetwin.LazyFields())))

	crdDir, err := findCRDs()
	if err != nil {
		return nil, err
	}
	progress("starting the control plane (envtest kube-apiserver + etcd from %s)", os.Getenv("KUBEBUILDER_ASSETS"))
	cp := &controlPlane{env: &envtest.Environment{CRDDirectoryPaths: []string{crdDir}, ErrorIfCRDPathMissing: true}}
	if cfg.configureAPIServer != nil {
		if err := cfg.configureAPIServer(cp.env); err != nil {
			return nil, fmt.Errorf("configuring kube-apiserver: %w", err)
		}
	}
	restCfg, err := cp.env.Start()
	if err != nil {
		return nil, fmt.Errorf("starting envtest: %w", err)
	}
	cp.restCfg = rest.CopyConfig(restCfg)
	cp.restCfg.QPS, cp.restCfg.Burst = float32(cfg.qps), cfg.burst
	cfg.restCfg = cp.restCfg
	if cp.k8s, err = client.New(cp.restCfg, client.Options{Scheme: scheme}); err != nil {
		cp.stop()
		return nil, fmt.Errorf("client: %w", err)
	}
	for _, ns := range namespaces {
		if err := cp.k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil && !apierrors.IsAlreadyExists(err) {
			cp.stop()
			return nil, fmt.Errorf("creating namespace %s: %w", ns, err)
		}
	}
	return cp, nil
}

func (c *controlPlane) stop() {
	progress("stopping the control plane")
	if err := c.env.Stop(); err != nil {
		progress("stopping envtest: %v", err)
	}
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
	var done atomic.Int64
	defer reportEvery(2*time.Second, func() { progress("  %s: %d/%d created", what, done.Load(), n) })()
	err := forEachParallel(ctx, n, 32, func(i int) error {
		t := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: twinName(prefix, i)}}
		if err := k8s.Create(ctx, t); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("creating %s/%s: %w", ns, t.Name, err)
		}
		done.Add(1)
		return nil
	})
	if err != nil {
		return err
	}
	el := time.Since(start)
	progress("  %s: %d created in %.1fs (%.0f/s)", what, n, el.Seconds(), float64(n)/el.Seconds())
	return nil
}

// forEachParallel calls f(0..n-1), par at a time, and returns the first error.
func forEachParallel(ctx context.Context, n, par int, f func(i int) error) error {
	var next atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	for w := 0; w < par; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := f(i); err != nil {
					errOnce.Do(func() { firstErr = err })
					return
				}
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return firstErr
	}
	return ctx.Err()
}

// reportEvery calls report every d until the returned stop is called.
func reportEvery(d time.Duration, report func()) (stop func()) {
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(d)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				report()
			case <-done:
				return
			}
		}
	}()
	return func() { close(done) }
}

func twinName(prefix string, i int) string { return fmt.Sprintf("%s%04d", prefix, i) }

// deleteTwins deletes every DeviceTwin in ns (they have no finalizers: no
// operator has seen them) and waits until they are gone.
func deleteTwins(ctx context.Context, k8s client.Client, ns string) error {
	progress("deleting the baseline twins")
	if err := k8s.DeleteAllOf(ctx, &v1alpha1.DeviceTwin{}, client.InNamespace(ns)); err != nil {
		return err
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		var list v1alpha1.DeviceTwinList
		if err := k8s.List(ctx, &list, client.InNamespace(ns), client.Limit(1)); err != nil {
			return err
		}
		if len(list.Items) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return errors.New("baseline twins still there after 60s")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// runReportsPhase is phase (b): the device process reports; this process
// samples the operator's status-write counter and the CPU at the edges of
// the measured window.
func runReportsPhase(ctx context.Context, dp *deviceProc, cfg config, res *results) (reportSummary, error) {
	mode := fmt.Sprintf("%g reports/s per device (%.0f/s offered), at most %d outstanding per device", cfg.rate, cfg.rate*float64(cfg.devices), cfg.inflight)
	if cfg.rate == 0 {
		mode = fmt.Sprintf("as fast as acknowledged, %d outstanding per device", cfg.inflight)
	}
	progress("reports: %d devices, %s; %s warm-up + %s measured", cfg.devices, mode, cfg.warmup, cfg.duration)
	res.OfferedPerSec = cfg.rate * float64(cfg.devices)
	var sum reportSummary
	if err := dp.command(cmdReports); err != nil {
		return sum, err
	}
	var started childMsg
	if err := dp.next(ctx, msgReportsStart, time.Minute, &started); err != nil {
		return sum, err
	}
	t0 := time.Unix(0, started.T0)
	winStart := t0.Add(cfg.warmup)
	winEnd := winStart.Add(cfg.duration)
	sleepUntil := func(t time.Time) {
		for ctx.Err() == nil {
			left := time.Until(t)
			if left <= 0 {
				return
			}
			time.Sleep(min(left, 5*time.Second))
			if time.Until(t) > 0 {
				w, _ := statusWrites()
				progress("  operator: %d status writes so far", w)
			}
		}
	}
	sleepUntil(winStart)
	w0, e0 := statusWrites()
	tw0 := time.Now()
	c0 := sampleCPU()
	stopProfile := startProfile(cfg.cpuProfile)
	waitAPIProfile := func() {}
	if cfg.apiProfile != "" {
		waitAPIProfile = apiserverProfile(cfg.restCfg, cfg.duration-time.Second, cfg.apiProfile+".reports.pprof")
	}
	sleepUntil(winEnd)
	w1, e1 := statusWrites()
	writeWin := time.Since(tw0).Seconds() // the counter's own window: close to cfg.duration unless this process was starved
	res.CPUReports = coresBetween(c0, sampleCPU())
	stopProfile()
	if err := ctx.Err(); err != nil {
		return sum, err
	}
	progress("  operator: %d status writes in %.1fs; CPU cores: %s", w1-w0, writeWin, coresString(res.CPUReports))
	waitAPIProfile()
	if err := dp.next(ctx, msgReportsDone, cfg.drainTimeout+2*time.Minute, &sum); err != nil {
		return sum, err
	}

	win := cfg.duration.Seconds()
	res.ReportsSent = sum.Sent
	res.ReportsSkipped = sum.Skipped
	res.ReportsAcked = sum.AckedWin
	res.ReportErrors = sum.Errors
	res.ReportsPerSec = float64(sum.AckedWin) / win
	res.StatusWrites = w1 - w0
	res.StatusWriteErrors = e1 - e0
	res.WritesPerSec = float64(res.StatusWrites) / writeWin
	if res.WritesPerSec > 0 {
		res.ReportsPerWrite = res.ReportsPerSec / res.WritesPerSec
	}
	if res.Baseline > 0 {
		res.WriteRateVsBaseline = 100 * res.WritesPerSec / res.Baseline
	}
	res.ReportLatencyP50Ms, res.ReportLatencyP99Ms, res.ReportLatencyMaxMs = sum.P50Ms, sum.P99Ms, sum.MaxMs
	res.APIMsPerWriteReports = apiMsPerWrite(res.CPUReports, res.WritesPerSec)
	return sum, nil
}

// operator is the in-process kubetwin operator.
type operator struct {
	brokerURL string
	service   *serviceAPI // the service API of phase (e); nil without it
	cancel    context.CancelFunc
	done      chan error
	stopOnce  sync.Once
}

func (o *operator) stop() { o.stopOnce.Do(o.doStop) }

func (o *operator) doStop() {
	progress("stopping the operator")
	o.cancel()
	select {
	case <-o.done:
	case <-time.After(15 * time.Second):
		progress("the operator did not stop within 15s")
	}
}

// startOperator starts the manager, the bridge, the embedded broker and the
// reconciler with internal/operator, as cmd/manager does.
func startOperator(ctx context.Context, restCfg *rest.Config, cfg config) (*operator, error) {
	progress("starting the operator (manager + embedded broker, %d reconcilers)", cfg.workers)
	mo, err := cfg.writePath.managerOptions(ctrl.Options{
		Scheme:                 scheme,
		MapperProvider:         kubetwin.NewRESTMapper, // as cmd/manager
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		// bench-scale starts the operator again in this process (restart).
		Controller: ctrlconfig.Controller{SkipNameValidation: ptr.To(true)},
	}, restCfg)
	if err != nil {
		return nil, fmt.Errorf("manager options: %w", err)
	}
	mgr, err := ctrl.NewManager(rest.CopyConfig(restCfg), mo)
	if err != nil {
		return nil, fmt.Errorf("manager: %w", err)
	}
	if cfg.onManager != nil {
		if err := cfg.onManager(mgr); err != nil {
			return nil, err
		}
	}
	ttl := cfg.idleStateTTL
	if ttl == 0 { // as cmd/manager: 0 keeps idle state
		ttl = bridge.KeepIdleState
	}
	br := kubetwin.NewBridge(mgr, kubetwin.BridgeOptions{IdleStateTTL: ttl})
	eo := bus.EmbeddedOptions{
		Listen: "127.0.0.1:0", Handler: br.Handle, Presence: br.Presence, Logger: ctrl.Log.WithName("broker"),
		Limits: bus.EmbeddedLimits{MaxConnectionsPerIP: cfg.brokerConnsPerIP},
	}
	var auth *deviceauth.Authenticator
	if cfg.deviceKeys { // as cmd/manager's newAuthenticator
		auth = &deviceauth.Authenticator{HubHostname: serviceHub,
			Lookup: controllers.DeviceLookup(kubetwin.Resolver(mgr, kubetwin.DefaultClaimsNamespace))}
		eo.Auth = auth
	}
	emb, err := bus.NewEmbedded(eo)
	if err != nil {
		return nil, fmt.Errorf("broker: %w", err)
	}
	var creds *controllers.Credentials
	if auth != nil { // as cmd/manager's setupCredentials with the embedded broker
		creds = &controllers.Credentials{HubHostname: serviceHub, Provisioner: deviceauth.EmbeddedProvisioner{Broker: emb, Auth: auth}}
	}
	if err := kubetwin.AddBus(mgr, br, emb); err != nil {
		return nil, err
	}
	mctx, cancel := context.WithCancel(ctx)
	if err := kubetwin.AddReconciler(mctx, mgr, br, kubetwin.ReconcilerOptions{Workers: cfg.workers, Credentials: creds}); err != nil {
		cancel()
		return nil, err
	}
	op := &operator{cancel: cancel, done: make(chan error, 1)}
	if cfg.serviceTwins > 0 {
		if op.service, err = addServiceAPI(ctx, mgr, cfg); err != nil {
			cancel()
			return nil, fmt.Errorf("service API: %w", err)
		}
	}
	// The manager starts the broker once its caches have synced: at fleet
	// size that takes longer than a minute on a busy machine.
	syncTimeout := 60 * time.Second
	if cfg.cacheSyncTimeout > 0 {
		syncTimeout = cfg.cacheSyncTimeout
	}
	go func() { op.done <- mgr.Start(mctx) }()
	select {
	case <-emb.Ready():
	case err := <-op.done:
		cancel()
		return nil, fmt.Errorf("manager stopped: %w", err)
	case <-time.After(syncTimeout):
		op.stop()
		return nil, fmt.Errorf("embedded broker did not start within %s", syncTimeout)
	}
	syncCtx, syncCancel := context.WithTimeout(ctx, syncTimeout)
	defer syncCancel()
	if !mgr.GetCache().WaitForCacheSync(syncCtx) {
		op.stop()
		return nil, fmt.Errorf("the operator's cache did not sync within %s", syncTimeout)
	}
	op.brokerURL = "tcp://" + emb.Addr()
	progress("operator running; embedded broker at %s", op.brokerURL)
	if op.service != nil {
		select {
		case <-op.service.srv.Ready():
		case <-time.After(60 * time.Second):
			op.stop()
			return nil, errors.New("the service API did not listen within 60s")
		}
		op.service.baseURL = "https://" + op.service.srv.Addr()
		progress("service API at %s (hub %s)", op.service.baseURL, serviceHub)
	}
	return op, nil
}

// waitClaims waits until the operator has claimed the device ids of n
// twins (of the device and service phases) in the claims namespace.
func waitClaims(ctx context.Context, k8s client.Client, n int) error {
	progress("waiting for the operator to claim %d device ids", n)
	start := time.Now()
	deadline := start.Add(2 * time.Minute)
	for {
		var claims v1alpha1.DeviceIDClaimList
		if err := k8s.List(ctx, &claims, client.InNamespace(kubetwin.DefaultClaimsNamespace)); err != nil {
			return err
		}
		got := 0
		for _, c := range claims.Items {
			if ns := c.Spec.Twin.Namespace; ns == devicesNS || ns == serviceNS {
				got++
			}
		}
		if got >= n {
			progress("  %d device ids claimed in %.1fs", got, time.Since(start).Seconds())
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d of %d device ids claimed after %s", got, n, time.Since(start).Round(time.Second))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// statusWrites returns the operator's successful and failed status patches so far.
func statusWrites() (ok, failed int64) {
	return int64(counterValue(bridge.StatusWrites.WithLabelValues("ok"))),
		int64(counterValue(bridge.StatusWrites.WithLabelValues("error")))
}

// waitQuiet waits until the operator has written the status of every twin
// once and stopped writing (initial reconciles and presence), so the report
// phase counts only what reports cause.
func waitQuiet(ctx context.Context, k8s client.Client) {
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
