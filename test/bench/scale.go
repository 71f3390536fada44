package main

// Scale mode (--scale N, make bench-scale): the fleet-size figures of
// docs/sizing.md, not part of make bench. One run:
//
//  1. creates N twins (tags mirrored into labels, as the operator leaves
//     them) in the namespace the service API serves, --scale-create-parallel
//     at a time, and reports the create rate;
//  2. starts the operator and times start -> cache synced -> every device
//     id claimed -> no status write for --scale-quiet, counting the API
//     server's writes (apiserver_request_total) and the operator's status
//     writes meanwhile;
//  2b. (--scale-restart) stops the operator and starts it again, and times
//     start -> cache synced -> every twin reconciled, counting the
//     reconciles and the API server's writes meanwhile (nothing changed, so
//     there should be none);
//  3. times `kubectl twin query` (a process, as a user runs it) and the
//     service API for a selective tag query and a residual query that has
//     to look at every twin, and the service API's full query in pages;
//  4. connects --scale-devices devices and has them report
//     --scale-report-rate reports/s in total (default: half the distinct-
//     twin write capacity measured on this machine, issue 14), measuring
//     report -> 204 p50/p99 and the CPU each process used.
//
// It samples RSS (kube-apiserver, etcd, this process) and etcd's database
// size after steps 1, 2, 2b and 4 (and, with --scale-profile, writes the
// operator's heap profile after 2 and 2b and a CPU profile of 2b), and
// stops early (exit 2)
// when the machine's available memory falls under --scale-min-available,
// before it swaps.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	kubetwin "github.com/kubetwin/kubetwin/internal/operator"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// fullProjection is a projection of most of every twin: over the query
// API's bound at 100,000 twins, so it comes in parts.
const fullProjection = "SELECT deviceId, tags, properties FROM devices"

// fleetGroups is an aggregate over the whole fleet: its rows are few, but
// every twin is read.
const fleetGroups = "SELECT tags.location.plant AS plant, COUNT() AS n FROM devices GROUP BY tags.location.plant"

// scaleNS is the fleet's namespace: the one the service API serves, so
// its queries see the whole fleet.
const scaleNS = serviceNS

// scaleConfig is the scale mode's part of the command line.
type scaleConfig struct {
	twins          int
	deviceKeys     bool
	createParallel int
	devices        int
	reportRate     float64 // reports/s offered by all devices together
	warmup         time.Duration
	duration       time.Duration
	quiet          time.Duration
	settleTimeout  time.Duration
	queryReps      int
	fullQuery      bool
	minAvailMiB    int
	restart        bool
	profile        string
	memoryLimit    byteQuantity
	// restartBinary is --scale-restart-binary; restartMemory the memory
	// cgroup's limit it runs under.
	restartBinary string
	restartMemory byteQuantity
	// restarts is restartBinary parsed: each binary and its memory limit.
	restarts []processRestartSpec
	// restartGate is --scale-restart-gate.
	restartGate string
	// pluginBaseline is --scale-plugin-baseline.
	pluginBaseline string
}

func addScaleFlags(fs interface {
	IntVar(*int, string, int, string)
	Float64Var(*float64, string, float64, string)
	DurationVar(*time.Duration, string, time.Duration, string)
	BoolVar(*bool, string, bool, string)
	StringVar(*string, string, string, string)
	Var(flag.Value, string, string)
}, s *scaleConfig) {
	fs.IntVar(&s.twins, "scale", 0, "scale mode (make bench-scale): a fleet of this many twins instead of the phases above (0: off)")
	fs.IntVar(&s.createParallel, "scale-create-parallel", 64, "scale: twins created at a time")
	fs.IntVar(&s.devices, "scale-devices", 10000, "scale: connected devices of the latency measurement (the fleet's first twins; 0: skip it)")
	fs.Float64Var(&s.reportRate, "scale-report-rate", 140, "scale: reports/s offered by all devices together (default: half the ~280/s distinct-twin write capacity measured on the 2-core machine, issue 14)")
	fs.DurationVar(&s.warmup, "scale-warmup", 15*time.Second, "scale: reporting before the measured window")
	fs.DurationVar(&s.duration, "scale-duration", 60*time.Second, "scale: measured report window")
	fs.DurationVar(&s.quiet, "scale-quiet", 5*time.Second, "scale: the operator has settled when it has written no status for this long")
	fs.DurationVar(&s.settleTimeout, "scale-settle-timeout", 30*time.Minute, "scale: longest wait for the operator to sync, claim and settle")
	fs.IntVar(&s.queryReps, "scale-query-reps", 3, "scale: timed runs of each query (after one warm-up of the selective ones)")
	fs.BoolVar(&s.fullQuery, "scale-full-query", false, "scale: also time SELECT * over the whole fleet: the service API in pages of 100, kubectl twin query through the query API (in parts over --query-api-max-response-bytes) and listing")
	fs.IntVar(&s.minAvailMiB, "scale-min-available", 2048, "scale: stop the run when the machine's MemAvailable falls under this many MiB")
	fs.BoolVar(&s.deviceKeys, "scale-device-keys", false, "scale: run the operator with device keys, as the chart does (--device-auth=sas): every twin gets a key Secret (one more API write per twin at start-up), which the operator caches; needs --scale-devices 0 (the simulated devices connect without keys)")
	fs.BoolVar(&s.restart, "scale-restart", true, "scale: once the operator has settled, stop it and start it again, timing start -> every twin reconciled and counting the API writes")
	s.memoryLimit = byteQuantity(defaultScaleMemoryLimit)
	fs.Var(&s.memoryLimit, "scale-memory-limit", fmt.Sprintf("scale: the Go runtime's soft memory limit of this process (operator, broker and the bench's clients), as a quantity (0: none); "+
		"default: the operator's in production, 90%% of the chart's resources.limits.memory %s (GOMEMLIMIT in the environment wins)", chartMemoryLimit))
	fs.StringVar(&s.restartBinary, "scale-restart-binary", "", "scale: before the in-process restart, restart the operator as a pod restarts: this operator binary (make bench-scale passes bin/manager) as a fresh process on the settled fleet, in a memory cgroup of --scale-restart-memory when this machine has one (root), timing start -> every twin reconciled and its peak memory; a comma-separated list restarts each in turn on the same fleet (an A/B of two builds: old,new,new,old); BINARY@QUANTITY gives that restart its own memory limit instead of --scale-restart-memory (bin/manager@1Gi,bin/manager@1280Mi); empty: skip")
	chartLimit := resource.MustParse(chartMemoryLimit)
	s.restartMemory = byteQuantity(chartLimit.Value())
	fs.Var(&s.restartMemory, "scale-restart-memory", fmt.Sprintf("scale: the memory cgroup limit of --scale-restart-binary's process, as a quantity (default: the chart's resources.limits.memory %s; the operator sets its Go soft limit to 90%% of it)", chartMemoryLimit))
	fs.StringVar(&s.restartGate, "scale-restart-gate", "", "scale: wait until this file exists before the restarts (e.g. until the machine is quiet, or the binary to restart is built); empty: no wait")
	fs.StringVar(&s.pluginBaseline, "scale-plugin-baseline", "", "scale, with --scale-full-query: also time SELECT * of the whole fleet (between two runs of the current plugin) and the projection with this kubectl-twin binary (one built from an earlier commit: an A/B of the plugin); empty: skip")
	fs.StringVar(&s.profile, "scale-profile", "", "scale: write the operator's heap profile (after a GC) once settled and once restarted, and a CPU profile of this process during the restart, to PREFIX.heap-settled.pprof, PREFIX.heap-restarted.pprof and PREFIX.cpu-restart.pprof")
}

// memSample is the RSS of the processes that matter and etcd's database.
// The operator's figures are this process's: RSS and heap in use as found,
// then after a GC that returns free memory to the system (what the
// operator needs), and the GC's share of the CPU since the last sample.
type memSample struct {
	At                   string  `json:"at"`
	APIServerMiB         float64 `json:"kube_apiserver_rss_mib"`
	EtcdMiB              float64 `json:"etcd_rss_mib"`
	OperatorMiB          float64 `json:"operator_rss_mib"`
	OperatorHeapInUseMiB float64 `json:"operator_go_heap_inuse_mib"`
	OperatorHeapMiB      float64 `json:"operator_go_heap_after_gc_mib"`
	OperatorHeapLiveMiB  float64 `json:"operator_go_heap_live_mib"`
	OperatorRSSAfterGC   float64 `json:"operator_rss_after_gc_mib"`
	OperatorGCCPUPct     float64 `json:"operator_gc_cpu_pct"`
	DevicesMiB           float64 `json:"devices_rss_mib,omitempty"`
	EtcdDBMiB            float64 `json:"etcd_db_mib"`
	EtcdDBInUseMiB       float64 `json:"etcd_db_in_use_mib"`
}

// scaleResults are the scale mode's numbers.
type scaleResults struct {
	Date        string  `json:"date"`
	Cores       int     `json:"cores"`
	MemTotalGiB float64 `json:"machine_mem_gib"`
	Twins       int     `json:"twins"`
	// The Go runtime's soft memory limit of this process (0: none).
	MemoryLimit     int64       `json:"memory_limit_bytes"`
	MemoryLimitFrom string      `json:"memory_limit_from"`
	CreateSec       float64     `json:"create_sec"`
	CreatePerSec    float64     `json:"creates_per_sec"`
	CreateCPU       string      `json:"create_cpu"`
	Mem             []memSample `json:"memory"`
	CacheSyncSec    float64     `json:"operator_cache_sync_sec"`
	Claimed         int         `json:"operator_claimed"`
	ClaimedSec      float64     `json:"operator_all_claimed_sec"`
	SettledSec      float64     `json:"operator_settled_sec"`
	StartWrites     int64       `json:"operator_start_status_writes"`
	StartWriteErr   int64       `json:"operator_start_status_write_errors"`
	StartAPI        apiWrites   `json:"operator_start_api_writes"`
	StartCPU        string      `json:"operator_start_cpu"`
	StartRecs       float64     `json:"operator_start_reconciles"`
	// Restart as a fresh process (--scale-restart-binary).
	ProcessRestart []*processRestartResults `json:"process_restart,omitempty"`
	// Restart (--scale-restart).
	Restart restartResults `json:"restart"`
	// Idle twins (--bridge-idle-state-ttl): how long until the bridge held
	// IdleTwinsInMemory twins' working state (0: all dropped).
	IdleDroppedSec    float64 `json:"idle_dropped_sec,omitempty"`
	IdleTwinsInMemory float64 `json:"idle_twins_in_memory,omitempty"`
	// Queries (ms): median of the reps.
	Selective         string  `json:"query_selective"`
	Residual          string  `json:"query_residual"`
	SelectiveExpected int     `json:"query_selective_expected"`
	PluginSelectiveMs float64 `json:"plugin_selective_ms"`
	PluginSelectiveN  int     `json:"plugin_selective_items"`
	PluginResidualMs  float64 `json:"plugin_residual_ms"`
	PluginResidualN   int     `json:"plugin_residual_items"`
	// The plugin listing the twins itself (--via list).
	ListSelectiveMs    float64 `json:"plugin_list_selective_ms"`
	ListSelectiveN     int     `json:"plugin_list_selective_items"`
	ListResidualMs     float64 `json:"plugin_list_residual_ms"`
	ListResidualN      int     `json:"plugin_list_residual_items"`
	ServiceSelectiveMs float64 `json:"service_selective_ms"`
	ServiceSelectiveN  int     `json:"service_selective_items"`
	ServiceResidualMs  float64 `json:"service_residual_ms"`
	ServiceResidualN   int     `json:"service_residual_items"`
	ServiceFullMs      float64 `json:"service_full_ms"`
	ServiceFullN       int     `json:"service_full_items"`
	ServiceFullPages   int     `json:"service_full_pages"`
	// kubectl twin query SELECT * of the whole fleet (--scale-full-query):
	// through the query API (in parts over --query-api-max-response-bytes)
	// and listing.
	// The table (-o table) and, with --scale-plugin-baseline, that
	// plugin's SELECT * and the current one's again after it.
	PluginFullMs      float64 `json:"plugin_full_ms"`
	PluginFullN       int     `json:"plugin_full_items"`
	PluginFullTableMs float64 `json:"plugin_full_table_ms"`
	PluginFullTableN  int     `json:"plugin_full_table_rows"`
	BaselineFullMs    float64 `json:"plugin_baseline_full_ms,omitempty"`
	BaselineFullN     int     `json:"plugin_baseline_full_items,omitempty"`
	PluginFullAgainMs float64 `json:"plugin_full_again_ms,omitempty"`
	// SELECT * and the projection with the kubeconfig's
	// disable-compression: the answers' parts not gzipped.
	PluginFullUncompressedMs       float64 `json:"plugin_full_uncompressed_ms"`
	PluginProjectionUncompressedMs float64 `json:"plugin_projection_uncompressed_ms"`
	// A projection of most of every twin (fullProjection), through the
	// query API: -o json, the table, and with --scale-plugin-baseline,
	// that plugin's of both.
	PluginProjectionMs        float64 `json:"plugin_projection_ms"`
	PluginProjectionN         int     `json:"plugin_projection_items"`
	PluginProjectionTableMs   float64 `json:"plugin_projection_table_ms"`
	PluginProjectionTableN    int     `json:"plugin_projection_table_rows"`
	BaselineProjectionMs      float64 `json:"plugin_baseline_projection_ms,omitempty"`
	BaselineProjectionN       int     `json:"plugin_baseline_projection_items,omitempty"`
	BaselineProjectionTableMs float64 `json:"plugin_baseline_projection_table_ms,omitempty"`
	BaselineProjectionTableN  int     `json:"plugin_baseline_projection_table_rows,omitempty"`
	// fleetGroups through the query API, as a table.
	PluginGroupsMs float64 `json:"plugin_groups_ms"`
	PluginGroupsN  int     `json:"plugin_groups_rows"`
	ListFullMs     float64 `json:"plugin_list_full_ms"`
	ListFullN      int     `json:"plugin_list_full_items"`
	WrongAnswers   int     `json:"query_wrong_answers"`
	// Devices.
	Devices          int                `json:"devices"`
	ConnectSec       float64            `json:"devices_connect_sec"`
	ConnectSettleSec float64            `json:"devices_connect_settled_sec"`
	ConnectWrites    int64              `json:"devices_connect_status_writes"`
	OfferedPerSec    float64            `json:"offered_reports_per_sec"`
	ReportsPerSec    float64            `json:"reports_per_sec"`
	WritesPerSec     float64            `json:"status_writes_per_sec"`
	ReportErrors     int64              `json:"report_errors"`
	ReportsSkipped   int64              `json:"reports_skipped"`
	P50Ms            float64            `json:"report_latency_p50_ms"`
	P99Ms            float64            `json:"report_latency_p99_ms"`
	MaxMs            float64            `json:"report_latency_max_ms"`
	ReportCPU        map[string]float64 `json:"cpu_cores_reports"`
	// Derived (docs/sizing.md).
	TwinsPerGiBAPI      float64 `json:"twins_per_gib_apiserver"`
	TwinsPerGiBOperator float64 `json:"twins_per_gib_operator"`
	ReportsPerAPICore   float64 `json:"reports_per_sec_per_apiserver_core"`
	ConnsPerOpCore      float64 `json:"connections_per_operator_core"`
	OperatorErrorLogs   int64   `json:"operator_error_logs"`
	TotalSec            float64 `json:"total_sec"`
}

// runScale is the scale mode; it returns the exit code.
func runScale(ctx context.Context, cfg config, sc scaleConfig) int {
	res := &scaleResults{Date: time.Now().UTC().Format("2006-01-02"), Cores: runtime.NumCPU(), Twins: sc.twins, MemTotalGiB: memTotalGiB()}
	opLog := &lineLog{prefix: "[operator] ", limit: int64(cfg.operatorLogLimit), out: os.Stderr}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go memoryGuard(ctx, cancel, sc.minAvailMiB)
	res.MemoryLimit, res.MemoryLimitFrom = applyMemoryLimit(int64(sc.memoryLimit))
	progress("scale: Go soft memory limit %s (%s)", memoryLimitString(res.MemoryLimit), res.MemoryLimitFrom)

	qapi, err := newScaleQueryAPI()
	if err != nil {
		return fail("preparing the query API", err)
	}
	defer qapi.cleanup()
	cfg.configureAPIServer = qapi.configure
	// Each operator serves the query API; the weak pointers say whether a
	// stopped one was collected.
	var started []operatorRefs
	cfg.onManager = func(mgr ctrl.Manager) error {
		started = append(started, refsOf(mgr))
		return qapi.addTo(mgr)
	}
	cp, err := startControlPlane(ctx, &cfg, opLog, scaleNS)
	if err != nil {
		return fail("starting the control plane", err)
	}
	defer cp.stop()
	env, restCfg, k8s := cp.env, cp.restCfg, cp.k8s
	failed := func(what string, err error) int {
		if c := context.Cause(ctx); c != nil && !errors.Is(c, context.Canceled) {
			err = c
		}
		return fail(what, err)
	}
	sample := func(at string) {
		m := sampleMem(env, at)
		res.Mem = append(res.Mem, m)
		progress("  memory %s: kube-apiserver %.0f MiB, etcd %.0f MiB, operator %.0f MiB (Go heap in use %.0f, after GC %.0f, RSS then %.0f; GC %.1f%% of CPU), devices %.0f MiB; etcd db %.0f MiB (%.0f in use)",
			at, m.APIServerMiB, m.EtcdMiB, m.OperatorMiB, m.OperatorHeapInUseMiB, m.OperatorHeapMiB, m.OperatorRSSAfterGC, m.OperatorGCCPUPct,
			m.DevicesMiB, m.EtcdDBMiB, m.EtcdDBInUseMiB)
	}

	// 1. The fleet.
	c0 := sampleCPU()
	t0 := time.Now()
	if err := createScaleFleet(ctx, k8s, sc); err != nil {
		return failed("creating the fleet", err)
	}
	res.CreateSec = time.Since(t0).Seconds()
	res.CreatePerSec = float64(sc.twins) / res.CreateSec
	res.CreateCPU = coresString(coresBetween(c0, sampleCPU()))
	sample("fleet created")

	// 2. The operator's start.
	cfg.serviceTwins = sc.twins // serve the service API (on scaleNS)
	cfg.deviceKeys = sc.deviceKeys
	cfg.cacheSyncTimeout = sc.settleTimeout
	cfg.brokerConnsPerIP = max(sc.devices+100, 1000)
	api0, err := apiserverWrites(restCfg)
	if err != nil {
		return failed("reading the API server's metrics", err)
	}
	w0, e0 := statusWrites()
	r0 := devicetwinReconciles()
	c0 = sampleCPU()
	opStart := time.Now()
	op, err := startOperator(ctx, restCfg, cfg)
	if err != nil {
		return failed("starting the operator", err)
	}
	// A closure, not a deferred op.stop(): that would hold the first
	// operator (its cache, through the service API) until the end.
	defer func() {
		if op != nil {
			op.stop()
		}
	}()
	res.CacheSyncSec = time.Since(opStart).Seconds()
	progress("scale: operator cache synced %.1fs after start", res.CacheSyncSec)
	// A start-up slower than --scale-settle-timeout is a result too: the
	// run goes on with what was claimed (and connects no devices).
	claimed, err := waitClaimCount(ctx, k8s, sc.twins, sc.settleTimeout)
	if err != nil {
		return failed("waiting for the device id claims", err)
	}
	res.Claimed = claimed
	res.ClaimedSec = time.Since(opStart).Seconds()
	if claimed >= sc.twins {
		last := waitWritesQuiet(ctx, sc.quiet, sc.settleTimeout)
		res.SettledSec = last.Sub(opStart).Seconds()
	} else {
		progress("scale: only %d of %d device ids claimed after %s: going on without the devices", claimed, sc.twins, sc.settleTimeout)
		sc.devices = 0
	}
	w1, e1 := statusWrites()
	res.StartWrites, res.StartWriteErr = w1-w0, e1-e0
	res.StartCPU = coresString(coresBetween(c0, sampleCPU()))
	api1, err := apiserverWrites(restCfg)
	if err != nil {
		return failed("reading the API server's metrics", err)
	}
	res.StartAPI = api1.minus(api0)
	res.StartRecs = devicetwinReconciles().total - r0.total
	progress("scale: operator start-up: %d status writes (%d failed), %.0f reconciles; API server writes: %s", res.StartWrites, res.StartWriteErr, res.StartRecs, res.StartAPI)
	sample("operator settled")
	writeHeapProfile(sc.profile, "settled")

	// 2b. The operator's restart: with nothing changed, it should write
	// nothing, only read.
	// The bridge's gauge is this process's: what the stopped operator's
	// bridge held stays counted in it, so the idle wait subtracts it.
	var stoppedInMemory float64
	if (sc.restart || sc.restartBinary != "") && claimed >= sc.twins && sc.restartGate != "" {
		progress("scale: waiting for %s to exist before the restarts (--scale-restart-gate)", sc.restartGate)
		for !fileExists(sc.restartGate) {
			if err := sleepCtx(ctx, 2*time.Second); err != nil {
				return failed("waiting for --scale-restart-gate", err)
			}
		}
	}
	if (sc.restart || sc.restartBinary != "") && claimed >= sc.twins {
		op.stop()
		op = nil
		stoppedInMemory = max(0, bridgeTwinsInMemory())
	}
	if sc.restartBinary != "" && claimed >= sc.twins {
		for _, r := range sc.restarts {
			pr := &processRestartResults{}
			res.ProcessRestart = append(res.ProcessRestart, pr)
			rc := sc
			rc.restartMemory = r.memory
			if err := processRestart(ctx, env, restCfg, cfg, rc, r.binary, pr); err != nil {
				return failed("restarting the operator as a process", err)
			}
		}
		if !sc.restart {
			if op, err = startOperator(ctx, restCfg, cfg); err != nil {
				return failed("starting the operator again", err)
			}
		}
	}
	if sc.restart && claimed >= sc.twins {
		if op, err = restartOperator(ctx, restCfg, cfg, sc, &res.Restart); err != nil {
			return failed("restarting the operator", err)
		}
		// The stopped operator must be garbage now, so that the samples
		// after this are the running operator's.
		took, ok := waitCollected(started[0], 30*time.Second)
		res.Restart.StoppedCollected, res.Restart.StoppedCollectedSec = ok, took.Seconds()
		if ok {
			progress("scale: the stopped operator's manager and cache were collected %.1fs after the restart", took.Seconds())
		} else {
			progress("scale: the stopped operator's manager or cache is still reachable %.0fs after the restart: its memory is counted below", took.Seconds())
		}
		sample("operator restarted")
		writeHeapProfile(sc.profile, "restarted")
	}

	// 2c. Idle twins: the bridge drops their working state after
	// --bridge-idle-state-ttl; no device is connected yet, so every twin
	// is idle once that has passed.
	if cfg.idleStateTTL > 0 && claimed >= sc.twins {
		progress("scale: waiting for the bridge to drop idle twins' state (--bridge-idle-state-ttl %s)", cfg.idleStateTTL)
		t0 := time.Now()
		deadline := t0.Add(cfg.idleStateTTL + 3*time.Minute)
		n := bridgeTwinsInMemory() - stoppedInMemory
		for n > 0 && time.Now().Before(deadline) && ctx.Err() == nil {
			time.Sleep(5 * time.Second)
			n = bridgeTwinsInMemory() - stoppedInMemory
		}
		res.IdleDroppedSec = time.Since(t0).Seconds()
		res.IdleTwinsInMemory = n
		progress("scale: %.0f twins' working state in memory %.0fs later", n, res.IdleDroppedSec)
		sample("idle twins dropped")
		writeHeapProfile(sc.profile, "idle")
	}

	// 3. Queries.
	if err := qapi.register(ctx, restCfg); err != nil {
		return failed("queries", err)
	}
	if err := runScaleQueries(ctx, env, op.service, cfg, sc, res); err != nil {
		return failed("queries", err)
	}

	// 4. Devices.
	var dp *deviceProc
	if sc.devices > 0 {
		dp, err = runScaleDevices(ctx, op, cfg, sc, res)
		if dp != nil {
			// The operator stops first, so the devices' goodbyes cost no
			// status writes (as in run).
			defer func() {
				op.stop()
				progress("closing the devices")
				_ = dp.shutdown()
			}()
		}
		if err != nil {
			return failed("devices", err)
		}
		sample("devices connected, after the report window")
	}
	res.OperatorErrorLogs = opLog.lines.Load()

	derive(res)
	res.TotalSec = time.Since(benchStart).Seconds()
	printScale(res)
	if res.WrongAnswers > 0 || res.ReportErrors > 0 {
		progress("FAIL: %d wrong query answers, %d failed reports", res.WrongAnswers, res.ReportErrors)
		return 1
	}
	return 0
}

// scaleTwinName is twin i of the fleet; the devices are the first ones,
// named as the device process names them.
func scaleTwinName(i int) string { return twinName("dev-", i) }

// createScaleFleet creates the fleet: twin i has queryTwinDocs(i)'s tags,
// mirrored into labels as the operator would (so the selective query
// pushes down to a label selector over ~1% of the twins).
func createScaleFleet(ctx context.Context, k8s client.Client, sc scaleConfig) error {
	n := sc.twins
	progress("scale: creating %d twins in namespace %s, %d at a time", n, scaleNS, sc.createParallel)
	start := time.Now()
	var done atomic.Int64
	defer reportEvery(10*time.Second, func() {
		d := done.Load()
		progress("  twins: %d/%d created (%.0f/s)", d, n, float64(d)/time.Since(start).Seconds())
	})()
	err := forEachParallel(ctx, n, sc.createParallel, func(i int) error {
		tags, _, _ := queryTwinDocs(i)
		t := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: scaleNS, Name: scaleTwinName(i), Labels: twin.MirrorLabels(tags)}}
		t.Spec.Tags = &apiextensionsv1.JSON{Raw: twin.Encode(tags)}
		if err := k8s.Create(ctx, t); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("creating %s/%s: %w", scaleNS, t.Name, err)
		}
		done.Add(1)
		return nil
	})
	if err != nil {
		return err
	}
	el := time.Since(start)
	progress("  twins: %d created in %.1fs (%.0f/s)", n, el.Seconds(), float64(n)/el.Seconds())
	return nil
}

// waitClaimCount waits until the claims namespace holds n claims (only
// the fleet's twins make claims). A one-item list carries the remaining
// count, so polling does not list 100,000 objects each time.
func waitClaimCount(ctx context.Context, k8s client.Client, n int, timeout time.Duration) (int, error) {
	start := time.Now()
	lastLog := start
	for {
		var l v1alpha1.DeviceIDClaimList
		if err := k8s.List(ctx, &l, client.InNamespace(kubetwin.DefaultClaimsNamespace), client.Limit(1)); err != nil {
			return 0, err
		}
		got := len(l.Items)
		if l.RemainingItemCount != nil {
			got += int(*l.RemainingItemCount)
		}
		if got >= n {
			progress("scale: %d device ids claimed %.1fs after the wait began", got, time.Since(start).Seconds())
			return got, nil
		}
		if time.Since(start) > timeout {
			return got, nil
		}
		if time.Since(lastLog) >= 10*time.Second {
			lastLog = time.Now()
			w, _ := statusWrites()
			progress("  %d/%d device ids claimed, %d status writes (%.0fs)", got, n, w, time.Since(start).Seconds())
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(time.Second):
		}
	}
}

// waitWritesQuiet waits until the operator has written no status for
// quiet and returns when the last write was seen.
func waitWritesQuiet(ctx context.Context, quiet, timeout time.Duration) time.Time {
	deadline := time.Now().Add(timeout)
	last, _ := statusWrites()
	lastChange := time.Now()
	for time.Now().Before(deadline) && ctx.Err() == nil {
		time.Sleep(250 * time.Millisecond)
		if n, _ := statusWrites(); n != last {
			last, lastChange = n, time.Now()
		}
		if time.Since(lastChange) >= quiet {
			break
		}
	}
	return lastChange
}

// runScaleQueries times the plugin (a process per run) and the service API.
func runScaleQueries(ctx context.Context, env *envtest.Environment, svc *serviceAPI, cfg config, sc scaleConfig, res *scaleResults) error {
	res.Selective, res.Residual = querySelective, queryResidual
	for i := 0; i < sc.twins; i++ {
		if tags, _, _ := queryTwinDocs(i); tags["location"].(twin.Doc)["plant"] == queryPlant {
			res.SelectiveExpected++
		}
	}
	tmp, err := os.MkdirTemp("", "kubetwin-bench-scale-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	plugin := filepath.Join(tmp, "kubectl-twin")
	if err := buildPlugin(ctx, plugin); err != nil {
		return err
	}
	kubeconfig, err := adminKubeconfig(env, tmp, "bench-scale")
	if err != nil {
		return err
	}
	// The same user's kubeconfig with disable-compression: the plugin does
	// not accept gzip, and the query API's answers come as they are.
	uncompressed, err := uncompressedKubeconfig(kubeconfig)
	if err != nil {
		return err
	}
	type timed struct {
		name  string
		want  int // -1: any
		run   func() (time.Duration, int, error)
		ms    *float64
		n     *int
		pages *int // the full query's
		once  bool // one run says enough
	}
	// --via api fails rather than list when the query API does not
	// answer, so each row is timed the way it says.
	// The plugin is timed from its start to its exit, not counting the
	// check of its output here.
	plugWithConfig := func(bin, kc, q, via, output string) func() (time.Duration, int, error) {
		return func() (time.Duration, int, error) {
			d, out, err := timeProcess(ctx, bin, []string{"query", q, "-o", output, "--via", via, "--kubeconfig", kc, "-n", scaleNS})
			if err != nil {
				return d, 0, err
			}
			if output != "json" {
				// A row per twin after the header.
				return d, max(0, bytes.Count(out, []byte("\n"))-1), nil
			}
			ids, err := pluginIDs(out)
			return d, len(ids), err
		}
	}
	plugWith := func(bin, q, via, output string) func() (time.Duration, int, error) {
		return plugWithConfig(bin, kubeconfig, q, via, output)
	}
	plug := func(q, via string) func() (time.Duration, int, error) { return plugWith(plugin, q, via, "json") }
	svcQ := func(q string, pages *int) func() (time.Duration, int, error) {
		return func() (time.Duration, int, error) {
			start := time.Now()
			code, ids, p, body, err := svc.query(ctx, q)
			d := time.Since(start)
			if err == nil && code != http.StatusOK {
				err = fmt.Errorf("status %d: %s", code, clipBody(body))
			}
			if pages != nil {
				*pages = p
			}
			return d, len(ids), err
		}
	}
	// The residual query matches no twin here (the devices report no
	// temperature), but it must read every one of them to say so.
	runs := []timed{
		{"kubectl twin query (selective)", res.SelectiveExpected, plug(querySelective, "api"), &res.PluginSelectiveMs, &res.PluginSelectiveN, nil, false},
		{"kubectl twin query --via list (selective)", res.SelectiveExpected, plug(querySelective, "list"), &res.ListSelectiveMs, &res.ListSelectiveN, nil, false},
		{"service API query (selective)", res.SelectiveExpected, svcQ(querySelective, nil), &res.ServiceSelectiveMs, &res.ServiceSelectiveN, nil, false},
		{"kubectl twin query (residual)", 0, plug(queryResidual, "api"), &res.PluginResidualMs, &res.PluginResidualN, nil, false},
		{"kubectl twin query --via list (residual)", 0, plug(queryResidual, "list"), &res.ListResidualMs, &res.ListResidualN, nil, false},
		{"service API query (residual)", 0, svcQ(queryResidual, nil), &res.ServiceResidualMs, &res.ServiceResidualN, nil, false},
	}
	if sc.fullQuery {
		runs = append(runs, timed{"service API query (SELECT *, pages of 100)", sc.twins, svcQ(serviceFullQuery, &res.ServiceFullPages), &res.ServiceFullMs, &res.ServiceFullN, &res.ServiceFullPages, true},
			timed{"kubectl twin query (SELECT *)", sc.twins, plug(serviceFullQuery, "api"), &res.PluginFullMs, &res.PluginFullN, nil, false},
			timed{"kubectl twin query (SELECT *), uncompressed", sc.twins, plugWithConfig(plugin, uncompressed, serviceFullQuery, "api", "json"),
				&res.PluginFullUncompressedMs, &res.PluginFullN, nil, false},
			timed{"kubectl twin query -o table (SELECT *)", sc.twins, plugWith(plugin, serviceFullQuery, "api", "table"), &res.PluginFullTableMs, &res.PluginFullTableN, nil, false},
			timed{"kubectl twin query (projection of the whole fleet)", sc.twins, plug(fullProjection, "api"), &res.PluginProjectionMs, &res.PluginProjectionN, nil, false},
			timed{"kubectl twin query (projection of the whole fleet), uncompressed", sc.twins, plugWithConfig(plugin, uncompressed, fullProjection, "api", "json"),
				&res.PluginProjectionUncompressedMs, &res.PluginProjectionN, nil, false},
			timed{"kubectl twin query -o table (projection of the whole fleet)", sc.twins, plugWith(plugin, fullProjection, "api", "table"), &res.PluginProjectionTableMs, &res.PluginProjectionTableN, nil, false},
			timed{"kubectl twin query -o table (GROUP BY over the whole fleet)", -1, plugWith(plugin, fleetGroups, "api", "table"), &res.PluginGroupsMs, &res.PluginGroupsN, nil, false})
		if sc.pluginBaseline != "" {
			runs = append(runs, timed{"kubectl twin query (SELECT *), --scale-plugin-baseline", sc.twins, plugWith(sc.pluginBaseline, serviceFullQuery, "api", "json"),
				&res.BaselineFullMs, &res.BaselineFullN, nil, false},
				timed{"kubectl twin query (SELECT *), again", sc.twins, plug(serviceFullQuery, "api"), &res.PluginFullAgainMs, &res.PluginFullN, nil, false},
				timed{"kubectl twin query (projection of the whole fleet), --scale-plugin-baseline", sc.twins, plugWith(sc.pluginBaseline, fullProjection, "api", "json"),
					&res.BaselineProjectionMs, &res.BaselineProjectionN, nil, false},
				timed{"kubectl twin query -o table (projection of the whole fleet), --scale-plugin-baseline", sc.twins, plugWith(sc.pluginBaseline, fullProjection, "api", "table"),
					&res.BaselineProjectionTableMs, &res.BaselineProjectionTableN, nil, false})
		}
		runs = append(runs, timed{"kubectl twin query --via list (SELECT *)", sc.twins, plug(serviceFullQuery, "list"), &res.ListFullMs, &res.ListFullN, nil, true})
	}
	if res.Claimed < sc.twins {
		// The service API answers only twins whose device id is claimed:
		// with the start-up unfinished, that is a part of the fleet.
		for i := range runs {
			if strings.HasPrefix(runs[i].name, "service") {
				runs[i].want = -1
			}
		}
	}
	// Warm-up: the plugin's binary and discovery, the service's connections.
	for _, r := range runs[:3] {
		if _, _, err := r.run(); err != nil {
			return fmt.Errorf("%s: %w", r.name, err)
		}
	}
	for _, r := range runs {
		var times []time.Duration
		reps := sc.queryReps
		if r.once {
			reps = 1 // the full fleet: one run says enough
		}
		for k := 0; k < reps; k++ {
			d, n, err := r.run()
			if err != nil {
				return fmt.Errorf("%s: %w", r.name, err)
			}
			times = append(times, d)
			*r.n = n
			if r.want >= 0 && n != r.want {
				res.WrongAnswers++
				progress("  WRONG ANSWER: %s returned %d twins, want %d", r.name, n, r.want)
			}
		}
		slices.Sort(times)
		*r.ms = ms(percentile(times, 50))
		progress("scale: %s: %d twins, median %.0f ms of %d (%v)", r.name, *r.n, *r.ms, len(times), times)
	}
	return nil
}

// runScaleDevices connects the devices, waits for the presence writes to
// settle, then measures reports at sc.reportRate in total.
func runScaleDevices(ctx context.Context, op *operator, cfg config, sc scaleConfig, res *scaleResults) (*deviceProc, error) {
	n := min(sc.devices, sc.twins)
	res.Devices, res.OfferedPerSec = n, sc.reportRate
	rate := sc.reportRate / float64(n)
	inflight := max(1, int(rate*cfg.requestTimeout.Seconds()+0.999))
	w0, _ := statusWrites()
	start := time.Now()
	dp, err := startDeviceProc(childConfig{
		BrokerURL: op.brokerURL, Devices: n, ConnectParallel: cfg.connectParallel,
		RequestTimeout: cfg.requestTimeout, Rate: rate, Inflight: inflight,
		Warmup: sc.warmup, Duration: sc.duration, DrainTimeout: cfg.drainTimeout,
		DeviceLogLimit: cfg.deviceLogLimit, StartUnixNano: benchStart.UnixNano(),
	})
	if err != nil {
		return nil, err
	}
	devicePID.Store(int64(dp.cmd.Process.Pid))
	var connected childMsg
	if err := dp.next(ctx, msgConnected, 30*time.Minute, &connected); err != nil {
		return dp, fmt.Errorf("connecting: %w", err)
	}
	res.ConnectSec = time.Since(start).Seconds()
	// Each connection is a presence change the operator writes: the
	// report window starts once those writes are done.
	last := waitWritesQuiet(ctx, sc.quiet, sc.settleTimeout)
	res.ConnectSettleSec = last.Sub(start).Seconds()
	w1, _ := statusWrites()
	res.ConnectWrites = w1 - w0
	progress("scale: %d devices connected in %.1fs; presence written by %.1fs (%d status writes)", n, res.ConnectSec, res.ConnectSettleSec, res.ConnectWrites)

	rcfg := cfg
	rcfg.devices, rcfg.rate, rcfg.inflight, rcfg.warmup, rcfg.duration = n, rate, inflight, sc.warmup, sc.duration
	var r results
	sum, err := runReportsPhase(ctx, dp, rcfg, &r)
	if err != nil {
		return dp, err
	}
	res.ReportsPerSec, res.WritesPerSec = r.ReportsPerSec, r.WritesPerSec
	res.ReportErrors, res.ReportsSkipped = sum.Errors, sum.Skipped
	res.P50Ms, res.P99Ms, res.MaxMs = sum.P50Ms, sum.P99Ms, sum.MaxMs
	res.ReportCPU = r.CPUReports
	return dp, nil
}

// derive computes the sizing figures from the last memory sample and the
// report window.
func derive(r *scaleResults) {
	if len(r.Mem) == 0 {
		return
	}
	// After the operator settled: the fleet at rest, devices not yet there.
	m := r.Mem[min(1, len(r.Mem)-1)]
	if m.APIServerMiB > 0 {
		r.TwinsPerGiBAPI = float64(r.Twins) / (m.APIServerMiB / 1024)
	}
	if m.OperatorMiB > 0 {
		r.TwinsPerGiBOperator = float64(r.Twins) / (m.OperatorMiB / 1024)
	}
	if c := r.ReportCPU["kube_apiserver"]; c > 0 {
		r.ReportsPerAPICore = r.ReportsPerSec / c
	}
	if c := r.ReportCPU["operator"]; c > 0 {
		r.ConnsPerOpCore = float64(r.Devices) / c
	}
}

func printScale(r *scaleResults) {
	w := os.Stdout
	row := func(name, value string) { fmt.Fprintf(w, "  %-50s %s\n", name, value) }
	line := func() {
		fmt.Fprintln(w, "  ----------------------------------------------------------------------------")
	}
	fmt.Fprintln(w)
	fmt.Fprintf(w, "kubetwin bench-scale: %d twins, %s, %d cores, %.0f GiB\n", r.Twins, r.Date, r.Cores, r.MemTotalGiB)
	line()
	row("twins created", fmt.Sprintf("%d in %.0fs = %.0f/s", r.Twins, r.CreateSec, r.CreatePerSec))
	row("  CPU cores meanwhile", r.CreateCPU)
	row("operator's Go soft memory limit", fmt.Sprintf("%s (%s)", memoryLimitString(r.MemoryLimit), r.MemoryLimitFrom))
	for _, m := range r.Mem {
		row("RSS, "+m.At, fmt.Sprintf("kube-apiserver %.0f MiB, etcd %.0f MiB, operator %.0f MiB, devices %.0f MiB",
			m.APIServerMiB, m.EtcdMiB, m.OperatorMiB, m.DevicesMiB))
		row("  operator Go heap", fmt.Sprintf("in use %.0f MiB; after GC %.0f MiB (live %.0f), RSS then %.0f MiB; GC %.1f%% of its CPU since the last sample",
			m.OperatorHeapInUseMiB, m.OperatorHeapMiB, m.OperatorHeapLiveMiB, m.OperatorRSSAfterGC, m.OperatorGCCPUPct))
		row("  etcd database", fmt.Sprintf("%.0f MiB (%.0f MiB in use)", m.EtcdDBMiB, m.EtcdDBInUseMiB))
	}
	line()
	row("operator start -> cache synced", fmt.Sprintf("%.1fs", r.CacheSyncSec))
	if r.Claimed < r.Twins {
		row("operator start -> device ids claimed", fmt.Sprintf("only %d of %d after %.1fs (--scale-settle-timeout)", r.Claimed, r.Twins, r.ClaimedSec))
	} else {
		row("operator start -> every device id claimed", fmt.Sprintf("%.1fs", r.ClaimedSec))
		row("operator start -> last start-up status write", fmt.Sprintf("%.1fs", r.SettledSec))
	}
	row("start-up status writes (operator)", fmt.Sprintf("%d (%d failed)", r.StartWrites, r.StartWriteErr))
	row("start-up API server writes", r.StartAPI.String())
	row("start-up reconciles", fmt.Sprintf("%.0f", r.StartRecs))
	row("  CPU cores meanwhile", r.StartCPU)
	for _, pr := range r.ProcessRestart {
		line()
		row("restart as a fresh process", pr.Binary)
		if pr.Cgroup != "" {
			row("  memory cgroup limit", fmt.Sprintf("%.0f MiB (%s)", pr.CgroupLimitMiB, pr.Cgroup))
		} else {
			row("  memory cgroup limit", "none (not root, or no memory controller): memory measured, not limited")
		}
		row("  start -> caches synced (broker listening)", fmt.Sprintf("%.1fs", pr.CacheSyncSec))
		if pr.Reached {
			row("  start -> every twin reconciled", fmt.Sprintf("%.1fs (%.0f reconciles, %.0f/s after the sync, %.0f errors)", pr.ReconciledSec, pr.Reconciles, pr.PerSec, pr.ReconcileErrs))
		} else {
			row("  start -> every twin reconciled", fmt.Sprintf("NOT reached (%.0f reconciles)", pr.Reconciles))
		}
		row("  peak RSS / cgroup peak / OOM kills", fmt.Sprintf("%.0f MiB / %.0f MiB / %d", pr.PeakRSSMiB, pr.CgroupPeakMiB, pr.OOMKills))
		row("  then: RSS, Go heap in use / allocated", fmt.Sprintf("%.0f MiB, %.0f / %.0f MiB", pr.RSSMiB, pr.HeapInuseMiB, pr.HeapAllocMiB))
		row("  CPU, GC cycles, GC share of the CPU", fmt.Sprintf("%.1f s, %.0f, %.0f%%", pr.CPUSec, pr.GCCycles, pr.GCCPUPct))
		row("  status writes (operator) / API server writes", fmt.Sprintf("%.0f / %s", pr.StatusWrites, pr.API.String()))
		row("  exit", pr.Exit)
	}
	if rs := r.Restart; rs.CacheSyncSec > 0 {
		line()
		row("restart -> cache synced", fmt.Sprintf("%.1fs", rs.CacheSyncSec))
		if rs.Reached {
			row("restart -> every twin reconciled", fmt.Sprintf("%.1fs", rs.ReconciledSec))
		} else {
			row("restart -> every twin reconciled", "not reached (--scale-settle-timeout)")
		}
		row("restart reconciles", fmt.Sprintf("%.0f (%.0f/s after the sync, mean %.2f ms, %.0f errors)", rs.Reconciles, rs.PerSec, rs.MeanMs, rs.ReconcileErrs))
		row("restart status writes (operator)", strconv.FormatInt(rs.StatusWrites, 10))
		row("restart API server writes", rs.API.String())
		row("  CPU cores meanwhile", rs.CPU)
		if rs.StoppedCollected {
			row("stopped operator garbage collected", fmt.Sprintf("yes, %.1fs after the restart", rs.StoppedCollectedSec))
		} else {
			row("stopped operator garbage collected", fmt.Sprintf("NO: still reachable %.0fs after the restart (counted in the RSS after it)", rs.StoppedCollectedSec))
		}
	}
	if r.IdleDroppedSec > 0 {
		row("idle twins' bridge state dropped", fmt.Sprintf("%.0f twins left in memory %.0fs after the wait began", r.IdleTwinsInMemory, r.IdleDroppedSec))
	}
	line()
	row(fmt.Sprintf("selective query (%d expected)", r.SelectiveExpected), r.Selective[len("SELECT * FROM devices WHERE "):])
	row("  kubectl twin query -o json (query API)", fmt.Sprintf("%.0f ms (%d twins)", r.PluginSelectiveMs, r.PluginSelectiveN))
	row("  kubectl twin query -o json --via list", fmt.Sprintf("%.0f ms (%d twins)", r.ListSelectiveMs, r.ListSelectiveN))
	row("  service API, pages of 100", fmt.Sprintf("%.0f ms (%d twins)", r.ServiceSelectiveMs, r.ServiceSelectiveN))
	row("residual query (reads every twin)", r.Residual[len("SELECT * FROM devices WHERE "):])
	row("  kubectl twin query -o json (query API)", fmt.Sprintf("%.0f ms (%d twins)", r.PluginResidualMs, r.PluginResidualN))
	row("  kubectl twin query -o json --via list", fmt.Sprintf("%.0f ms (%d twins)", r.ListResidualMs, r.ListResidualN))
	row("  service API", fmt.Sprintf("%.0f ms (%d twins)", r.ServiceResidualMs, r.ServiceResidualN))
	if r.ServiceFullPages > 0 {
		row("service API SELECT * (whole fleet)", fmt.Sprintf("%.0f ms (%d twins, %d pages)", r.ServiceFullMs, r.ServiceFullN, r.ServiceFullPages))
		row("  kubectl twin query -o json (query API)", fmt.Sprintf("%.0f ms (%d twins)", r.PluginFullMs, r.PluginFullN))
		row("    uncompressed (kubeconfig disable-compression)", fmt.Sprintf("%.0f ms", r.PluginFullUncompressedMs))
		row("  kubectl twin query -o table (query API)", fmt.Sprintf("%.0f ms (%d rows)", r.PluginFullTableMs, r.PluginFullTableN))
		if r.BaselineFullN > 0 {
			row("  --scale-plugin-baseline -o json, then current again", fmt.Sprintf("%.0f ms (%d twins), %.0f ms", r.BaselineFullMs, r.BaselineFullN, r.PluginFullAgainMs))
		}
		row("  kubectl twin query -o json --via list", fmt.Sprintf("%.0f ms (%d twins)", r.ListFullMs, r.ListFullN))
		row("  projection "+fullProjection[len("SELECT "):len(fullProjection)-len(" FROM devices")], fmt.Sprintf("%.0f ms (%d rows, -o json, query API)", r.PluginProjectionMs, r.PluginProjectionN))
		row("    uncompressed (kubeconfig disable-compression)", fmt.Sprintf("%.0f ms", r.PluginProjectionUncompressedMs))
		row("    -o table", fmt.Sprintf("%.0f ms (%d rows)", r.PluginProjectionTableMs, r.PluginProjectionTableN))
		if r.BaselineProjectionN > 0 {
			row("    --scale-plugin-baseline -o json, -o table", fmt.Sprintf("%.0f ms (%d rows), %.0f ms (%d rows)",
				r.BaselineProjectionMs, r.BaselineProjectionN, r.BaselineProjectionTableMs, r.BaselineProjectionTableN))
		}
		row("  GROUP BY tags.location.plant, COUNT()", fmt.Sprintf("%.0f ms (%d rows, table, query API)", r.PluginGroupsMs, r.PluginGroupsN))
	}
	row("wrong query answers", strconv.Itoa(r.WrongAnswers))
	line()
	if r.Devices > 0 {
		row("devices connected", fmt.Sprintf("%d in %.0fs; presence written by %.0fs (%d status writes)", r.Devices, r.ConnectSec, r.ConnectSettleSec, r.ConnectWrites))
		row("reports offered / stored", fmt.Sprintf("%.0f/s / %.0f/s (%d failed, %d skipped); status writes %.0f/s", r.OfferedPerSec, r.ReportsPerSec, r.ReportErrors, r.ReportsSkipped, r.WritesPerSec))
		row("report -> 204 p50 / p99 / max", fmt.Sprintf("%.1f / %.1f / %.1f ms", r.P50Ms, r.P99Ms, r.MaxMs))
		row("  CPU cores meanwhile", coresString(r.ReportCPU))
		line()
	}
	row("twins per GiB of kube-apiserver RSS", fmt.Sprintf("%.0f", r.TwinsPerGiBAPI))
	row("twins per GiB of operator RSS", fmt.Sprintf("%.0f", r.TwinsPerGiBOperator))
	row("stored reports/s per kube-apiserver core", fmt.Sprintf("%.0f", r.ReportsPerAPICore))
	row("connected devices per operator core", fmt.Sprintf("%.0f", r.ConnsPerOpCore))
	row("operator error log lines", strconv.FormatInt(r.OperatorErrorLogs, 10))
	row("total time", fmt.Sprintf("%.0fs", r.TotalSec))
	fmt.Fprintln(w)
	b, _ := json.Marshal(r)
	fmt.Fprintln(w, string(b))
}

// apiWrites are the API server's mutating requests by resource.
type apiWrites map[string]float64

func (a apiWrites) minus(b apiWrites) apiWrites {
	out := apiWrites{}
	for k, v := range a {
		if d := v - b[k]; d > 0 {
			out[k] = d
		}
	}
	return out
}

func (a apiWrites) String() string {
	keys := make([]string, 0, len(a))
	total := 0.0
	for k, v := range a {
		keys = append(keys, k)
		total += v
	}
	slices.Sort(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s %.0f", k, a[k]))
	}
	return fmt.Sprintf("%.0f (%s)", total, strings.Join(parts, ", "))
}

// apiserverWrites reads apiserver_request_total and sums the mutating
// verbs by "resource[/subresource] VERB".
func apiserverWrites(restCfg *rest.Config) (apiWrites, error) {
	hc, err := rest.HTTPClientFor(restCfg)
	if err != nil {
		return nil, err
	}
	out := apiWrites{}
	err = eachSample(hc, strings.TrimSuffix(restCfg.Host, "/")+"/metrics", func(name, line string, v float64) {
		if name != "apiserver_request_total" {
			return
		}
		labels := promLabels(line)
		switch labels["verb"] {
		case "POST", "PUT", "PATCH", "DELETE", "APPLY":
		default:
			return
		}
		key := labels["resource"]
		if s := labels["subresource"]; s != "" {
			key += "/" + s
		}
		out[key+" "+labels["verb"]] += v
	})
	return out, err
}

// eachSample reads a Prometheus text exposition from url and calls f with
// each sample's metric name, its whole line (for promLabels) and value.
func eachSample(hc *http.Client, url string, f func(name, line string, value float64)) error {
	resp, err := hc.Get(url)
	if err != nil {
		return err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		l := sc.Text()
		if l == "" || l[0] == '#' {
			continue
		}
		name := l
		if i := strings.IndexAny(l, "{ "); i >= 0 {
			name = l[:i]
		}
		v, err := strconv.ParseFloat(l[strings.LastIndexByte(l, ' ')+1:], 64)
		if err != nil {
			continue
		}
		f(name, l, v)
	}
	return sc.Err()
}

// promLabels parses the labels of one Prometheus text sample line (the
// values here hold no escaped quotes).
func promLabels(l string) map[string]string {
	out := map[string]string{}
	open, end := strings.IndexByte(l, '{'), strings.LastIndexByte(l, '}')
	if open < 0 || end < open {
		return out
	}
	for _, kv := range strings.Split(l[open+1:end], ",") {
		k, v, ok := strings.Cut(kv, "=")
		if ok {
			out[k] = strings.Trim(v, `"`)
		}
	}
	return out
}

// sampleMem reads the RSS of kube-apiserver and etcd (children of this
// process), this process (the operator and broker; the bench's own
// clients are small beside them) and the device process, and etcd's
// database size from its metrics.
func sampleMem(env *envtest.Environment, at string) memSample {
	m := memSample{At: at}
	cpu := readGCCPU()
	m.OperatorGCCPUPct = cpu.shareSince(lastGCCPU)
	m.OperatorMiB = rssMiB(os.Getpid())
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	m.OperatorHeapInUseMiB = float64(ms.HeapInuse) / (1 << 20)
	// The heap that is live, not what awaits collection, and the RSS
	// once the free pages are returned.
	debug.FreeOSMemory()
	runtime.ReadMemStats(&ms)
	m.OperatorHeapMiB = float64(ms.HeapInuse) / (1 << 20)
	m.OperatorHeapLiveMiB = float64(ms.HeapAlloc) / (1 << 20)
	m.OperatorRSSAfterGC = rssMiB(os.Getpid())
	// The forced collection is not the operator's GC work.
	lastGCCPU = readGCCPU()
	if pid := int(devicePID.Load()); pid > 0 {
		m.DevicesMiB = rssMiB(pid)
	}
	m.APIServerMiB, m.EtcdMiB = childRSS("kube-apiserver"), childRSS("etcd")
	if env.ControlPlane.Etcd != nil && env.ControlPlane.Etcd.URL != nil {
		m.EtcdDBMiB, m.EtcdDBInUseMiB = etcdDBSize(env.ControlPlane.Etcd.URL.String())
	}
	return m
}

// lastGCCPU is the CPU accounting at the last memory sample (or the start).
var lastGCCPU = readGCCPU()

// rssMiB is VmRSS of pid in MiB (0 when unknown).
func rssMiB(pid int) float64 { return procStatusMiB(pid, "VmRSS:") }

// etcdDBSize reads etcd_mvcc_db_total_size_in_bytes and ..._in_use_in_bytes.
func etcdDBSize(base string) (total, inUse float64) {
	hc := &http.Client{Timeout: 10 * time.Second}
	resp, err := hc.Get(strings.TrimSuffix(base, "/") + "/metrics")
	if err != nil {
		progress("etcd metrics: %v", err)
		return 0, 0
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) != 2 {
			continue
		}
		v, _ := strconv.ParseFloat(f[1], 64)
		switch f[0] {
		case "etcd_mvcc_db_total_size_in_bytes":
			total = v / (1 << 20)
		case "etcd_mvcc_db_total_size_in_use_in_bytes":
			inUse = v / (1 << 20)
		}
	}
	return total, inUse
}

// memoryGuard cancels the run when MemAvailable falls under minMiB: a
// swapping machine measures nothing, and the fleet size is what fills it.
func memoryGuard(ctx context.Context, cancel context.CancelCauseFunc, minMiB int) {
	t := time.NewTicker(2 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if avail := memInfoMiB("MemAvailable:"); avail > 0 && avail < float64(minMiB) {
			err := fmt.Errorf("stopped: MemAvailable %.0f MiB is under --scale-min-available %d MiB (kube-apiserver %.0f MiB)",
				avail, minMiB, childRSS("kube-apiserver"))
			progress("%v", err)
			cancel(err)
			return
		}
	}
}

// childRSS is the RSS of this process's children named comm, in MiB.
func childRSS(comm string) float64 {
	total := 0.0
	for _, c := range childProcs() {
		if c.comm == comm {
			total += rssMiB(c.pid)
		}
	}
	return total
}

func memInfoMiB(key string) float64 {
	raw, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(raw), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == key {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return 0
}

func memTotalGiB() float64 { return memInfoMiB("MemTotal:") / 1024 }

// bridgeTwinsInMemory reads the bridge's kubetwin_bridge_twins_in_memory
// gauge from the operator's registry (-1 when absent).
func bridgeTwinsInMemory() float64 {
	mfs, err := ctrlmetrics.Registry.Gather()
	if err != nil {
		return -1
	}
	for _, mf := range mfs {
		if mf.GetName() == "kubetwin_bridge_twins_in_memory" {
			for _, m := range mf.GetMetric() {
				return m.GetGauge().GetValue()
			}
		}
	}
	return -1
}
