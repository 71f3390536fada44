package main

// --ab: the operator's write path, variant against variant, on one control
// plane and the same twins. Each variant is measured in turn (rounds
// interleave them, so a busy spell of the machine hits both): the
// distinct-twin capacity (every device keeps one report outstanding, so
// each write stores one report of a different twin), then report latency
// at 50% and 80% of that capacity.

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	kubetwin "github.com/kubetwin/kubetwin/internal/operator"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/internal/watchdecode"
)

// writePath is a variant of the operator's write path.
type writePath struct {
	// legacyStatus makes status granular for server-side apply again (the
	// CRD without x-kubernetes-map-type: atomic on status), as before.
	legacyStatus bool
	// keepStatusFields keeps the status managedFields in the operator's
	// cache (no cache transform), as before.
	keepStatusFields bool
	// writeConn gives the operator's writes an HTTP connection of their
	// own, apart from the informers' watches.
	writeConn bool
	// clientGoWatch decodes the twin and claim watches with client-go's
	// decoder (--watch-decoder=client-go), as before.
	clientGoWatch bool
	// namespace, if set, is the only namespace of twins the operator
	// caches (--ab gives each run fresh twins in a namespace of its own).
	namespace string
}

// writePathOptions are the words of --ab variants.
var writePathOptions = map[string]func(*writePath){
	"legacy-status":      func(w *writePath) { w.legacyStatus = true },
	"keep-status-fields": func(w *writePath) { w.keepStatusFields = true },
	"write-conn":         func(w *writePath) { w.writeConn = true },
	"client-go-watch":    func(w *writePath) { w.clientGoWatch = true },
}

// oldWritePath is the write path before issue 14.
const oldWritePath = "legacy-status+keep-status-fields+client-go-watch"

// parseWritePath parses "current" or option+option+... ("old" is
// oldWritePath).
func parseWritePath(s string) (writePath, error) {
	var w writePath
	switch s {
	case "current", "":
		return w, nil
	case "old":
		s = oldWritePath
	}
	for _, o := range strings.Split(s, "+") {
		set, ok := writePathOptions[o]
		if !ok {
			var names []string
			for k := range writePathOptions {
				names = append(names, k)
			}
			slices.Sort(names)
			return w, fmt.Errorf("unknown write path option %q (want current, old, or options joined by +: %s)", o, strings.Join(names, ", "))
		}
		set(&w)
	}
	return w, nil
}

// abRun is one variant's measurements in one round.
type abRun struct {
	Variant string `json:"variant"`
	Round   int    `json:"round"`
	// Capacity: every device keeps one report outstanding.
	CapReportsPerSec  float64               `json:"capacity_reports_per_sec"`
	CapWritesPerSec   float64               `json:"capacity_status_writes_per_sec"`
	CapReportsPerWr   float64               `json:"capacity_reports_per_write"`
	CapAPIMsPerWrite  float64               `json:"capacity_apiserver_cpu_ms_per_write"`
	CapAPICores       float64               `json:"capacity_apiserver_cores"`
	CapOperatorCores  float64               `json:"capacity_operator_cores"`
	CapP50Ms          float64               `json:"capacity_latency_p50_ms"`
	CapP99Ms          float64               `json:"capacity_latency_p99_ms"`
	CapQueue          map[string]queueTimes `json:"capacity_operator_times"`
	ObjectBytes       int                   `json:"twin_object_bytes"`
	ManagedFieldBytes int                   `json:"twin_managed_fields_bytes"`
	// The operator's writes replayed on the twins with the operator
	// stopped (--ab-replay).
	ReplayWritesPerSec  float64 `json:"replay_writes_per_sec"`
	ReplayAPIMsPerWrite float64 `json:"replay_apiserver_cpu_ms_per_write"`
	// At 50% and 80% of this run's capacity.
	Lat []abLatency `json:"latency"`
	// Checks.
	Mismatches int     `json:"mismatches"`
	Errors     int64   `json:"report_errors"`
	LoadAvg    string  `json:"loadavg"`
	OtherCores float64 `json:"other_cores"`
}

type abLatency struct {
	Fraction      float64               `json:"fraction"`
	OfferedPerSec float64               `json:"offered_per_sec"`
	StoredPerSec  float64               `json:"stored_per_sec"`
	P50Ms         float64               `json:"p50_ms"`
	P99Ms         float64               `json:"p99_ms"`
	MaxMs         float64               `json:"max_ms"`
	Errors        int64                 `json:"errors"`
	Queue         map[string]queueTimes `json:"operator_times"`
	// The baseline (--ab-raw): the same rate of the operator's status
	// patch sent straight to the API server, open loop, operator stopped.
	Raw *rawLatency `json:"raw,omitempty"`
}

// runAB is the whole --ab benchmark.
func runAB(ctx context.Context, cfg config) int {
	cfg.serviceTwins = 0 // no service API: only the devices write
	// client-go's request and rate-limiter timings (opt-in), to split a
	// status write's time into the client's share and the API server's.
	ctrlmetrics.RegisterRESTClientMetricsWithOptions(ctrlmetrics.RESTClientMetricsOptions{
		DurationBuckets: prometheus.ExponentialBuckets(0.001, 2, 15),
	}, ctrlmetrics.MetricRequestLatency, ctrlmetrics.MetricRateLimiterLatency)
	opLog := &lineLog{prefix: "[operator] ", limit: int64(cfg.operatorLogLimit), out: os.Stderr}
	// BENCH_CONTROLPLANE_GOGC sets GOGC for kube-apiserver and etcd only
	// (they inherit this process's environment when started; this process
	// and the device process read GOGC at their own start): how much of
	// the latency near capacity is the API server's garbage collector.
	restoreGOGC := func() {}
	if v := os.Getenv("BENCH_CONTROLPLANE_GOGC"); v != "" {
		progress("ab: kube-apiserver and etcd run with GOGC=%s", v)
		prev, had := os.LookupEnv("GOGC")
		os.Setenv("GOGC", v)
		restoreGOGC = func() {
			if had {
				os.Setenv("GOGC", prev)
			} else {
				os.Unsetenv("GOGC")
			}
		}
	}
	cp, err := startControlPlane(ctx, &cfg, opLog)
	restoreGOGC()
	if err != nil {
		return fail("starting the control plane", err)
	}
	defer cp.stop()
	var runs []abRun
	code := 0
	for round := 1; round <= cfg.abRounds; round++ {
		for _, name := range cfg.abVariants {
			w, _ := parseWritePath(name) // checked by parseFlags
			w.namespace = fmt.Sprintf("bench-ab-%d", len(runs)+1)
			r, err := abVariant(ctx, cp, cfg, name, w)
			if err != nil {
				return fail("variant "+name, err)
			}
			r.Round = round
			runs = append(runs, r)
			if r.Mismatches > 0 {
				code = 1
			}
		}
	}
	printAB(cfg, runs)
	if code != 0 {
		progress("FAIL: some twins do not hold their device's last acknowledged report")
	}
	return code
}

// abVariant measures one variant on fresh twins (so no managedFields entry
// of another variant stays): status shape set in the CRD, the twins
// created, the operator started with the variant, then the measurements.
func abVariant(ctx context.Context, cp *controlPlane, cfg config, name string, w writePath) (abRun, error) {
	r := abRun{Variant: name, LoadAvg: loadAvg()}
	progress("ab: variant %s (%+v)", name, w)
	if err := cp.k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: w.namespace}}); err != nil {
		return r, err
	}
	if err := setStatusShape(ctx, cp.k8s, w.namespace, !w.legacyStatus); err != nil {
		return r, err
	}
	if err := createTwins(ctx, cp.k8s, w.namespace, w.prefix(), cfg.devices, "device twins"); err != nil {
		return r, err
	}
	cfg.writePath = w
	op, err := startOperator(ctx, cp.restCfg, cfg)
	if err != nil {
		return r, err
	}
	defer op.stop()
	if err := waitClaimsIn(ctx, cp.k8s, w.namespace, cfg.devices); err != nil {
		return r, err
	}

	// Capacity.
	capCfg := cfg
	capCfg.warmup = cfg.abCapWarmup
	capRes, sum, err := abMeasure(ctx, cp, op, capCfg, w, 0, 1)
	if err != nil {
		return r, fmt.Errorf("capacity: %w", err)
	}
	res := results{Devices: cfg.devices}
	if err := verifyIn(ctx, cp.k8s, w.namespace, sum, &res); err != nil {
		return r, err
	}
	// (Version gaps are expected: the twins' versions go on from the
	// previous measurement, the device process starts at 1.)
	r.Mismatches += res.Mismatches + res.VersionMismatches
	r.ObjectBytes = res.DeviceObjBytes
	r.ManagedFieldBytes = managedFieldsBytes(ctx, cp.k8s, w.namespace, twinName(w.prefix(), 0))
	r.CapReportsPerSec, r.CapWritesPerSec, r.CapReportsPerWr = capRes.ReportsPerSec, capRes.WritesPerSec, capRes.ReportsPerWrite
	r.CapAPIMsPerWrite, r.CapP50Ms, r.CapP99Ms = capRes.APIMsPerWriteReports, capRes.ReportLatencyP50Ms, capRes.ReportLatencyP99Ms
	r.CapAPICores, r.CapOperatorCores, r.OtherCores = capRes.CPUReports["kube_apiserver"], capRes.CPUReports["operator"], capRes.CPUReports["other"]
	r.Errors += capRes.ReportErrors
	r.CapQueue = capRes.queue
	progress("ab: %s capacity %.0f reports/s (%.0f writes/s, %.2f reports per write, kube-apiserver %.2f ms per write), twin %d bytes (managedFields %d)",
		name, r.CapReportsPerSec, r.CapWritesPerSec, r.CapReportsPerWr, r.CapAPIMsPerWrite, r.ObjectBytes, r.ManagedFieldBytes)

	for _, f := range cfg.abFractions {
		offered := f * r.CapReportsPerSec
		rate := offered / float64(cfg.devices)
		inflight := max(1, int(rate*cfg.requestTimeout.Seconds()+0.999))
		latCfg := cfg
		latCfg.warmup, latCfg.duration = cfg.abLatWarmup, cfg.abLatWindow
		lr, sum, err := abMeasure(ctx, cp, op, latCfg, w, rate, inflight)
		if err != nil {
			return r, fmt.Errorf("latency at %.0f%%: %w", 100*f, err)
		}
		// At these rates many devices send nothing in a window: their twin
		// rightly holds the previous measurement's report, so only the
		// devices with a report acknowledged in this one are checked.
		var acked []devSummary
		for _, d := range sum.Devices {
			if d.Ver > 0 {
				acked = append(acked, d)
			}
		}
		sum.Devices = acked
		res := results{Devices: len(acked)}
		if err := verifyIn(ctx, cp.k8s, w.namespace, sum, &res); err != nil {
			return r, err
		}
		r.Mismatches += res.Mismatches + res.VersionMismatches
		r.Errors += lr.ReportErrors
		r.Lat = append(r.Lat, abLatency{Fraction: f, OfferedPerSec: offered, StoredPerSec: lr.ReportsPerSec,
			P50Ms: lr.ReportLatencyP50Ms, P99Ms: lr.ReportLatencyP99Ms, MaxMs: lr.ReportLatencyMaxMs, Errors: lr.ReportErrors,
			Queue: lr.queue})
		progress("ab: %s at %.0f%% (%.0f/s offered): stored %.0f/s, p50 %.1f ms, p99 %.1f ms",
			name, 100*f, offered, lr.ReportsPerSec, lr.ReportLatencyP50Ms, lr.ReportLatencyP99Ms)
	}
	// The API server alone: with the operator stopped, the status patches
	// it sends for one report each, under its field manager, on the
	// variant's twins; nothing else of this process takes CPU meanwhile.
	op.stop()
	if cfg.abRaw {
		for i := range r.Lat {
			rawCfg := cfg
			rawCfg.warmup, rawCfg.duration = cfg.abLatWarmup, cfg.abLatWindow
			raw, err := abRawLatency(ctx, cp.k8s, rawCfg, w, r.Lat[i].OfferedPerSec)
			if err != nil {
				return r, fmt.Errorf("raw latency: %w", err)
			}
			r.Lat[i].Raw = &raw
		}
	}
	if cfg.abReplay > 0 {
		rate, ms, err := abReplay(ctx, cp.k8s, cfg, w)
		if err != nil {
			return r, fmt.Errorf("replay: %w", err)
		}
		r.ReplayWritesPerSec, r.ReplayAPIMsPerWrite = rate, ms
	}
	return r, nil
}

// rawLatency is the API server's own latency for status patches offered
// at a fixed rate.
type rawLatency struct {
	OfferedPerSec float64 `json:"offered_per_sec"`
	DonePerSec    float64 `json:"done_per_sec"`
	P50Ms         float64 `json:"p50_ms"`
	P99Ms         float64 `json:"p99_ms"`
	MaxMs         float64 `json:"max_ms"`
	Errors        int64   `json:"errors"`
	// Skipped: patches due while rawMaxInflight were outstanding.
	Skipped int64 `json:"skipped"`
	// WorstSecond is the window second (from its start) in which the
	// slowest patches started, and their max there.
	WorstSecond   int     `json:"worst_second"`
	WorstSecondMs float64 `json:"worst_second_max_ms"`
}

// rawMaxInflight bounds the raw patches outstanding (a stalled API server
// must not grow the benchmark's goroutines without bound).
const rawMaxInflight = 512

// abRawLatency sends the operator's status patch for one report (as
// abReplay), open loop at rate patches/s spread over the variant's twins,
// for cfg.warmup + cfg.duration, and measures the latency of the patches
// started in the window: what a report's write costs at that load without
// the operator, its work queue and the devices. The gap between this and
// the operator's report latency at the same rate is the operator's.
func abRawLatency(ctx context.Context, k8s client.Client, cfg config, w writePath, rate float64) (rawLatency, error) {
	res := rawLatency{OfferedPerSec: rate}
	progress("ab: raw status patches, %.0f/s offered open loop, operator stopped (%s warm-up + %s)", rate, cfg.warmup, cfg.duration)
	type sample struct {
		at  time.Duration // start, from the window's start
		lat time.Duration
	}
	var mu sync.Mutex
	var samples []sample
	var failed, skipped atomic.Int64
	var firstErr atomic.Value
	var inflight atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	winStart := start.Add(cfg.warmup)
	end := winStart.Add(cfg.duration)
	interval := time.Duration(float64(time.Second) / rate)
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for n := int64(2_000_000); ; n++ {
		now := time.Now()
		if !now.Before(end) || ctx.Err() != nil {
			break
		}
		if inflight.Load() >= rawMaxInflight {
			if !now.Before(winStart) {
				skipped.Add(1)
			}
		} else {
			inflight.Add(1)
			wg.Add(1)
			go func(n int64, began time.Time) {
				defer wg.Done()
				defer inflight.Add(-1)
				t := &v1alpha1.DeviceTwin{}
				t.Namespace, t.Name = w.namespace, twinName(w.prefix(), int(n%int64(cfg.devices)))
				body := replayPatch(n, began.UTC())
				err := k8s.Status().Patch(ctx, t, client.RawPatch(types.MergePatchType, body), client.FieldOwner(controllers.StatusManager))
				lat := time.Since(began)
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
					return
				}
				if !began.Before(winStart) {
					mu.Lock()
					samples = append(samples, sample{at: began.Sub(winStart), lat: lat})
					mu.Unlock()
				}
			}(n, now)
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
		}
	}
	wg.Wait()
	res.Errors, res.Skipped = failed.Load(), skipped.Load()
	if len(samples) == 0 {
		return res, fmt.Errorf("no raw patch succeeded: %v", firstErr.Load())
	}
	res.DonePerSec = float64(len(samples)) / cfg.duration.Seconds()
	lats := make([]time.Duration, len(samples))
	worst := map[int]time.Duration{}
	for i, s := range samples {
		lats[i] = s.lat
		sec := int(s.at / time.Second)
		worst[sec] = max(worst[sec], s.lat)
	}
	slices.Sort(lats)
	ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
	res.P50Ms = ms(lats[len(lats)/2])
	res.P99Ms = ms(lats[min(len(lats)-1, len(lats)*99/100)])
	res.MaxMs = ms(lats[len(lats)-1])
	for sec, d := range worst {
		if ms(d) > res.WorstSecondMs {
			res.WorstSecond, res.WorstSecondMs = sec, ms(d)
		}
	}
	progress("ab: raw at %.0f/s: %.0f/s done, p50 %.1f ms, p99 %.1f ms, max %.1f ms (slowest in second %d of the window), %d failed, %d skipped",
		rate, res.DonePerSec, res.P50Ms, res.P99Ms, res.MaxMs, res.WorstSecond, res.Errors, res.Skipped)
	return res, nil
}

// replayPatch is the merge patch the operator sends for report n of a
// connected twin at now: reported, its version and $metadata, and
// lastActivityTime.
func replayPatch(n int64, now time.Time) []byte {
	ts := now.Format(twin.TimeFormat)
	return []byte(fmt.Sprintf(`{"status":{"reported":{"seq":%d,"t":"%d"},"reportedVersion":%d,"metadata":{"reported":{"$lastUpdated":%q,"seq":{"$lastUpdated":%q},"t":{"$lastUpdated":%q}}},"lastActivityTime":%q}}`,
		n, now.UnixNano(), n, ts, ts, ts, now.Truncate(time.Second).Format(time.RFC3339)))
}

// abReplay sends, 32 at a time for cfg.abReplay, the merge patch the
// operator sends for one report on a connected twin (reported, its
// version and $metadata, lastActivityTime), as the operator's status
// field manager, and returns writes/s and kube-apiserver CPU ms per write.
func abReplay(ctx context.Context, k8s client.Client, cfg config, w writePath) (float64, float64, error) {
	const inflight = 32
	progress("ab: replaying the operator's status writes for %s, %d in flight", cfg.abReplay, inflight)
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	c0 := sampleCPU()
	start := time.Now()
	deadline := start.Add(cfg.abReplay)
	for g := 0; g < inflight; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i, n := g, int64(1_000_000); time.Now().Before(deadline) && ctx.Err() == nil; i, n = (i+inflight)%cfg.devices, n+1 {
				t := &v1alpha1.DeviceTwin{}
				t.Namespace, t.Name = w.namespace, twinName(w.prefix(), i)
				err := k8s.Status().Patch(ctx, t, client.RawPatch(types.MergePatchType, replayPatch(n, time.Now().UTC())), client.FieldOwner(controllers.StatusManager))
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
					continue
				}
				ok.Add(1)
			}
		}()
	}
	wg.Wait()
	el := time.Since(start).Seconds()
	cores := coresBetween(c0, sampleCPU())
	if ok.Load() == 0 {
		return 0, 0, fmt.Errorf("no replayed write succeeded: %v", firstErr.Load())
	}
	rate := float64(ok.Load()) / el
	ms := apiMsPerWrite(cores, rate)
	progress("ab: replay: %.0f writes/s (%d failed), kube-apiserver %.2f ms per write; CPU cores: %s", rate, failed.Load(), ms, coresString(cores))
	return rate, ms, nil
}

// abMeasure connects the devices (a device process of its own), waits for
// the presence writes to settle and runs one report window.
func abMeasure(ctx context.Context, cp *controlPlane, op *operator, cfg config, w writePath, rate float64, inflight int) (results, reportSummary, error) {
	var res results
	dp, err := startDeviceProc(childConfig{
		BrokerURL: op.brokerURL, Devices: cfg.devices, Prefix: w.prefix(), ConnectParallel: cfg.connectParallel,
		RequestTimeout: cfg.requestTimeout, Rate: rate, Inflight: inflight,
		Warmup: cfg.warmup, Duration: cfg.duration, DrainTimeout: cfg.drainTimeout,
		DeviceLogLimit: cfg.deviceLogLimit, StartUnixNano: benchStart.UnixNano(),
	})
	if err != nil {
		return res, reportSummary{}, err
	}
	devicePID.Store(int64(dp.cmd.Process.Pid))
	defer dp.shutdown()
	var connected childMsg
	if err := dp.next(ctx, msgConnected, 10*time.Minute, &connected); err != nil {
		return res, reportSummary{}, fmt.Errorf("connecting the devices: %w", err)
	}
	waitQuiet(ctx, cp.k8s)
	rcfg := cfg
	rcfg.rate, rcfg.inflight = rate, inflight
	if cfg.apiProfile != "" {
		// PREFIX.<namespace>-<rate>.reports.pprof: one per window.
		rcfg.apiProfile = fmt.Sprintf("%s.%s-%g", cfg.apiProfile, w.namespace, rate)
	}
	q0 := sampleQueue(cp.restCfg)
	sum, err := runReportsPhase(ctx, dp, rcfg, &res)
	// (The window includes the drain: the queue empties before the
	// device process answers.)
	res.queue = queueBetween(q0, sampleQueue(cp.restCfg))
	progress("ab: operator: %s", queueString(res.queue))
	return res, sum, err
}

var crdGVK = schema.GroupVersionKind{Group: "apiextensions.k8s.io", Version: "v1", Kind: "CustomResourceDefinition"}

// setStatusShape makes DeviceTwin status atomic (x-kubernetes-map-type)
// or granular in the installed CRD and waits until the API server tracks
// status writes that way.
func setStatusShape(ctx context.Context, k8s client.Client, ns string, atomic bool) error {
	crd := &unstructured.Unstructured{}
	crd.SetGroupVersionKind(crdGVK)
	if err := k8s.Get(ctx, client.ObjectKey{Name: "devicetwins.kubetwin.io"}, crd); err != nil {
		return err
	}
	versions, _, _ := unstructured.NestedSlice(crd.Object, "spec", "versions")
	if len(versions) != 1 {
		return fmt.Errorf("the DeviceTwin CRD has %d versions, want 1", len(versions))
	}
	path := []string{"schema", "openAPIV3Schema", "properties", "status", "x-kubernetes-map-type"}
	v := versions[0].(map[string]any)
	if atomic {
		if err := unstructured.SetNestedField(v, "atomic", path...); err != nil {
			return err
		}
	} else {
		unstructured.RemoveNestedField(v, path...)
	}
	if err := unstructured.SetNestedSlice(crd.Object, versions, "spec", "versions"); err != nil {
		return err
	}
	if err := k8s.Update(ctx, crd); err != nil {
		return fmt.Errorf("updating the DeviceTwin CRD: %w", err)
	}
	// A probe twin (no operator runs now) shows when the API server
	// serves the new schema: its status entry is {"f:status":{}} only
	// when status is atomic.
	probe := &v1alpha1.DeviceTwin{}
	probe.Namespace, probe.Name = ns, "ab-probe"
	if err := k8s.Create(ctx, probe); err != nil && !apierrors.IsAlreadyExists(err) {
		return err
	}
	defer func() { _ = k8s.Delete(context.Background(), probe) }()
	deadline := time.Now().Add(60 * time.Second)
	for n := 0; ; n++ {
		body := fmt.Sprintf(`{"status":{"reported":{"probe":%d}}}`, n)
		if err := k8s.Status().Patch(ctx, probe, client.RawPatch(types.MergePatchType, []byte(body)), client.FieldOwner("ab-probe")); err != nil {
			return err
		}
		for _, mf := range probe.ManagedFields {
			if mf.Manager == "ab-probe" && mf.FieldsV1 != nil && (mf.FieldsV1.GetRawString() == `{"f:status":{}}`) == atomic {
				progress("ab: status is atomic=%v in the CRD", atomic)
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the API server does not track status as atomic=%v 60s after the CRD update", atomic)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// managedFieldsBytes is the JSON size of a twin's managedFields.
func managedFieldsBytes(ctx context.Context, k8s client.Client, ns, name string) int {
	t := &v1alpha1.DeviceTwin{}
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: name}, t); err != nil {
		return -1
	}
	b, _ := json.Marshal(t.ManagedFields)
	progress("ab: managedFields of %s: %s", t.Name, b)
	return len(b)
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// printAB prints each run and each variant's ratios to the first
// variant of the same round.
func printAB(cfg config, runs []abRun) {
	w := os.Stdout
	fmt.Fprintf(w, "\nkubetwin bench --ab: %d twins/devices, capacity window %s, latency windows %s, %d reconcilers\n", cfg.devices, cfg.duration, cfg.abLatWindow, cfg.workers)
	fmt.Fprintf(w, "  %-34s %5s %9s %9s %7s %8s %7s %7s %9s %7s", "variant", "round", "reports/s", "writes/s", "ms/wr", "twin B", "mf B", "vs 1st", "replay/s", "ms/wr")
	for _, f := range cfg.abFractions {
		fmt.Fprintf(w, "  %3.0f%%: p50/p99 ms (stored/s)", 100*f)
	}
	fmt.Fprintf(w, "  loadavg\n")
	first := map[int]abRun{}
	for _, r := range runs {
		if _, ok := first[r.Round]; !ok {
			first[r.Round] = r
		}
		ratio := 0.0
		if b := first[r.Round].CapReportsPerSec; b > 0 {
			ratio = r.CapReportsPerSec / b
		}
		fmt.Fprintf(w, "  %-34s %5d %9.0f %9.0f %7.2f %8d %7d %6.2fx %9.0f %7.2f", r.Variant, r.Round, r.CapReportsPerSec, r.CapWritesPerSec,
			r.CapAPIMsPerWrite, r.ObjectBytes, r.ManagedFieldBytes, ratio, r.ReplayWritesPerSec, r.ReplayAPIMsPerWrite)
		for _, l := range r.Lat {
			fmt.Fprintf(w, "  %8.1f / %7.1f (%5.0f)", l.P50Ms, l.P99Ms, l.StoredPerSec)
		}
		fmt.Fprintf(w, "  %s\n", r.LoadAvg)
		if len(r.Lat) > 0 && r.Lat[0].Raw != nil {
			fmt.Fprintf(w, "  %-34s %5s %9s %9s %7s %8s %7s %7s %9s %7s", "  raw patches, operator stopped", "", "", "", "", "", "", "", "", "")
			for _, l := range r.Lat {
				if l.Raw != nil {
					fmt.Fprintf(w, "  %8.1f / %7.1f (%5.0f)", l.Raw.P50Ms, l.Raw.P99Ms, l.Raw.DonePerSec)
				}
			}
			fmt.Fprintln(w)
		}
	}
	raw, _ := json.Marshal(runs)
	fmt.Fprintln(w, string(raw))
}

// managerOptions sets the variant's cache transform, namespace and watch
// decoder on o.
func (w writePath) managerOptions(o ctrl.Options, restCfg *rest.Config) (ctrl.Options, error) {
	if !w.keepStatusFields {
		o.Cache.DefaultTransform = kubetwin.CacheTransform
	}
	// Claims are cached as cmd/manager caches them (deviceid.CacheTransform).
	claims := cache.ByObject{Transform: deviceid.CacheTransform}
	claimsNS := ""
	if w.namespace != "" {
		o.Cache.DefaultNamespaces = map[string]cache.Config{w.namespace: {}}
		claimsNS = kubetwin.DefaultClaimsNamespace
		claims.Namespaces = map[string]cache.Config{claimsNS: {}}
	}
	o.Cache.ByObject = map[client.Object]cache.ByObject{&v1alpha1.DeviceIDClaim{}: claims}
	if !w.clientGoWatch { // as cmd/manager's default, --watch-decoder=one-pass
		f, err := watchdecode.NewInformer(restCfg,
			watchdecode.Watched{Object: &v1alpha1.DeviceTwin{}, Resource: "devicetwins", Namespace: w.namespace},
			watchdecode.Watched{Object: &v1alpha1.DeviceIDClaim{}, Resource: "deviceidclaims", Namespace: claimsNS})
		if err != nil {
			return o, err
		}
		o.Cache.NewInformer = f
	}
	if w.writeConn {
		o.NewClient = func(cfg *rest.Config, opts client.Options) (client.Client, error) {
			// A Proxy function makes client-go build a transport of its
			// own (it cannot compare functions to share a cached one).
			wc := rest.CopyConfig(cfg)
			wc.Proxy = http.ProxyFromEnvironment
			hc, err := rest.HTTPClientFor(wc)
			if err != nil {
				return nil, err
			}
			opts.HTTPClient = hc
			return client.New(wc, opts)
		}
	}
	return o, nil
}

// prefix is the name prefix (and device id prefix) of the variant's twins.
func (w writePath) prefix() string {
	if w.namespace == "" {
		return "dev-"
	}
	return strings.TrimPrefix(w.namespace, "bench-") + "-"
}

// waitClaimsIn waits until the operator has claimed n device ids of
// twins in ns.
func waitClaimsIn(ctx context.Context, k8s client.Client, ns string, n int) error {
	start := time.Now()
	for {
		var claims v1alpha1.DeviceIDClaimList
		if err := k8s.List(ctx, &claims, client.InNamespace(kubetwin.DefaultClaimsNamespace)); err != nil {
			return err
		}
		got := 0
		for _, c := range claims.Items {
			if c.Spec.Twin.Namespace == ns {
				got++
			}
		}
		if got >= n {
			progress("  %d device ids claimed in %.1fs", got, time.Since(start).Seconds())
			return nil
		}
		if time.Since(start) > 2*time.Minute {
			return fmt.Errorf("%d of %d device ids of namespace %s claimed after 2m", got, n, ns)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}
