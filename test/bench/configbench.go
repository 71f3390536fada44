package main

// Configuration mode (--config-twins N, make bench-config): one
// TwinConfiguration targeting N twins, each with a connected device that
// reports its desired properties back (cmd/device-sim --apply-desired, a
// process), while --config-other-devices other devices (the bench's device
// process) report at --config-other-rate each. It measures the time from
// the configuration's creation until every targeted twin has the content
// in spec (status.appliedCount = N) and until every device has reported it
// back (status.inSyncCount = N), the API server's writes per targeted twin
// (apiserver_request_total: the configuration's applies should be one per
// twin), and the other devices' report latency in a window without the
// rollout and in one during it.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// configNS holds the configuration mode's twins and its configuration.
const configNS = "bench-config"

// configBenchConfig are the configuration mode's flags.
type configBenchConfig struct {
	twins       int
	others      int
	otherRate   float64
	warmup      time.Duration
	window      time.Duration
	quiet       time.Duration
	timeout     time.Duration
	parallel    int
	deviceSimIn string
}

func addConfigBenchFlags(fs interface {
	IntVar(*int, string, int, string)
	Float64Var(*float64, string, float64, string)
	DurationVar(*time.Duration, string, time.Duration, string)
	StringVar(*string, string, string, string)
}, c *configBenchConfig) {
	fs.IntVar(&c.twins, "config-twins", 0, "configuration mode (make bench-config): one TwinConfiguration over this many twins, each with a device that reports it back, instead of the phases above (0: off)")
	fs.IntVar(&c.others, "config-other-devices", 200, "configuration mode: devices outside the target reporting meanwhile (their latency is measured)")
	fs.Float64Var(&c.otherRate, "config-other-rate", 1, "configuration mode: reports/s of each other device")
	fs.DurationVar(&c.warmup, "config-warmup", 3*time.Second, "configuration mode: reporting before each latency window")
	fs.DurationVar(&c.window, "config-window", 20*time.Second, "configuration mode: length of each latency window (without, then during the rollout)")
	fs.DurationVar(&c.quiet, "config-quiet", 5*time.Second, "configuration mode: the operator has settled when it has written no status for this long")
	fs.DurationVar(&c.timeout, "config-timeout", 15*time.Minute, "configuration mode: longest wait for devices to connect and for the rollout")
	fs.IntVar(&c.parallel, "config-connect-parallel", 32, "configuration mode: targeted devices connecting at the same time")
	fs.StringVar(&c.deviceSimIn, "config-device-sim", "", "configuration mode: the device-sim binary (default: bin/device-sim of the repository, built if missing)")
}

// configResults are the configuration mode's numbers.
type configResults struct {
	Twins            int       `json:"config_twins"`
	OtherDevices     int       `json:"config_other_devices"`
	OtherRate        float64   `json:"config_other_rate"`
	Load             string    `json:"load_average"`
	ConnectSec       float64   `json:"targeted_devices_connect_sec"`
	AppliedSec       float64   `json:"all_applied_sec"`
	InSyncSec        float64   `json:"all_in_sync_sec"`
	Applied          int32     `json:"applied"`
	InSync           int32     `json:"in_sync"`
	APIWrites        apiWrites `json:"api_writes_during_rollout"`
	SpecWritesPerTwn float64   `json:"devicetwin_writes_per_targeted_twin"`
	StatusPerTwin    float64   `json:"devicetwin_status_writes_per_targeted_twin"`
	QuietP50Ms       float64   `json:"other_report_p50_ms_without_rollout"`
	QuietP99Ms       float64   `json:"other_report_p99_ms_without_rollout"`
	RolloutP50Ms     float64   `json:"other_report_p50_ms_during_rollout"`
	RolloutP99Ms     float64   `json:"other_report_p99_ms_during_rollout"`
	RolloutWinShare  float64   `json:"window_share_with_rollout_running"`
	OtherErrors      int64     `json:"other_report_errors"`
	CPURollout       string    `json:"cpu_rollout"`
	TotalSec         float64   `json:"total_sec"`
}

// configTwinName is targeted twin i; the other devices are dev-NNNN.
func configTwinName(i int) string { return twinName("cfg-", i) }

// runConfigBench is the configuration mode.
func runConfigBench(ctx context.Context, cfg config, cb configBenchConfig) int {
	res := &configResults{Twins: cb.twins, OtherDevices: cb.others, OtherRate: cb.otherRate}
	opLog := &lineLog{prefix: "[operator] ", limit: int64(cfg.operatorLogLimit), out: os.Stderr}
	cp, err := startControlPlane(ctx, &cfg, opLog, configNS)
	if err != nil {
		return fail("starting the control plane", err)
	}
	defer cp.stop()
	restCfg, k8s := cp.restCfg, cp.k8s

	// The fleet: targeted twins tagged fleet=cfg, the others fleet=other
	// (labels mirrored as the operator does, so the target pushes down).
	progress("config: creating %d targeted and %d other twins", cb.twins, cb.others)
	create := func(name, group string) error {
		t := &v1alpha1.DeviceTwin{}
		t.Namespace, t.Name, t.Labels = configNS, name, map[string]string{"fleet": group}
		t.Spec.Tags = &apiextensionsv1.JSON{Raw: []byte(`{"fleet":"` + group + `"}`)}
		return k8s.Create(ctx, t)
	}
	if err := forEachParallel(ctx, cb.twins, 32, func(i int) error { return create(configTwinName(i), "cfg") }); err != nil {
		return fail("creating the targeted twins", err)
	}
	if err := forEachParallel(ctx, cb.others, 32, func(i int) error { return create(twinName("dev-", i), "other") }); err != nil {
		return fail("creating the other twins", err)
	}

	cfg.serviceTwins = 0 // no service API
	cfg.brokerConnsPerIP = cb.twins + cb.others + 100
	cfg.cacheSyncTimeout = cb.timeout
	op, err := startOperator(ctx, restCfg, cfg)
	if err != nil {
		return fail("starting the operator", err)
	}
	defer op.stop()
	if _, err := waitClaimCount(ctx, k8s, cb.twins+cb.others, cb.timeout); err != nil {
		return fail("waiting for the device id claims", err)
	}

	// The targeted devices, reporting their desired properties back.
	sim, connected, err := startDeviceSim(ctx, cfg, cb, op.brokerURL)
	if err != nil {
		return fail("starting device-sim", err)
	}
	// The devices go before the operator, so they do not see it go.
	stopSim := sync.OnceFunc(func() {
		_ = sim.Process.Signal(os.Interrupt)
		_ = sim.Wait()
	})
	defer stopSim()
	t0 := time.Now()
	for connected.Load() < int64(cb.twins) {
		if time.Since(t0) > cb.timeout || ctx.Err() != nil {
			return fail("connecting the targeted devices", fmt.Errorf("%d of %d connected", connected.Load(), cb.twins))
		}
		time.Sleep(100 * time.Millisecond)
	}
	res.ConnectSec = time.Since(t0).Seconds()
	progress("config: %d targeted devices connected in %.1fs", cb.twins, res.ConnectSec)

	// The other devices (the bench's device process).
	dp, err := startDeviceProc(childConfig{
		BrokerURL: op.brokerURL, Devices: cb.others, ConnectParallel: cfg.connectParallel,
		RequestTimeout: cfg.requestTimeout, Rate: cb.otherRate, Inflight: max(1, int(cb.otherRate*cfg.requestTimeout.Seconds()+0.999)),
		Warmup: cb.warmup, Duration: cb.window, DrainTimeout: cfg.drainTimeout,
		DeviceLogLimit: cfg.deviceLogLimit, StartUnixNano: benchStart.UnixNano(),
	})
	if err != nil {
		return fail("starting the other devices", err)
	}
	devicePID.Store(int64(dp.cmd.Process.Pid))
	defer func() {
		stopSim()
		op.stop()
		_ = dp.shutdown()
	}()
	var msg childMsg
	if err := dp.next(ctx, msgConnected, cb.timeout, &msg); err != nil {
		return fail("connecting the other devices", err)
	}
	waitWritesQuiet(ctx, cb.quiet, cb.timeout)

	rcfg := cfg
	rcfg.devices, rcfg.rate, rcfg.warmup, rcfg.duration = cb.others, cb.otherRate, cb.warmup, cb.window
	rcfg.inflight = max(1, int(cb.otherRate*cfg.requestTimeout.Seconds()+0.999))
	var quiet results
	progress("config: latency window without the rollout")
	sumQ, err := runReportsPhase(ctx, dp, rcfg, &quiet)
	if err != nil {
		return fail("the window without the rollout", err)
	}
	res.QuietP50Ms, res.QuietP99Ms = sumQ.P50Ms, sumQ.P99Ms

	// The configuration, and the other devices' window during its rollout.
	api0, err := apiserverWrites(restCfg)
	if err != nil {
		return fail("reading the API server's metrics", err)
	}
	c0 := sampleCPU()
	tc := &v1alpha1.TwinConfiguration{}
	tc.Namespace, tc.Name = configNS, "bench-telemetry"
	tc.Spec.TargetCondition = "tags.fleet = 'cfg'"
	tc.Spec.Content.Desired = &apiextensionsv1.JSON{Raw: []byte(`{"telemetry":{"interval":30}}`)}
	if err := k8s.Create(ctx, tc); err != nil {
		return fail("creating the configuration", err)
	}
	start := time.Now()
	progress("config: configuration created; latency window during the rollout")
	type windowOut struct {
		sum reportSummary
		err error
		end time.Time
	}
	winDone := make(chan windowOut, 1)
	go func() {
		var during results
		s, err := runReportsPhase(ctx, dp, rcfg, &during)
		winDone <- windowOut{s, err, time.Now()}
	}()
	deadline := start.Add(cb.timeout)
	var last v1alpha1.TwinConfigurationStatus
	for res.InSyncSec == 0 {
		if time.Now().After(deadline) || ctx.Err() != nil {
			progress("config: the rollout did not finish within %s: targeted %d, applied %d, in sync %d of %d; conditions %+v",
				cb.timeout, last.TargetedCount, last.AppliedCount, last.InSyncCount, cb.twins, last.Conditions)
			break
		}
		got := &v1alpha1.TwinConfiguration{}
		if err := k8s.Get(ctx, client.ObjectKeyFromObject(tc), got); err != nil {
			return fail("reading the configuration", err)
		}
		st := got.Status
		if st.AppliedCount != last.AppliedCount || st.InSyncCount != last.InSyncCount {
			progress("  applied %d, in sync %d of %d (%.1fs)", st.AppliedCount, st.InSyncCount, cb.twins, time.Since(start).Seconds())
		}
		last = st
		if c := meta.FindStatusCondition(st.Conditions, v1alpha1.ConditionStalled); c != nil && c.Status == metav1.ConditionTrue {
			return fail("the rollout", fmt.Errorf("the configuration is stalled: %s: %s", c.Reason, c.Message))
		}
		if res.AppliedSec == 0 && st.AppliedCount >= int32(cb.twins) {
			res.AppliedSec = time.Since(start).Seconds()
		}
		if st.InSyncCount >= int32(cb.twins) {
			res.InSyncSec = time.Since(start).Seconds()
		}
		time.Sleep(200 * time.Millisecond)
	}
	done := time.Now()
	res.Applied, res.InSync = last.AppliedCount, last.InSyncCount
	res.CPURollout = coresString(coresBetween(c0, sampleCPU()))
	api1, err := apiserverWrites(restCfg)
	if err != nil {
		return fail("reading the API server's metrics", err)
	}
	res.APIWrites = api1.minus(api0)
	var spec, status float64
	for k, v := range res.APIWrites {
		switch {
		case strings.HasPrefix(k, "devicetwins/status "):
			status += v
		case strings.HasPrefix(k, "devicetwins "):
			spec += v
		}
	}
	res.SpecWritesPerTwn, res.StatusPerTwin = spec/float64(cb.twins), status/float64(cb.twins)
	w := <-winDone
	if w.err != nil {
		return fail("the window during the rollout", w.err)
	}
	res.RolloutP50Ms, res.RolloutP99Ms = w.sum.P50Ms, w.sum.P99Ms
	res.OtherErrors = sumQ.Errors + w.sum.Errors
	// The share of the measured window [start+warmup, end] the rollout ran in.
	winStart := start.Add(cb.warmup)
	if span := w.end.Sub(winStart).Seconds(); span > 0 {
		res.RolloutWinShare = min(1, max(0, done.Sub(winStart).Seconds()/span))
	}
	res.Load = configLoadAvg()
	res.TotalSec = time.Since(benchStart).Seconds()
	printConfigBench(res)
	if res.InSyncSec == 0 || res.OtherErrors > 0 {
		progress("FAIL: rollout finished %v, %d failed reports", res.InSyncSec > 0, res.OtherErrors)
		return 1
	}
	return 0
}

// startDeviceSim runs cmd/device-sim for the targeted twins and counts
// their connections from its output.
func startDeviceSim(ctx context.Context, cfg config, cb configBenchConfig, broker string) (*exec.Cmd, *atomic.Int64, error) {
	bin := cb.deviceSimIn
	if bin == "" {
		crds, err := findCRDs()
		if err != nil {
			return nil, nil, err
		}
		root := filepath.Dir(filepath.Dir(filepath.Dir(crds)))
		bin = filepath.Join(root, "bin", "device-sim")
		if _, err := os.Stat(bin); err != nil {
			goBin, err := exec.LookPath("go")
			if err != nil {
				return nil, nil, err
			}
			build := exec.CommandContext(ctx, goBin, "build", "-o", bin, "./cmd/device-sim")
			build.Dir = root
			if out, err := build.CombinedOutput(); err != nil {
				return nil, nil, fmt.Errorf("go build ./cmd/device-sim: %v\n%s", err, out)
			}
		}
	}
	cmd := exec.CommandContext(ctx, bin, "--count", fmt.Sprint(cb.twins), "--prefix", "cfg-", "--broker", broker,
		"--apply-desired", "--parallel", fmt.Sprint(cb.parallel), "--request-timeout", cfg.requestTimeout.String())
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, nil, err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	var connected atomic.Int64
	go func() {
		sc := bufio.NewScanner(out)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			if strings.Contains(sc.Text(), ": connected, desired v") {
				connected.Add(1)
			}
		}
	}()
	return cmd, &connected, nil
}

func printConfigBench(r *configResults) {
	w := os.Stdout
	row := func(name, value string) { fmt.Fprintf(w, "  %-52s %s\n", name, value) }
	fmt.Fprintln(w)
	fmt.Fprintln(w, "kubetwin bench: one TwinConfiguration")
	fmt.Fprintln(w, "  ----------------------------------------------------------------------")
	row("targeted twins (each with a device reporting it back)", fmt.Sprintf("%d (connected in %.1fs)", r.Twins, r.ConnectSec))
	row("content in every targeted twin's spec (appliedCount)", fmt.Sprintf("%.1fs after creation (%d applied)", r.AppliedSec, r.Applied))
	row("reported back by every device (inSyncCount)", fmt.Sprintf("%.1fs after creation (%d in sync)", r.InSyncSec, r.InSync))
	row("DeviceTwin writes per targeted twin (spec/labels)", fmt.Sprintf("%.2f", r.SpecWritesPerTwn))
	row("DeviceTwin status writes per targeted twin", fmt.Sprintf("%.2f  (device reports and presence; the other devices' too)", r.StatusPerTwin))
	row("API server writes during the rollout", r.APIWrites.String())
	row("CPU cores used during the rollout", r.CPURollout)
	row(fmt.Sprintf("other devices' reports (%d x %g/s) p50 / p99", r.OtherDevices, r.OtherRate),
		fmt.Sprintf("without the rollout %.1f / %.1f ms, during it %.1f / %.1f ms (rollout ran %.0f%% of that window)",
			r.QuietP50Ms, r.QuietP99Ms, r.RolloutP50Ms, r.RolloutP99Ms, 100*r.RolloutWinShare))
	row("load average", r.Load)
	row("total time", fmt.Sprintf("%.0fs", r.TotalSec))
	fmt.Fprintln(w)
	b, _ := json.Marshal(r)
	fmt.Fprintln(w, string(b))
}

// configLoadAvg is /proc/loadavg's 1, 5 and 15 minute averages.
func configLoadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
