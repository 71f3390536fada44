package main

// The restart as a pod restarts (--scale-restart-binary): the operator's
// own binary, started as a fresh process on the settled fleet, inside a
// memory cgroup limited as the chart limits its container
// (--scale-restart-memory, default resources.limits.memory). The
// in-process restart (2b) inherits this process's heap, its garbage
// collector's state and the bench's own allocations; a restarted pod
// starts from an empty heap, under a limit the kernel enforces (the
// operator sets its Go soft limit to 90% of it by itself, as in the pod).

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	kubetwin "github.com/kubetwin/kubetwin/internal/operator"
)

// processRestartResults are the numbers of the fresh-process restart.
type processRestartResults struct {
	Binary string `json:"binary"`
	// Cgroup is the memory cgroup the process ran in ("" when none could
	// be made: not root, or no memory controller), CgroupLimitMiB its limit.
	Cgroup         string  `json:"cgroup,omitempty"`
	CgroupLimitMiB float64 `json:"cgroup_limit_mib,omitempty"`
	// CacheSyncSec is start -> the embedded broker listening, which the
	// manager starts once its caches have synced.
	CacheSyncSec  float64 `json:"cache_sync_sec"`
	ReconciledSec float64 `json:"all_reconciled_sec"`
	Reached       bool    `json:"all_reconciled"`
	Reconciles    float64 `json:"reconciles"`
	ReconcileErrs float64 `json:"reconcile_errors"`
	PerSec        float64 `json:"reconciles_per_sec"`
	// PeakRSSMiB is the process's VmHWM; CgroupPeakMiB the cgroup's
	// highest charge (RSS and the page cache the kernel charges to it).
	PeakRSSMiB    float64 `json:"peak_rss_mib"`
	CgroupPeakMiB float64 `json:"cgroup_peak_mib,omitempty"`
	// OOMKills counts the kernel's OOM kills in the cgroup; a killed
	// operator does not reach every twin.
	OOMKills int `json:"oom_kills"`
	// At the end (every twin reconciled): RSS, and the Go heap in use and
	// allocated as the process's own metrics say.
	RSSMiB       float64 `json:"rss_mib"`
	HeapInuseMiB float64 `json:"heap_inuse_mib"`
	HeapAllocMiB float64 `json:"heap_alloc_mib"`
	GCCycles     float64 `json:"gc_cycles"`
	// GCCPUPct is the garbage collector's share of the process's CPU time
	// from start to every twin reconciled.
	GCCPUPct     float64   `json:"gc_cpu_pct"`
	CPUSec       float64   `json:"cpu_sec"`
	StatusWrites float64   `json:"status_writes"`
	API          apiWrites `json:"api_writes"`
	Exit         string    `json:"exit"`
}

// processRestart runs the operator binary on the settled fleet until every
// twin is reconciled, then --scale-quiet more (writes sent late are
// counted), and stops it with SIGTERM.
func processRestart(ctx context.Context, env *envtest.Environment, restCfg *rest.Config, cfg config, sc scaleConfig, binary string, res *processRestartResults) (err error) {
	bin, err := filepath.Abs(binary)
	if err != nil {
		return err
	}
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("--scale-restart-binary: %w (make build writes bin/manager)", err)
	}
	res.Binary = bin
	tmp, err := os.MkdirTemp("", "kubetwin-bench-restart-")
	if err != nil {
		return err
	}
	defer func() { _ = os.RemoveAll(tmp) }()
	kubeconfig, err := adminKubeconfig(env, tmp, "bench-restart")
	if err != nil {
		return err
	}
	metricsAddr, brokerAddr, err := freeAddrs()
	if err != nil {
		return err
	}
	ttl := cfg.idleStateTTL
	args := []string{
		"--kubeconfig=" + kubeconfig,
		// As the bench's in-process operator: all namespaces, claims in
		// the default claims namespace, device keys as --scale-device-keys
		// says, plain MQTT only, no webhook, no service or query API.
		"--claims-namespace=" + kubetwin.DefaultClaimsNamespace,
		"--device-auth=" + map[bool]string{true: "sas", false: "none"}[cfg.deviceKeys],
		"--hub-hostname=" + serviceHub,
		"--metrics-bind-address=" + metricsAddr, "--metrics-secure=false",
		"--health-probe-bind-address=0",
		"--mqtt-bind-address=" + brokerAddr, "--mqtt-tls-bind-address=",
		"--service-api-bind-address=",
		"--disable-webhook",
		"--max-concurrent-reconciles=" + strconv.Itoa(cfg.workers),
		"--bridge-idle-state-ttl=" + ttl.String(),
		"--zap-log-level=error",
	}
	cg, err := newMemoryCgroup(int64(sc.restartMemory))
	if err != nil {
		progress("scale: no memory cgroup for the restarted operator (%v): its memory is measured, not limited", err)
	}
	if cg == nil {
		// The same soft limit the operator would take from the cgroup.
		args = append(args, "--memory-limit="+strconv.FormatInt(int64(sc.restartMemory)*9/10, 10))
	}
	var cmd *exec.Cmd
	if cg != nil {
		defer cg.remove()
		res.Cgroup, res.CgroupLimitMiB = cg.dir, float64(sc.restartMemory)/(1<<20)
		cmd = cg.command(bin, args...)
	} else {
		cmd = exec.Command(bin, args...)
		cmd.Env = os.Environ()
	}
	cmd.Env = withoutEnv(cmd.Env, "GOMEMLIMIT", "KUBECONFIG", "GOGC")
	logPath := filepath.Join(tmp, "operator.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer func() { _ = logFile.Close() }()
	cmd.Stdout, cmd.Stderr = logFile, logFile
	defer func() {
		if err != nil {
			if b, rerr := os.ReadFile(logPath); rerr == nil {
				progress("scale: the restarted operator's log (end):\n%s", tail(string(b), 4000))
			}
		}
	}()

	api0, err := apiserverWrites(restCfg)
	if err != nil {
		return fmt.Errorf("reading the API server's metrics: %w", err)
	}
	progress("scale: restarting the operator as a fresh process (%s) in %s", bin, cgDescr(cg, sc.restartMemory))
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	pid := cmd.Process.Pid
	var exitErr error
	gone := false
	stillRunning := func() bool {
		if gone {
			return false
		}
		select {
		case exitErr = <-exited:
			gone = true
			return false
		default:
			return true
		}
	}
	defer func() {
		if stillRunning() {
			_ = cmd.Process.Signal(syscall.SIGTERM)
			select {
			case exitErr = <-exited:
			case <-time.After(60 * time.Second):
				_ = cmd.Process.Kill()
				exitErr = <-exited
			}
			gone = true
		}
		res.Exit = "SIGTERM, exit 0"
		if exitErr != nil {
			res.Exit = exitErr.Error()
		}
		if cg != nil {
			res.CgroupPeakMiB, res.OOMKills = cg.peakMiB(), cg.oomKills()
		}
	}()
	// exitedEarly makes an operator that died (the kernel's OOM killer, a
	// crash) a result of the run, with the end of its log, not its end.
	exitedEarly := func(stage string) error {
		progress("scale: the restarted operator exited %s: %v", stage, exitErr)
		if b, rerr := os.ReadFile(logPath); rerr == nil {
			progress("scale: the restarted operator's log (end):\n%s", tail(string(b), 4000))
		}
		return nil
	}

	// Cache synced: the broker listens.
	for {
		c, err := net.DialTimeout("tcp", brokerAddr, time.Second)
		if err == nil {
			_ = c.Close()
			break
		}
		if !stillRunning() {
			return exitedEarly("before its caches synced")
		}
		if time.Since(start) > sc.settleTimeout {
			return fmt.Errorf("the operator's broker did not listen within %s", sc.settleTimeout)
		}
		if err := sleepCtx(ctx, 100*time.Millisecond); err != nil {
			return err
		}
	}
	synced := time.Now()
	res.CacheSyncSec = synced.Sub(start).Seconds()
	progress("scale: restarted operator process: broker listening (caches synced) %.1fs after start", res.CacheSyncSec)

	// Every twin reconciled: the DeviceTwin controller has done one
	// reconcile per twin and is idle.
	metricsURL := "http://" + metricsAddr + "/metrics"
	var m procMetrics
	for {
		if got, err := scrapeProcMetrics(metricsURL); err == nil {
			m = got
			if m.reconciles >= float64(sc.twins) && m.depth == 0 && m.active == 0 {
				res.Reached = true
				break
			}
		}
		if !stillRunning() {
			res.Reconciles, res.ReconcileErrs = m.reconciles, m.errors
			return exitedEarly(fmt.Sprintf("after %.0f reconciles", m.reconciles))
		}
		if time.Since(start) > sc.settleTimeout {
			progress("scale: the restarted operator did not reconcile every twin within %s (%.0f reconciles)", sc.settleTimeout, m.reconciles)
			break
		}
		if err := sleepCtx(ctx, 250*time.Millisecond); err != nil {
			return err
		}
	}
	if res.Reached {
		done := time.Now()
		res.ReconciledSec = done.Sub(start).Seconds()
		if el := done.Sub(synced).Seconds(); el > 0 {
			res.PerSec = m.reconciles / el
		}
	}
	res.Reconciles, res.ReconcileErrs = m.reconciles, m.errors
	res.RSSMiB, res.PeakRSSMiB = procStatusMiB(pid, "VmRSS:"), procStatusMiB(pid, "VmHWM:")
	res.HeapInuseMiB, res.HeapAllocMiB = m.heapInuse/(1<<20), m.heapAlloc/(1<<20)
	res.GCCycles, res.CPUSec = m.gcCycles, m.cpuSec
	if m.cpuSec > 0 {
		res.GCCPUPct = 100 * m.gcCPUSec / m.cpuSec
	}
	if err := sleepCtx(ctx, sc.quiet); err != nil {
		return err
	}
	if m2, err := scrapeProcMetrics(metricsURL); err == nil {
		res.StatusWrites = m2.statusWrites
	}
	api1, err := apiserverWrites(restCfg)
	if err != nil {
		return fmt.Errorf("reading the API server's metrics: %w", err)
	}
	res.API = api1.minus(api0)
	progress("scale: process restart: every twin reconciled %.1fs after start (%.0f reconciles, %.0f errors, %.0f/s); peak RSS %.0f MiB, cgroup peak %.0f MiB, OOM kills %d; GC %.0f%% of %.0f CPU s; API server writes: %s",
		res.ReconciledSec, res.Reconciles, res.ReconcileErrs, res.PerSec, res.PeakRSSMiB, cgPeakNow(cg), cgOOMNow(cg), res.GCCPUPct, res.CPUSec, res.API)
	return nil
}

// adminKubeconfig writes dir/kubeconfig for a new cluster administrator
// named user (a program started by the bench: kubectl, the plugin, the
// operator) and returns its path.
func adminKubeconfig(env *envtest.Environment, dir, user string) (string, error) {
	u, err := env.ControlPlane.AddUser(envtest.User{Name: user, Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return "", fmt.Errorf("adding a kubeconfig user: %w", err)
	}
	kc, err := u.KubeConfig()
	if err != nil {
		return "", fmt.Errorf("kubeconfig: %w", err)
	}
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, kc, 0o600); err != nil {
		return "", err
	}
	return kubeconfig, nil
}

// uncompressedKubeconfig writes a copy of the kubeconfig at path with
// disable-compression set on its clusters, and returns its path.
func uncompressedKubeconfig(path string) (string, error) {
	cfg, err := clientcmd.LoadFromFile(path)
	if err != nil {
		return "", err
	}
	for _, c := range cfg.Clusters {
		c.DisableCompression = true
	}
	out := path + "-uncompressed"
	return out, clientcmd.WriteToFile(*cfg, out)
}

// procMetrics is what the restarted operator's /metrics says.
type procMetrics struct {
	reconciles, errors, depth, active float64
	heapInuse, heapAlloc, gcCycles    float64
	cpuSec, gcCPUSec, statusWrites    float64
}

// scrapeProcMetrics reads the DeviceTwin controller's counters and the
// process's Go runtime figures from a Prometheus text endpoint.
func scrapeProcMetrics(url string) (procMetrics, error) {
	var m procMetrics
	hc := &http.Client{Timeout: 10 * time.Second}
	err := eachSample(hc, url, func(name, l string, v float64) {
		labels := promLabels(l)
		twinCtl := labels["controller"] == "devicetwin" || labels["name"] == "devicetwin"
		switch name {
		case "controller_runtime_reconcile_total":
			if twinCtl {
				m.reconciles += v
				if labels["result"] == "error" {
					m.errors += v
				}
			}
		case "workqueue_depth":
			if twinCtl {
				m.depth += v
			}
		case "controller_runtime_active_workers":
			if twinCtl {
				m.active += v
			}
		case "go_memstats_heap_inuse_bytes":
			m.heapInuse = v
		case "go_memstats_heap_alloc_bytes":
			m.heapAlloc = v
		case "go_gc_duration_seconds_count":
			m.gcCycles = v
		case "process_cpu_seconds_total":
			m.cpuSec = v
		case "go_cpu_classes_gc_total_cpu_seconds_total":
			m.gcCPUSec = v
		case "kubetwin_bridge_status_writes_total":
			m.statusWrites += v
		}
	})
	return m, err
}

// memoryCgroup is a memory cgroup made for one process (v1 or v2).
type memoryCgroup struct {
	dir string
	v2  bool
}

// newMemoryCgroup makes a memory cgroup limited to limit bytes under the
// machine's root memory cgroup.
func newMemoryCgroup(limit int64) (*memoryCgroup, error) {
	if limit <= 0 {
		return nil, errors.New("--scale-restart-memory 0")
	}
	name := fmt.Sprintf("kubetwin-bench-restart-%d-%d", os.Getpid(), time.Now().UnixNano())
	cg := &memoryCgroup{}
	limitFile := "memory.limit_in_bytes"
	switch {
	case fileExists("/sys/fs/cgroup/memory/memory.limit_in_bytes"):
		cg.dir = filepath.Join("/sys/fs/cgroup/memory", name)
	case controllerEnabled("/sys/fs/cgroup/cgroup.subtree_control", "memory"):
		cg.dir, cg.v2, limitFile = filepath.Join("/sys/fs/cgroup", name), true, "memory.max"
	default:
		return nil, errors.New("no cgroup memory controller at /sys/fs/cgroup")
	}
	if err := os.Mkdir(cg.dir, 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(cg.dir, limitFile), []byte(strconv.FormatInt(limit, 10)), 0o644); err != nil {
		cg.remove()
		return nil, err
	}
	return cg, nil
}

// command runs bin in the cgroup: a shell joins it, then becomes bin, so
// that every byte bin ever uses is charged there, as in a container.
func (cg *memoryCgroup) command(bin string, args ...string) *exec.Cmd {
	cmd := exec.Command("/bin/sh", append([]string{"-c", `echo $$ > "$KUBETWIN_BENCH_CGROUP_PROCS" && exec "$0" "$@"`, bin}, args...)...)
	cmd.Env = append(os.Environ(), "KUBETWIN_BENCH_CGROUP_PROCS="+filepath.Join(cg.dir, "cgroup.procs"))
	return cmd
}

// peakMiB is the cgroup's highest memory charge so far.
func (cg *memoryCgroup) peakMiB() float64 {
	file := "memory.max_usage_in_bytes"
	if cg.v2 {
		file = "memory.peak"
	}
	b, err := os.ReadFile(filepath.Join(cg.dir, file))
	if err != nil {
		return 0
	}
	v, _ := strconv.ParseFloat(strings.TrimSpace(string(b)), 64)
	return v / (1 << 20)
}

// oomKills is the kernel's count of OOM kills in the cgroup.
func (cg *memoryCgroup) oomKills() int {
	file := "memory.oom_control"
	if cg.v2 {
		file = "memory.events"
	}
	b, err := os.ReadFile(filepath.Join(cg.dir, file))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == "oom_kill" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}

// remove deletes the cgroup once its process has gone (the kernel refuses
// while one is in it).
func (cg *memoryCgroup) remove() {
	for range 50 {
		if err := os.Remove(cg.dir); err == nil || errors.Is(err, os.ErrNotExist) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	progress("scale: could not remove the cgroup %s", cg.dir)
}

func cgDescr(cg *memoryCgroup, limit byteQuantity) string {
	if cg == nil {
		return "no memory cgroup"
	}
	return fmt.Sprintf("memory cgroup %s limited to %s", cg.dir, memoryLimitString(int64(limit)))
}

func cgPeakNow(cg *memoryCgroup) float64 {
	if cg == nil {
		return 0
	}
	return cg.peakMiB()
}

func cgOOMNow(cg *memoryCgroup) int {
	if cg == nil {
		return 0
	}
	return cg.oomKills()
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func controllerEnabled(file, name string) bool {
	b, err := os.ReadFile(file)
	return err == nil && hasWord(string(b), name)
}

func hasWord(s, w string) bool {
	for _, f := range strings.Fields(s) {
		if f == w {
			return true
		}
	}
	return false
}

// procStatusMiB is a "kB" field of /proc/pid/status in MiB (0 if gone).
func procStatusMiB(pid int, field string) float64 {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(raw), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == field {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return 0
}

// freeAddrs picks two free loopback ports.
func freeAddrs() (string, string, error) {
	var out [2]string
	for i := range out {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", "", err
		}
		out[i] = l.Addr().String()
		defer func() { _ = l.Close() }()
	}
	return out[0], out[1], nil
}

func withoutEnv(env []string, names ...string) []string {
	out := env[:0:0]
	for _, e := range env {
		k, _, _ := strings.Cut(e, "=")
		drop := false
		for _, n := range names {
			drop = drop || k == n
		}
		if !drop {
			out = append(out, e)
		}
	}
	return out
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n:]
}

// processRestartSpec is one fresh-process restart: the operator binary and
// the memory limit of its cgroup.
type processRestartSpec struct {
	binary string
	memory byteQuantity
}

// parseRestarts parses --scale-restart-binary: binaries separated by
// commas, each with an optional @QUANTITY memory limit (else memory).
func parseRestarts(list string, memory byteQuantity) ([]processRestartSpec, error) {
	if strings.TrimSpace(list) == "" {
		return nil, nil
	}
	var out []processRestartSpec
	for _, item := range strings.Split(list, ",") {
		bin, q, limited := strings.Cut(strings.TrimSpace(item), "@")
		r := processRestartSpec{binary: bin, memory: memory}
		if bin == "" {
			return nil, fmt.Errorf("%q: an empty binary", item)
		}
		if limited {
			if err := r.memory.Set(q); err != nil {
				return nil, fmt.Errorf("%q: %w", item, err)
			}
		}
		out = append(out, r)
	}
	return out, nil
}
