package main

import (
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"
)

// TestDefaultMemoryLimitFollowsTheChart: bench-scale's default soft
// memory limit is the operator's in production, 90% of the chart's
// resources.limits.memory; this fails when the chart's value changes
// without chartMemoryLimit.
func TestDefaultMemoryLimitFollowsTheChart(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join("..", "..", "charts", "kubetwin", "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var values struct {
		Resources struct {
			Limits struct {
				Memory string `json:"memory"`
			} `json:"limits"`
		} `json:"resources"`
	}
	if err := yaml.Unmarshal(raw, &values); err != nil {
		t.Fatal(err)
	}
	mem := values.Resources.Limits.Memory
	if mem == "" {
		t.Fatal("charts/kubetwin/values.yaml sets no resources.limits.memory")
	}
	q, err := resource.ParseQuantity(mem)
	if err != nil {
		t.Fatalf("resources.limits.memory %q: %v", mem, err)
	}
	if want := q.Value() * 9 / 10; defaultScaleMemoryLimit != want {
		t.Fatalf("default --scale-memory-limit is %d bytes (90%% of %s); the chart's limit %s makes it %d: set chartMemoryLimit",
			defaultScaleMemoryLimit, chartMemoryLimit, mem, want)
	}
	c, err := parseFlags([]string{"--scale", "10"})
	if err != nil {
		t.Fatal(err)
	}
	if int64(c.scale.memoryLimit) != defaultScaleMemoryLimit {
		t.Fatalf("--scale-memory-limit defaults to %d, want %d", c.scale.memoryLimit, defaultScaleMemoryLimit)
	}
}

func TestScaleMemoryLimitFlag(t *testing.T) {
	for _, tc := range []struct {
		arg     string
		want    int64
		wantErr string
	}{
		{arg: "922Mi", want: 922 << 20},
		{arg: "966367641", want: 966367641},
		{arg: "1G", want: 1e9},
		{arg: "0", want: 0},
		{arg: "-1Gi", wantErr: `"-1Gi" is negative`},
		{arg: "lots", wantErr: `"lots" is not a quantity of bytes`},
		{arg: "", wantErr: "is not a quantity of bytes"},
	} {
		c, err := parseFlags([]string{"--scale", "10", "--scale-memory-limit", tc.arg})
		switch {
		case tc.wantErr != "":
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !strings.Contains(err.Error(), "scale-memory-limit") {
				t.Errorf("--scale-memory-limit %q: error %v, want one naming the flag and saying %s", tc.arg, err, tc.wantErr)
			}
		case err != nil:
			t.Errorf("--scale-memory-limit %q: %v", tc.arg, err)
		case int64(c.scale.memoryLimit) != tc.want:
			t.Errorf("--scale-memory-limit %q = %d bytes, want %d", tc.arg, c.scale.memoryLimit, tc.want)
		}
	}
}

// TestScaleDeviceKeysFlag: device keys at scale only without simulated
// devices, which connect without keys.
func TestScaleDeviceKeysFlag(t *testing.T) {
	if _, err := parseFlags([]string{"--scale", "10", "--scale-device-keys"}); err == nil || !strings.Contains(err.Error(), "--scale-devices 0") {
		t.Errorf("--scale-device-keys with devices: %v, want an error naming --scale-devices 0", err)
	}
	c, err := parseFlags([]string{"--scale", "10", "--scale-device-keys", "--scale-devices", "0"})
	if err != nil || !c.scale.deviceKeys {
		t.Errorf("--scale-device-keys --scale-devices 0: %v (keys %v)", err, c.scale.deviceKeys)
	}
}

func TestGCShareSince(t *testing.T) {
	base := gcCPU{gc: 1, total: 100, idle: 50}
	// 40 s of CPU, 30 of them idle: 10 s busy, 2 s of it in the GC.
	if got := (gcCPU{gc: 3, total: 140, idle: 80}).shareSince(base); got != 20 {
		t.Fatalf("GC share %.2f%%, want 20%%", got)
	}
	if got := base.shareSince(base); got != 0 {
		t.Fatalf("GC share with nothing run %.2f%%, want 0", got)
	}
}

// TestWaitCollected: the check that a stopped operator was collected
// tells a retained object from a dropped one.
func TestWaitCollected(t *testing.T) {
	type big [1 << 16]byte
	kept := &big{}
	refs := operatorRefs{mgr: weakOf(kept), cache: weakOf(&big{})}
	if _, ok := waitCollected(refs, 300*time.Millisecond); ok {
		t.Fatal("an object still referenced was reported collected")
	}
	if refs.cache.Value() != nil {
		t.Fatal("the unreferenced object was not collected")
	}
	runtime.KeepAlive(kept)
	refs = operatorRefs{mgr: weakOf(&big{}), cache: weakOf(&big{})}
	if _, ok := waitCollected(refs, 10*time.Second); !ok {
		t.Fatal("nothing references the objects, yet they were not collected within 10s")
	}
}

// TestRestartMemoryDefaultIsTheChartLimit: the fresh-process restart runs
// under the chart's container limit unless told otherwise.
func TestRestartMemoryDefaultIsTheChartLimit(t *testing.T) {
	c, err := parseFlags([]string{"--scale", "10"})
	if err != nil {
		t.Fatal(err)
	}
	if want := defaultScaleMemoryLimit * 10 / 9; int64(c.scale.restartMemory) < want-1 || int64(c.scale.restartMemory) > want+1 {
		t.Fatalf("--scale-restart-memory defaults to %d bytes, want the chart's limit %s", c.scale.restartMemory, chartMemoryLimit)
	}
	c, err = parseFlags([]string{"--scale", "10", "--scale-restart-memory", "1536Mi"})
	if err != nil {
		t.Fatal(err)
	}
	if c.scale.restartMemory != 1536<<20 {
		t.Fatalf("--scale-restart-memory 1536Mi = %d bytes", c.scale.restartMemory)
	}
}

// TestScrapeProcMetrics: the restarted operator is "done" from its own
// /metrics: the DeviceTwin controller's reconciles, queue and workers
// only, and the process's runtime figures.
func TestScrapeProcMetrics(t *testing.T) {
	const page = `# HELP controller_runtime_reconcile_total Total number of reconciliations per controller
# TYPE controller_runtime_reconcile_total counter
controller_runtime_reconcile_total{controller="devicetwin",result="success"} 99990
controller_runtime_reconcile_total{controller="devicetwin",result="error"} 10
controller_runtime_reconcile_total{controller="deviceidclaim",result="success"} 5000
workqueue_depth{controller="devicetwin",name="devicetwin"} 3
workqueue_depth{controller="deviceidclaim",name="deviceidclaim"} 7
controller_runtime_active_workers{controller="devicetwin"} 2
go_memstats_heap_inuse_bytes 5.24288e+08
go_memstats_heap_alloc_bytes 4.194304e+08
go_gc_duration_seconds_count 42
process_cpu_seconds_total 61.5
go_cpu_classes_gc_total_cpu_seconds_total 20.5
kubetwin_bridge_status_writes_total{result="ok"} 4
kubetwin_bridge_status_writes_total{result="error"} 1
`
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, page) }))
	defer srv.Close()
	m, err := scrapeProcMetrics(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	want := procMetrics{reconciles: 100000, errors: 10, depth: 3, active: 2, heapInuse: 500 << 20, heapAlloc: 400 << 20,
		gcCycles: 42, cpuSec: 61.5, gcCPUSec: 20.5, statusWrites: 5}
	if m != want {
		t.Fatalf("scraped %+v, want %+v", m, want)
	}
}

// TestMemoryCgroupLimitsItsProcess: a program started through the
// restart's memory cgroup runs in it and is held to its limit: the kernel
// kills one that goes past it, and the cgroup counts the kill. Needs root
// and a cgroup memory controller, as the fresh-process restart does.
func TestMemoryCgroupLimitsItsProcess(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to make a cgroup")
	}
	const limit = 32 << 20
	cg, err := newMemoryCgroup(limit)
	if err != nil {
		t.Skipf("no memory cgroup here: %v", err)
	}
	defer cg.remove()

	out, err := cg.command("/bin/cat", "/proc/self/cgroup").Output()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), ":"+strings.TrimPrefix(cg.dir, "/sys/fs/cgroup/memory")+"\n") &&
		!strings.Contains(string(out), "::"+strings.TrimPrefix(cg.dir, "/sys/fs/cgroup")+"\n") {
		t.Fatalf("the process ran outside %s:\n%s", cg.dir, out)
	}

	// A shell that holds 96 MiB in a variable, three times the limit.
	err = cg.command("/bin/sh", "-c", `x=$(head -c 100663296 /dev/zero | tr '\0' a); echo ${#x}`).Run()
	if err == nil {
		t.Fatalf("a process holding 96 MiB ran to its end under a %d MiB limit", limit>>20)
	}
	if n := cg.oomKills(); n < 1 {
		t.Fatalf("%v, but the cgroup counts %d OOM kills", err, n)
	}
	if peak := cg.peakMiB(); peak < 16 || peak > 33 {
		t.Fatalf("peak charge %.1f MiB under a %d MiB limit", peak, limit>>20)
	}
}

// TestRestartBinaryMemory: each fresh-process restart may have its own
// memory limit; the others take --scale-restart-memory.
func TestRestartBinaryMemory(t *testing.T) {
	c, err := parseFlags([]string{"--scale", "10", "--scale-restart-memory", "1Gi",
		"--scale-restart-binary", "bin/a@1280Mi, bin/b ,bin/a@0"})
	if err != nil {
		t.Fatal(err)
	}
	want := []processRestartSpec{{"bin/a", 1280 << 20}, {"bin/b", 1 << 30}, {"bin/a", 0}}
	if !reflect.DeepEqual(c.scale.restarts, want) {
		t.Errorf("restarts %+v, want %+v", c.scale.restarts, want)
	}
	for _, bad := range []string{"bin/a@lots", "bin/a@-1Gi", "bin/a,,bin/b"} {
		if _, err := parseFlags([]string{"--scale", "10", "--scale-restart-binary", bad}); err == nil {
			t.Errorf("--scale-restart-binary %q: no error", bad)
		}
	}
}
