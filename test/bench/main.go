// Command bench measures kubetwin in one run against a real control plane
// (envtest's kube-apiserver and etcd, from KUBEBUILDER_ASSETS) with the
// operator (manager, reconciler, bridge, embedded MQTT broker) running in
// this process, wired with internal/operator as cmd/manager wires it:
//
//	(a) baseline: the raw API-server rate of DeviceTwin status merge patches
//	    (status.reported changes), sent directly with 32 and 64 in flight to
//	    --twins twins before the operator starts (they are deleted before it
//	    does); the best rate is the baseline;
//	(b) reports: --devices simulated devices (pkg/device, one MQTT connection
//	    each, in a child process: see child.go) report {"seq": n, "t":
//	    "<unix nanos>"} at --rate per device per second with at most
//	    --inflight outstanding (--rate 0: --inflight outstanding all the
//	    time) for --duration after --warmup; it measures acknowledged (204)
//	    reports per second, the operator's status writes (the
//	    bridge.StatusWrites counter), reports per write and publish-to-204
//	    latency, then checks with a non-caching client that every twin's
//	    status.reported is exactly its device's last acknowledged report;
//	(c) desired: patches spec.desired ({"setpoint": k}) of --desired twins,
//	    --desired-parallel at a time, and measures the time from the patch
//	    call returning to the device's OnDesired callback with that version;
//	(d) queries (see query.go): once the operator has stopped, --query-twins
//	    twins are created directly (tags over 100 plants mirrored into labels,
//	    reported telemetry in status), and the kubectl plugin (built from
//	    cmd/kubectl-twin, run as a process) answers a selective tag query
//	    and a residual-only query, against kubectl get -l ... and the full
//	    kubectl get from KUBEBUILDER_ASSETS on the same data: median and p90
//	    over --query-reps runs, plugin/kubectl ratios, and the plugin's
//	    answers checked against a full scan with internal/query;
//	(e) service API (see service.go): after (c), with the operator running,
//	    IoT Hub's service REST API (internal/hubapi, served over HTTPS by
//	    the operator's manager, requests signed as the service SDKs sign
//	    them) is driven by --service-concurrency clients in a closed loop
//	    on --service-twins twins: GET /twins/{id} and PATCH /twins/{id}
//	    for --service-duration each, a selective tag query and the full
//	    fleet's query in pages of 100 for a quarter of it each; reads/s,
//	    updates/s, p50/p99 and the queries' median/p90, each against the
//	    same workload sent straight to the API server on the same twins
//	    once the operator has stopped (GET, merge patch of spec.desired,
//	    List -l, paged List). Every answer is checked: reads and update
//	    replies carry the twin, every twin holds its last acknowledged
//	    setpoint, every query returns each twin it should exactly once.
//
// With --config-twins N (make bench-config) it runs none of these but
// configbench.go: one TwinConfiguration over N twins with devices.
// With --scale N (make bench-scale) it runs none of these but the
// fleet-size measurements of scale.go instead; with --ab (make
// bench-writepath) none of these but the write-path comparison of ab.go:
// for each variant of the operator's write path (--write-path values: the
// old one, the current one, single changes), fresh --devices twins, the
// distinct-twin report capacity and the report latency at 50% and 80% of
// it, on one control plane, variants interleaved over --ab-rounds.
//
// It prints a table and one final JSON line on stdout, progress on stderr,
// and exits 1 when a twin's status does not hold its device's last
// acknowledged report, a query answer differs from the full scan or the
// service API answered wrongly (2 when the run itself failed).
//
//	KUBEBUILDER_ASSETS=$(hack/controlplane.sh) go run ./test/bench [flags]
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"net/http"
	_ "net/http/pprof"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/kubetwin/kubetwin/internal/bridge"
)

// config is the parsed command line.
type config struct {
	twins             int
	baselineInflight  []int
	baselineDuration  time.Duration
	baselineAfter     time.Duration
	devices           int
	rate              float64
	inflight          int
	duration          time.Duration
	warmup            time.Duration
	drainTimeout      time.Duration
	workers           int
	idleStateTTL      time.Duration
	desired           int
	desiredParallel   int
	desiredTimeout    time.Duration
	connectParallel   int
	requestTimeout    time.Duration
	qps               float64
	burst             int
	operatorLogLimit  int
	deviceLogLimit    int
	operatorVerbosity int
	cpuProfile        string
	apiProfile        string
	pprofAddr         string
	role              string
	queryTwins        int
	queryReps         int
	// (e)
	serviceTwins       int
	serviceDuration    time.Duration
	serviceConcurrency int

	restCfg *rest.Config // set once the control plane runs
	// cacheSyncTimeout bounds the operator's first cache sync (0: 60s);
	// scale mode lists far more twins than the phases above.
	cacheSyncTimeout time.Duration
	// brokerConnsPerIP is the embedded broker's per-address connection
	// limit (0: its default, 1,000); every simulated device comes from
	// 127.0.0.1, so scale mode raises it.
	brokerConnsPerIP int
	// configureAPIServer, when set, configures kube-apiserver before it
	// starts; onManager is called with each operator's manager before it
	// starts. Scale mode serves the query API through them.
	configureAPIServer func(*envtest.Environment) error
	onManager          func(ctrl.Manager) error
	// deviceKeys runs the operator with device keys (--device-auth=sas,
	// the default of cmd/manager and the chart): every twin gets a key
	// Secret, which the operator caches, and the embedded broker checks
	// devices' SAS tokens.
	deviceKeys bool
	scale      scaleConfig
	// configBench is the configuration mode (configbench.go).
	configBench configBenchConfig
	// writePath is the operator's write path (--write-path); --ab runs
	// abVariants instead of the phases, abRounds times, with latency at
	// abFractions of each variant's capacity.
	writePath   writePath
	abVariants  []string
	abRounds    int
	abFractions []float64
	abReplay    time.Duration
	abRaw       bool
	// abCapWarmup and abLatWarmup replace --warmup before the capacity
	// and the latency windows of --ab.
	abCapWarmup time.Duration
	abLatWarmup time.Duration
	// abLatWindow replaces --duration for the latency windows (and the
	// raw baseline's): a p99 needs more than one stall of the control
	// plane to mean something.
	abLatWindow time.Duration
}

func parseFlags(args []string) (config, error) {
	var c config
	var inflight, writePathFlag, abFlag, abFractions string
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.IntVar(&c.twins, "twins", 1000, "(a) DeviceTwins the baseline patches")
	fs.StringVar(&inflight, "baseline-inflight", "32,64", "(a) status patches in flight, one measurement each (comma-separated); the best is the baseline")
	fs.DurationVar(&c.baselineAfter, "baseline-device-twins", 5*time.Second, "after the run, with the operator stopped, repeat the best baseline level on the device twins (operator-sized objects) for this long (0: skip)")
	fs.DurationVar(&c.baselineDuration, "baseline-duration", 10*time.Second, "(a) length of each baseline measurement")
	fs.IntVar(&c.devices, "devices", 1000, "(b) simulated devices, each with its own MQTT connection and DeviceTwin")
	fs.Float64Var(&c.rate, "rate", 5, "(b) reports offered per device per second (0: as fast as acknowledgements allow)")
	fs.IntVar(&c.inflight, "inflight", 0, "(b) reports outstanding per device: with --rate 0 exactly this many, else at most this many (a report due while the device has this many outstanding is skipped and counted); 0: 4 with --rate 0, else rate x request-timeout")
	fs.DurationVar(&c.duration, "duration", 20*time.Second, "(b) measured length of the report phase")
	fs.DurationVar(&c.warmup, "warmup", 3*time.Second, "(b) reporting before the measured window starts (not counted)")
	fs.DurationVar(&c.drainTimeout, "drain-timeout", 60*time.Second, "(b) how long outstanding reports may take to be answered after the phase")
	fs.IntVar(&c.workers, "max-concurrent-reconciles", 32, "operator's parallel reconciles (status writes in flight)")
	fs.DurationVar(&c.idleStateTTL, "bridge-idle-state-ttl", bridge.DefaultIdleStateTTL, "operator's --bridge-idle-state-ttl: idle twins' working state is dropped from memory after this long (0: kept)")
	fs.IntVar(&c.desired, "desired", 200, "(c) twins whose spec.desired is changed, one change each")
	fs.IntVar(&c.desiredParallel, "desired-parallel", 4, "(c) desired changes in flight")
	fs.DurationVar(&c.desiredTimeout, "desired-timeout", 30*time.Second, "(c) how long a device may take to get its desired change")
	fs.IntVar(&c.connectParallel, "connect-parallel", 32, "devices connecting at the same time during setup")
	fs.DurationVar(&c.requestTimeout, "request-timeout", 10*time.Second, "device library RequestTimeout (a request unanswered this long is resent)")
	fs.Float64Var(&c.qps, "qps", 2000, "client-side QPS of the API clients (baseline and operator)")
	fs.IntVar(&c.burst, "burst", 4000, "client-side burst of the API clients (baseline and operator)")
	fs.IntVar(&c.operatorLogLimit, "operator-log-lines", 30, "operator error log lines echoed to stderr (all are counted)")
	fs.IntVar(&c.deviceLogLimit, "device-log-lines", 20, "device library log lines echoed to stderr (all are counted)")
	fs.IntVar(&c.operatorVerbosity, "operator-v", 0, "operator log verbosity: 0 errors only, 1 info, 2 debug")
	fs.StringVar(&c.apiProfile, "apiserver-profile", "", "write CPU profiles of kube-apiserver during each baseline level and the measured report window to PREFIX.baseline-N.pprof and PREFIX.reports.pprof")
	fs.IntVar(&c.queryTwins, "query-twins", 10000, "(d) DeviceTwins of the query phase's fleet, created after the operator has stopped (0: skip the phase)")
	fs.IntVar(&c.queryReps, "query-reps", 5, "(d) timed runs of each query command (after one warm-up run)")
	fs.IntVar(&c.serviceTwins, "service-twins", 200, "(e) DeviceTwins the service API phase reads and updates (0: skip the phase)")
	fs.DurationVar(&c.serviceDuration, "service-duration", 10*time.Second, "(e) length of the read and update workloads and of each of their baselines (the two queries and their baselines run for a quarter of it each)")
	fs.IntVar(&c.serviceConcurrency, "service-concurrency", 16, "(e) requests in flight in every workload of the service API phase and its baselines")
	addScaleFlags(fs, &c.scale)
	addConfigBenchFlags(fs, &c.configBench)
	fs.StringVar(&writePathFlag, "write-path", "current", "the operator's write path: current, old (as before issue 14: "+oldWritePath+"), or options joined by +: legacy-status (status granular for server-side apply), keep-status-fields (no cache transform), write-conn (writes on an HTTP connection of their own), client-go-watch (client-go decodes the twin and claim watches)")
	fs.StringVar(&abFlag, "ab", "", "instead of the phases, measure these write paths (comma-separated, as --write-path) in turn on one control plane and the --devices twins: distinct-twin capacity (one report outstanding per device), then latency at --ab-fractions of it; e.g. --ab old,current")
	fs.IntVar(&c.abRounds, "ab-rounds", 2, "--ab: times every variant is measured (interleaved)")
	fs.BoolVar(&c.abRaw, "ab-raw", true, "--ab: after each variant, with its operator stopped, send its status patch straight to the API server at each latency measurement's rate (open loop, --ab-latency-warmup + --duration): the API server's own p50/p99 at that load, the baseline of the report latency")
	fs.DurationVar(&c.abReplay, "ab-replay", 5*time.Second, "--ab: after each variant, with its operator stopped, replay its status writes (one report each, its field manager) on its twins for this long: the API server's CPU per write without the operator and devices (0: skip)")
	fs.DurationVar(&c.abCapWarmup, "ab-capacity-warmup", 90*time.Second, "--ab: reporting at capacity before its window starts: kube-apiserver keeps the last 75 s of events of its watch cache in memory, so its cost per write (and the capacity) settles only after that")
	fs.DurationVar(&c.abLatWarmup, "ab-latency-warmup", 30*time.Second, "--ab: reporting at the offered rate before each latency window starts, so the window sees the steady state of that rate")
	fs.DurationVar(&c.abLatWindow, "ab-latency-window", 60*time.Second, "--ab: length of each latency window and of the raw baseline's (--duration is the capacity window's): at 20 s a single half-second stall of the control plane sets the p99")
	fs.StringVar(&abFractions, "ab-fractions", "0.5,0.8", "--ab: offered load of the latency measurements, as fractions of the variant's capacity (comma-separated)")
	fs.StringVar(&c.role, "role", "", "internal: \"devices\" runs the device process")
	fs.StringVar(&c.pprofAddr, "pprof-addr", "", "serve net/http/pprof of this process on this address (e.g. 127.0.0.1:6060)")
	fs.StringVar(&c.cpuProfile, "cpuprofile", "", "write a CPU profile of this process (operator and broker; the devices run in a child process) during the measured report window to this file")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if c.scale.deviceKeys && c.scale.twins > 0 && c.scale.devices > 0 {
		return c, fmt.Errorf("--scale-device-keys needs --scale-devices 0: the simulated devices connect without keys")
	}
	var err error
	if c.scale.restarts, err = parseRestarts(c.scale.restartBinary, c.scale.restartMemory); err != nil {
		return c, fmt.Errorf("--scale-restart-binary: %w", err)
	}
	if c.writePath, err = parseWritePath(writePathFlag); err != nil {
		return c, fmt.Errorf("--write-path: %w", err)
	}
	if abFlag != "" {
		for _, v := range strings.Split(abFlag, ",") {
			v = strings.TrimSpace(v)
			if _, err := parseWritePath(v); err != nil {
				return c, fmt.Errorf("--ab: %w", err)
			}
			c.abVariants = append(c.abVariants, v)
		}
		if c.abRounds < 1 {
			return c, fmt.Errorf("--ab-rounds must be at least 1")
		}
		if c.abLatWindow <= 0 {
			return c, fmt.Errorf("--ab-latency-window must be positive, got %s", c.abLatWindow)
		}
		for _, f := range strings.Split(abFractions, ",") {
			x, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
			if err != nil || x <= 0 || x > 1 {
				return c, fmt.Errorf("--ab-fractions: %q is not a fraction in (0, 1]", f)
			}
			c.abFractions = append(c.abFractions, x)
		}
	}
	for _, s := range strings.Split(inflight, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 1 {
			return c, fmt.Errorf("--baseline-inflight: %q is not a positive number", s)
		}
		c.baselineInflight = append(c.baselineInflight, n)
	}
	switch {
	case c.twins < 1:
		return c, fmt.Errorf("--twins must be at least 1")
	case c.devices < 1:
		return c, fmt.Errorf("--devices must be at least 1")
	case c.rate < 0:
		return c, fmt.Errorf("--rate must not be negative")
	case c.inflight < 0:
		return c, fmt.Errorf("--inflight must not be negative")
	case c.duration <= 0:
		return c, fmt.Errorf("--duration must be positive")
	case c.desired < 0:
		return c, fmt.Errorf("--desired must not be negative")
	case c.queryTwins < 0:
		return c, fmt.Errorf("--query-twins must not be negative")
	case c.queryReps < 1:
		return c, fmt.Errorf("--query-reps must be at least 1")
	case c.serviceTwins < 0:
		return c, fmt.Errorf("--service-twins must not be negative")
	case c.serviceTwins > 0 && c.serviceDuration < 4*time.Millisecond:
		return c, fmt.Errorf("--service-duration must be positive")
	case c.serviceConcurrency < 1:
		return c, fmt.Errorf("--service-concurrency must be at least 1")
	}
	if c.inflight == 0 {
		c.inflight = 4
		if c.rate > 0 {
			c.inflight = max(1, int(math.Ceil(c.rate*c.requestTimeout.Seconds())))
		}
	}
	c.desired = min(c.desired, c.devices)
	c.desiredParallel = max(c.desiredParallel, 1)
	c.connectParallel = max(c.connectParallel, 1)
	return c, nil
}

func main() {
	cfg, err := parseFlags(os.Args[1:])
	if err == flag.ErrHelp {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(2)
	}
	if cfg.role == childRoleDevices {
		os.Exit(runDeviceChild())
	}
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		fmt.Fprintln(os.Stderr, "bench: KUBEBUILDER_ASSETS is not set: run make bench, or export KUBEBUILDER_ASSETS=$(hack/controlplane.sh)")
		os.Exit(2)
	}
	if cfg.pprofAddr != "" {
		go func() {
			if err := http.ListenAndServe(cfg.pprofAddr, nil); err != nil {
				progress("pprof server: %v", err)
			}
		}()
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	var code int
	switch {
	case len(cfg.abVariants) > 0:
		code = runAB(ctx, cfg)
	case cfg.configBench.twins > 0:
		code = runConfigBench(ctx, cfg, cfg.configBench)
	case cfg.scale.twins > 0:
		code = runScale(ctx, cfg, cfg.scale)
	default:
		code = run(ctx, cfg)
	}
	stop()
	os.Exit(code)
}

// results are the numbers the run prints.
type results struct {
	// (a)
	Twins            int                `json:"twins"`
	BaselineByLevel  map[string]float64 `json:"baseline_writes_per_sec_by_inflight"`
	BaselineErrors   int64              `json:"baseline_errors"`
	BaselineInflight int                `json:"baseline_inflight"`
	Baseline         float64            `json:"baseline_writes_per_sec"`
	BaselineObjBytes int                `json:"baseline_object_bytes"`
	// The baseline's best level again, on the device twins after the run.
	BaselineDeviceTwins float64            `json:"baseline_device_twins_writes_per_sec"`
	CPUBaselineDev      map[string]float64 `json:"cpu_cores_baseline_device_twins"`
	// kube-apiserver CPU milliseconds per write: robust to a busy machine.
	APIMsPerWriteBase    float64            `json:"apiserver_cpu_ms_per_write_baseline"`
	APIMsPerWriteBaseDev float64            `json:"apiserver_cpu_ms_per_write_baseline_device_twins"`
	APIMsPerWriteReports float64            `json:"apiserver_cpu_ms_per_write_reports"`
	CPUBaseline          map[string]float64 `json:"cpu_cores_baseline"`
	// (b)
	Devices             int                `json:"devices"`
	RatePerDevice       float64            `json:"rate_per_device"`
	InflightPerDevice   int                `json:"max_inflight_per_device"`
	MaxConcurrentRecs   int                `json:"max_concurrent_reconciles"`
	DurationSec         float64            `json:"duration_sec"`
	OfferedPerSec       float64            `json:"offered_reports_per_sec"`
	ReportsSent         int64              `json:"reports_sent_in_window"`
	ReportsSkipped      int64              `json:"reports_skipped_device_busy"`
	ReportsAcked        int64              `json:"reports_acked"`
	ReportsPerSec       float64            `json:"reports_per_sec"`
	ReportErrors        int64              `json:"report_errors"`
	StatusWrites        int64              `json:"status_writes"`
	StatusWriteErrors   int64              `json:"status_write_errors"`
	WritesPerSec        float64            `json:"status_writes_per_sec"`
	ReportsPerWrite     float64            `json:"reports_per_write"`
	WriteRateVsBaseline float64            `json:"write_rate_vs_baseline_pct"`
	WriteRateVsDevBase  float64            `json:"write_rate_vs_device_twins_baseline_pct"`
	ReportLatencyP50Ms  float64            `json:"report_latency_p50_ms"`
	ReportLatencyP99Ms  float64            `json:"report_latency_p99_ms"`
	ReportLatencyMaxMs  float64            `json:"report_latency_max_ms"`
	CPUReports          map[string]float64 `json:"cpu_cores_reports"`
	DeviceObjBytes      int                `json:"device_twin_object_bytes"`
	// queue is where the operator's time went in the window (--ab only).
	queue                 map[string]queueTimes
	Mismatches            int `json:"mismatches"`
	VersionMismatches     int `json:"reported_version_mismatches"`
	DevicesWithVersionGap int `json:"devices_with_version_gaps"`
	// (c)
	DesiredChanges      int     `json:"desired_changes"`
	DesiredReceived     int     `json:"desired_received"`
	DesiredTimeouts     int     `json:"desired_timeouts"`
	DesiredBadVersion   int     `json:"desired_unexpected_version"`
	DesiredLatencyP50Ms float64 `json:"desired_latency_p50_ms"`
	DesiredLatencyP99Ms float64 `json:"desired_latency_p99_ms"`
	DesiredLatencyMaxMs float64 `json:"desired_latency_max_ms"`
	DesiredFromStartP50 float64 `json:"desired_latency_from_patch_start_p50_ms"`
	DesiredFromStartP99 float64 `json:"desired_latency_from_patch_start_p99_ms"`
	DesiredEarly        int     `json:"desired_before_patch_returned"`
	// (d)
	QueryTwins                 int     `json:"query_twins"`
	QueryRepetitions           int     `json:"query_repetitions"`
	QueryCreateSec             float64 `json:"query_create_sec"`
	QuerySelectivePluginMs     float64 `json:"query_selective_plugin_ms"`
	QuerySelectivePluginP90Ms  float64 `json:"query_selective_plugin_p90_ms"`
	QuerySelectiveKubectlMs    float64 `json:"query_selective_kubectl_ms"`
	QuerySelectiveKubectlP90Ms float64 `json:"query_selective_kubectl_p90_ms"`
	QuerySelectiveRatio        float64 `json:"query_selective_ratio"`
	QuerySelectiveMatched      int     `json:"query_selective_matched"`
	QuerySelectiveExpected     int     `json:"query_selective_expected"`
	QuerySelectiveKubectlItems int     `json:"query_selective_kubectl_items"`
	QueryResidualPluginMs      float64 `json:"query_residual_plugin_ms"`
	QueryResidualPluginP90Ms   float64 `json:"query_residual_plugin_p90_ms"`
	QueryResidualKubectlMs     float64 `json:"query_residual_kubectl_ms"`
	QueryResidualKubectlP90Ms  float64 `json:"query_residual_kubectl_p90_ms"`
	QueryResidualRatio         float64 `json:"query_residual_ratio"`
	QueryResidualMatched       int     `json:"query_residual_matched"`
	QueryResidualExpected      int     `json:"query_residual_expected"`
	QueryResidualKubectlItems  int     `json:"query_residual_kubectl_items"`
	QueryResidualPluginBytes   int     `json:"query_residual_plugin_output_bytes"`
	QueryResidualKubectlBytes  int     `json:"query_residual_kubectl_output_bytes"`
	QueryMismatches            int     `json:"query_wrong_answers"`
	// (e) The service API, and the API server's own rate on the same
	// twins (operator stopped; the "base_" fields).
	ServiceTwins                 int                `json:"service_twins"`
	ServiceFleet                 int                `json:"service_fleet_twins"`
	ServiceConcurrency           int                `json:"service_concurrency"`
	ServiceDurationSec           float64            `json:"service_duration_sec"`
	ServiceQueryDurationSec      float64            `json:"service_query_duration_sec"`
	ServiceReadsPerSec           float64            `json:"service_reads_per_sec"`
	ServiceReadP50Ms             float64            `json:"service_read_p50_ms"`
	ServiceReadP99Ms             float64            `json:"service_read_p99_ms"`
	ServiceReadNon2xx            map[string]int64   `json:"service_read_non_2xx"`
	BaseReadsPerSec              float64            `json:"service_base_reads_per_sec"`
	BaseReadP50Ms                float64            `json:"service_base_read_p50_ms"`
	BaseReadP99Ms                float64            `json:"service_base_read_p99_ms"`
	BaseReadNon2xx               map[string]int64   `json:"service_base_read_non_2xx"`
	ServiceReadRatio             float64            `json:"service_read_ratio"`
	ServiceUpdatesPerSec         float64            `json:"service_updates_per_sec"`
	ServiceUpdateP50Ms           float64            `json:"service_update_p50_ms"`
	ServiceUpdateP99Ms           float64            `json:"service_update_p99_ms"`
	ServiceUpdateNon2xx          map[string]int64   `json:"service_update_non_2xx"`
	ServiceStatusWritesPerUpdate float64            `json:"service_status_writes_per_update"`
	CPUServiceUpdates            map[string]float64 `json:"cpu_cores_service_updates"`
	CPUServiceBaseUpdates        map[string]float64 `json:"cpu_cores_service_base_updates"`
	BaseUpdatesPerSec            float64            `json:"service_base_updates_per_sec"`
	BaseUpdateP50Ms              float64            `json:"service_base_update_p50_ms"`
	BaseUpdateP99Ms              float64            `json:"service_base_update_p99_ms"`
	BaseUpdateNon2xx             map[string]int64   `json:"service_base_update_non_2xx"`
	ServiceUpdateRatio           float64            `json:"service_update_ratio"`
	ServiceSelectiveExpected     int                `json:"service_selective_matches"`
	ServiceSelectivePages        int                `json:"service_selective_pages"`
	ServiceSelectiveMs           float64            `json:"service_selective_query_ms"`
	ServiceSelectiveP90Ms        float64            `json:"service_selective_query_p90_ms"`
	ServiceSelectivePerSec       float64            `json:"service_selective_queries_per_sec"`
	ServiceSelectiveNon2xx       map[string]int64   `json:"service_selective_non_2xx"`
	BaseSelectiveMs              float64            `json:"service_base_selective_list_ms"`
	BaseSelectiveP90Ms           float64            `json:"service_base_selective_list_p90_ms"`
	BaseSelectiveNon2xx          map[string]int64   `json:"service_base_selective_non_2xx"`
	ServiceSelectiveRatio        float64            `json:"service_selective_ratio"`
	ServiceFullPages             int                `json:"service_full_pages"`
	ServiceFullMs                float64            `json:"service_full_query_ms"`
	ServiceFullP90Ms             float64            `json:"service_full_query_p90_ms"`
	ServiceFullPerSec            float64            `json:"service_full_queries_per_sec"`
	ServiceFullNon2xx            map[string]int64   `json:"service_full_non_2xx"`
	BaseFullMs                   float64            `json:"service_base_full_list_ms"`
	BaseFullP90Ms                float64            `json:"service_base_full_list_p90_ms"`
	BaseFullNon2xx               map[string]int64   `json:"service_base_full_non_2xx"`
	ServiceFullRatio             float64            `json:"service_full_ratio"`
	ServiceReadMismatches        int                `json:"service_read_mismatches"`
	ServiceUpdateMismatches      int                `json:"service_update_mismatches"`
	ServiceSetpointMismatches    int                `json:"service_setpoint_mismatches"`
	ServiceQueryMismatches       int                `json:"service_query_wrong_answers"`
	// Health.
	OperatorErrorLogs int64   `json:"operator_error_logs"`
	DeviceLogLines    int64   `json:"device_log_lines"`
	SetupSec          float64 `json:"setup_sec"`
	TotalSec          float64 `json:"total_sec"`
}

func printResults(r *results) {
	w := os.Stdout
	row := func(name, value string) { fmt.Fprintf(w, "  %-44s %s\n", name, value) }
	fmt.Fprintln(w)
	fmt.Fprintln(w, "kubetwin bench")
	fmt.Fprintln(w, "  ----------------------------------------------------------------------")
	var levels []string
	for _, n := range sortedKeys(r.BaselineByLevel) {
		levels = append(levels, fmt.Sprintf("%s in flight: %.0f/s", n, r.BaselineByLevel[n]))
	}
	row(fmt.Sprintf("baseline status patches (%d twins)", r.Twins), strings.Join(levels, ", "))
	row("baseline writes/s (best)", fmt.Sprintf("%.0f  (%d in flight, %d errors)", r.Baseline, r.BaselineInflight, r.BaselineErrors))
	row("  CPU cores used meanwhile", coresString(r.CPUBaseline))
	row("  size of a baseline twin (JSON)", fmt.Sprintf("%d bytes (a device twin after the report phase: %d bytes)", r.BaselineObjBytes, r.DeviceObjBytes))
	row("same patches on the device twins (after)", fmt.Sprintf("%.0f writes/s  (%d in flight, operator stopped)", r.BaselineDeviceTwins, r.BaselineInflight))
	row("  CPU cores used meanwhile", coresString(r.CPUBaselineDev))
	row("kube-apiserver CPU per write", fmt.Sprintf("baseline %.1f ms, on device twins %.1f ms, operator's writes %.1f ms",
		r.APIMsPerWriteBase, r.APIMsPerWriteBaseDev, r.APIMsPerWriteReports))
	fmt.Fprintln(w, "  ----------------------------------------------------------------------")
	rate := fmt.Sprintf("%g/s per device, offered %.0f/s, at most %d in flight each", r.RatePerDevice, r.OfferedPerSec, r.InflightPerDevice)
	if r.RatePerDevice == 0 {
		rate = fmt.Sprintf("as fast as acknowledged, %d in flight each", r.InflightPerDevice)
	}
	row("devices", fmt.Sprintf("%d (%s; %d reconcilers; %.0fs)", r.Devices, rate, r.MaxConcurrentRecs, r.DurationSec))
	row("reports acknowledged (204) in the window", fmt.Sprintf("%d  (sent in the window %d = %.0f/s, skipped %d: device at its in-flight limit; %d failed)",
		r.ReportsAcked, r.ReportsSent, float64(r.ReportsSent)/r.DurationSec, r.ReportsSkipped, r.ReportErrors))
	row("reports/s", fmt.Sprintf("%.0f", r.ReportsPerSec))
	row("status writes (bridge.StatusWrites, ok)", fmt.Sprintf("%d  (%d errors)", r.StatusWrites, r.StatusWriteErrors))
	row("status writes/s", fmt.Sprintf("%.0f", r.WritesPerSec))
	row("reports per write", fmt.Sprintf("%.2f", r.ReportsPerWrite))
	row("write rate vs baseline", fmt.Sprintf("%.0f%%  (vs the baseline on device twins: %.0f%%)", r.WriteRateVsBaseline, r.WriteRateVsDevBase))
	row("report latency p50 / p99 / max (publish->204)", fmt.Sprintf("%.1f / %.1f / %.1f ms", r.ReportLatencyP50Ms, r.ReportLatencyP99Ms, r.ReportLatencyMaxMs))
	row("  CPU cores used meanwhile", coresString(r.CPUReports))
	row("twins not holding last acked report", fmt.Sprintf("%d  (reportedVersion mismatches %d, devices with version gaps %d)", r.Mismatches, r.VersionMismatches, r.DevicesWithVersionGap))
	fmt.Fprintln(w, "  ----------------------------------------------------------------------")
	row("desired changes", fmt.Sprintf("%d  (received %d, timeouts %d, unexpected version %d)", r.DesiredChanges, r.DesiredReceived, r.DesiredTimeouts, r.DesiredBadVersion))
	row("desired latency p50 / p99 / max (patch->OnDesired)", fmt.Sprintf("%.1f / %.1f / %.1f ms", r.DesiredLatencyP50Ms, r.DesiredLatencyP99Ms, r.DesiredLatencyMaxMs))
	row("  from the patch call's start instead", fmt.Sprintf("%.1f / %.1f ms  (%d changes reached the device before the patch call returned: counted as 0 above)",
		r.DesiredFromStartP50, r.DesiredFromStartP99, r.DesiredEarly))
	fmt.Fprintln(w, "  ----------------------------------------------------------------------")
	if r.QueryTwins > 0 {
		row("query fleet (operator stopped)", fmt.Sprintf("%d twins, %d plants (created in %.0fs); median / p90 of %d runs, each a process",
			r.QueryTwins, queryPlants, r.QueryCreateSec, r.QueryRepetitions))
		row("selective: "+querySelective[len("SELECT * FROM devices WHERE "):], fmt.Sprintf("%d twins match (full scan: %d)", r.QuerySelectiveMatched, r.QuerySelectiveExpected))
		row("  kubectl-twin query -o json", fmt.Sprintf("%.0f / %.0f ms", r.QuerySelectivePluginMs, r.QuerySelectivePluginP90Ms))
		row("  kubectl get -l location.plant=... -o json", fmt.Sprintf("%.0f / %.0f ms  (%d items)", r.QuerySelectiveKubectlMs, r.QuerySelectiveKubectlP90Ms, r.QuerySelectiveKubectlItems))
		row("  ratio plugin / kubectl (medians)", fmt.Sprintf("%.2f", r.QuerySelectiveRatio))
		row("residual: "+queryResidual[len("SELECT * FROM devices WHERE "):], fmt.Sprintf("%d twins match (full scan: %d)", r.QueryResidualMatched, r.QueryResidualExpected))
		row("  kubectl-twin query -o json", fmt.Sprintf("%.0f / %.0f ms  (%d KB out)", r.QueryResidualPluginMs, r.QueryResidualPluginP90Ms, r.QueryResidualPluginBytes/1024))
		row("  kubectl get -o json (full list)", fmt.Sprintf("%.0f / %.0f ms  (%d items, %d KB out)", r.QueryResidualKubectlMs, r.QueryResidualKubectlP90Ms, r.QueryResidualKubectlItems, r.QueryResidualKubectlBytes/1024))
		row("  ratio plugin / kubectl (medians)", fmt.Sprintf("%.2f", r.QueryResidualRatio))
		row("wrong query answers", fmt.Sprintf("%d", r.QueryMismatches))
		fmt.Fprintln(w, "  ----------------------------------------------------------------------")
	}
	if r.ServiceTwins > 0 {
		printService(r, row)
		fmt.Fprintln(w, "  ----------------------------------------------------------------------")
	}
	row("operator error log lines", fmt.Sprintf("%d", r.OperatorErrorLogs))
	row("device library log lines", fmt.Sprintf("%d", r.DeviceLogLines))
	row("setup / total time", fmt.Sprintf("%.0fs / %.0fs", r.SetupSec, r.TotalSec))
	fmt.Fprintln(w)
	b, _ := json.Marshal(r)
	fmt.Fprintln(w, string(b))
}
