package main

// The operator's memory as bench-scale measures it. The operator runs in
// this process, so the process's heap is the operator's (with the
// broker's and the bench's own small clients). --scale-memory-limit sets
// the Go runtime's soft memory limit as the chart's operator has it, and
// after a restart the stopped operator must be garbage: weak pointers to
// each manager and its cache say whether it was collected.

import (
	"fmt"
	"math"
	"os"
	"reflect"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strconv"
	"time"
	"weak"

	"k8s.io/apimachinery/pkg/api/resource"
	ctrl "sigs.k8s.io/controller-runtime"
)

// chartMemoryLimit is charts/kubetwin/values.yaml's
// resources.limits.memory (TestDefaultMemoryLimitFollowsTheChart keeps
// them equal); the operator's default soft limit is 90% of it.
const chartMemoryLimit = "1Gi"

// defaultScaleMemoryLimit is the operator's soft memory limit in
// production: 90% of the chart's container limit, as --memory-limit
// derives it from the cgroup.
var defaultScaleMemoryLimit = memoryLimitFor(resource.MustParse(chartMemoryLimit))

// memoryLimitFor is 90% of a container memory limit, in bytes.
func memoryLimitFor(q resource.Quantity) int64 { return q.Value() * 9 / 10 }

// byteQuantity is a flag holding bytes, set from a Kubernetes quantity
// ("922Mi", "1G", "966367641"); 0 means none.
type byteQuantity int64

func (b *byteQuantity) String() string {
	if b == nil || *b == 0 {
		return "0"
	}
	return strconv.FormatInt(int64(*b), 10)
}

func (b *byteQuantity) Set(s string) error {
	q, err := resource.ParseQuantity(s)
	if err != nil {
		return fmt.Errorf("%q is not a quantity of bytes (e.g. 922Mi, 1Gi, 0 for none)", s)
	}
	if q.Sign() < 0 {
		return fmt.Errorf("%q is negative (0 for no limit)", s)
	}
	v, ok := q.AsInt64()
	if !ok {
		if q.Cmp(*resource.NewQuantity(math.MaxInt64, resource.BinarySI)) > 0 {
			return fmt.Errorf("%q is too large", s)
		}
		v = q.Value() // a fraction of a byte, rounded up
	}
	*b = byteQuantity(v)
	return nil
}

// applyMemoryLimit sets the Go runtime's soft memory limit to limit bytes
// (0: none) unless GOMEMLIMIT is set, which wins as it does for the
// operator; it returns the limit in force (0: none) and where it came from.
func applyMemoryLimit(limit int64) (int64, string) {
	if env := os.Getenv("GOMEMLIMIT"); env != "" {
		return inForce(debug.SetMemoryLimit(-1)), "GOMEMLIMIT=" + env
	}
	if limit == 0 {
		debug.SetMemoryLimit(math.MaxInt64)
		return 0, "--scale-memory-limit 0 (none)"
	}
	debug.SetMemoryLimit(limit)
	return limit, "--scale-memory-limit"
}

func inForce(l int64) int64 {
	if l == math.MaxInt64 {
		return 0
	}
	return l
}

// gcCPU reads the runtime's CPU accounting: the share of this process's
// busy CPU time spent in the garbage collector between two readings.
type gcCPU struct{ gc, total, idle float64 }

var gcCPUNames = []string{"/cpu/classes/gc/total:cpu-seconds", "/cpu/classes/total:cpu-seconds", "/cpu/classes/idle:cpu-seconds"}

func readGCCPU() gcCPU {
	s := make([]metrics.Sample, len(gcCPUNames))
	for i, n := range gcCPUNames {
		s[i].Name = n
	}
	metrics.Read(s)
	f := func(i int) float64 {
		if s[i].Value.Kind() != metrics.KindFloat64 {
			return 0
		}
		return s[i].Value.Float64()
	}
	return gcCPU{gc: f(0), total: f(1), idle: f(2)}
}

// shareSince is the GC's share (%) of the CPU time spent since base, not
// counting idle time (0 when nothing ran).
func (c gcCPU) shareSince(base gcCPU) float64 {
	busy := (c.total - base.total) - (c.idle - base.idle)
	if busy <= 0 {
		return 0
	}
	return 100 * (c.gc - base.gc) / busy
}

// excludeFromGCShare takes the time since base out of the next sample's
// GC share: forced collections are not the operator's work.
func excludeFromGCShare(base gcCPU) {
	now := readGCCPU()
	lastGCCPU.gc += now.gc - base.gc
	lastGCCPU.total += now.total - base.total
	lastGCCPU.idle += now.idle - base.idle
}

// operatorRefs are weak pointers to one operator's manager and cache.
type operatorRefs struct{ mgr, cache weak.Pointer[byte] }

// weakOf is a weak pointer to the object v (a pointer held in an
// interface) points at.
func weakOf(v any) weak.Pointer[byte] {
	rv := reflect.ValueOf(v)
	if rv.Kind() != reflect.Pointer || rv.IsNil() {
		return weak.Pointer[byte]{}
	}
	return weak.Make((*byte)(rv.UnsafePointer()))
}

func refsOf(mgr ctrl.Manager) operatorRefs {
	return operatorRefs{mgr: weakOf(mgr), cache: weakOf(mgr.GetCache())}
}

func (r operatorRefs) live() bool { return r.mgr.Value() != nil || r.cache.Value() != nil }

// waitCollected collects garbage until the stopped operator's manager and
// cache are gone, or timeout (its goroutines may still be ending). It
// returns how long that took and whether they were collected.
func waitCollected(r operatorRefs, timeout time.Duration) (time.Duration, bool) {
	start := time.Now()
	defer excludeFromGCShare(readGCCPU())
	for {
		runtime.GC()
		if !r.live() {
			return time.Since(start), true
		}
		if time.Since(start) >= timeout {
			return time.Since(start), false
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// memoryLimitString is a limit in bytes and MiB ("none" for 0).
func memoryLimitString(b int64) string {
	if b == 0 {
		return "none"
	}
	return fmt.Sprintf("%d bytes (%.1f MiB)", b, float64(b)/(1<<20))
}
