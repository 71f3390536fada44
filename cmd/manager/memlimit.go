package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

const (
	// memoryLimitShare is the part of the container's memory limit given to
	// the Go heap: the rest is for what the runtime does not count (stacks
	// of goroutines in syscalls, cgo, the kernel's page cache charged to
	// the cgroup) so that the soft limit is reached before the OOM killer.
	memoryLimitShare = 0.9
	// minMemoryLimit refuses --memory-limit values under which the garbage
	// collector would run all the time: the operator's heap with no twins
	// is already tens of MiB.
	minMemoryLimit = 32 << 20
	// cgroupV1Unlimited: cgroup v1 reports "no limit" as the largest page
	// counter times the page size (9223372036854771712 with 4 KiB pages);
	// anything this large is no limit.
	cgroupV1Unlimited = 1 << 62
)

// memoryLimitFlag is --memory-limit: a quantity (900Mi, 2Gi, 1000000000),
// 0 for none; unset means "from the cgroup".
type memoryLimitFlag struct {
	set   bool
	bytes int64
}

func (f *memoryLimitFlag) String() string {
	if f == nil || !f.set {
		return ""
	}
	return strconv.FormatInt(f.bytes, 10)
}

func (f *memoryLimitFlag) Set(v string) error {
	q, err := resource.ParseQuantity(strings.TrimSpace(v))
	if err != nil {
		return fmt.Errorf("%q is not a quantity of bytes such as 900Mi, 2Gi or 0 (none)", v)
	}
	b, ok := q.AsInt64()
	if !ok {
		// A fraction of a byte (0.5Ki is whole) or past int64.
		fl := q.AsApproximateFloat64()
		if fl >= math.MaxInt64 {
			return fmt.Errorf("%q is more bytes than a 64-bit limit holds", v)
		}
		b = int64(math.Ceil(fl))
	}
	switch {
	case b < 0:
		return fmt.Errorf("%q is negative; use 0 for no limit", v)
	case b > 0 && b < minMemoryLimit:
		return fmt.Errorf("%q is under the %dMi the operator needs with no twins; use 0 for no limit", v, minMemoryLimit>>20)
	}
	f.set, f.bytes = true, b
	return nil
}

// bindMemoryLimitFlag binds --memory-limit to fs.
func bindMemoryLimitFlag(fs *flag.FlagSet, f *memoryLimitFlag) {
	fs.Var(f, "memory-limit",
		"Soft limit of the Go heap (the runtime's memory limit), a quantity such as 900Mi or 2Gi; 0: none. "+
			"Default: 90% of the container's cgroup memory limit, none when unlimited. GOMEMLIMIT in the environment wins.")
}

// memoryLimit is the soft limit the operator runs with and where it came
// from, for the start-up log.
type memoryLimit struct {
	// bytes is the limit; 0: none.
	bytes int64
	// source is "GOMEMLIMIT", "--memory-limit", the cgroup file the
	// default was taken from, or "none".
	source string
	// cgroupBytes is the container's limit the default is 90% of.
	cgroupBytes int64
}

// resolveMemoryLimit picks the limit: GOMEMLIMIT (already applied by the
// runtime, whose limit is runtimeBytes), else the flag, else 90% of the
// cgroup's limit found under root. A cgroup that cannot be read is
// returned as an error along with "none", since running without a limit is
// what the operator did before.
func resolveMemoryLimit(f memoryLimitFlag, gomemlimit string, runtimeBytes int64, root string) (memoryLimit, error) {
	if gomemlimit != "" {
		if runtimeBytes == math.MaxInt64 {
			runtimeBytes = 0
		}
		return memoryLimit{bytes: runtimeBytes, source: "GOMEMLIMIT"}, nil
	}
	if f.set {
		if f.bytes == 0 {
			return memoryLimit{source: "none"}, nil
		}
		return memoryLimit{bytes: f.bytes, source: "--memory-limit"}, nil
	}
	limit, file, err := cgroupMemoryLimit(root)
	if err != nil || limit == 0 {
		return memoryLimit{source: "none"}, err
	}
	return memoryLimit{bytes: int64(float64(limit) * memoryLimitShare), source: file, cgroupBytes: limit}, nil
}

// cgroupMemoryLimit is the memory limit of this process's cgroup under
// root ("/" in production): the smallest limit of its cgroup and of the
// cgroups above it that are visible, with the file it came from; 0 when
// none is set. cgroup v1's memory controller is used when mounted, else
// cgroup v2. Missing files mean no limit (no cgroup filesystem, or a
// cgroup namespace that hides the parents).
func cgroupMemoryLimit(root string) (int64, string, error) {
	v1, v2, err := selfCgroups(filepath.Join(root, "proc", "self", "cgroup"))
	if err != nil {
		return 0, "", err
	}
	mount := filepath.Join(root, "sys", "fs", "cgroup")
	if _, err := os.Stat(filepath.Join(mount, "memory", "memory.limit_in_bytes")); err == nil {
		return smallestLimit(filepath.Join(mount, "memory"), v1, "memory.limit_in_bytes", parseCgroupV1Limit)
	}
	return smallestLimit(mount, v2, "memory.max", parseCgroupV2Limit)
}

// selfCgroups reads the process's v1 memory cgroup and v2 cgroup paths
// from /proc/self/cgroup ("4:memory:/a/b", "0::/a/b"); "/" for what is
// not listed or when the file is missing.
func selfCgroups(file string) (v1, v2 string, err error) {
	v1, v2 = "/", "/"
	f, err := os.Open(file)
	if errors.Is(err, fs.ErrNotExist) {
		return v1, v2, nil
	}
	if err != nil {
		return "", "", err
	}
	defer func() { _ = f.Close() }()
	s := bufio.NewScanner(f)
	for s.Scan() {
		id, rest, ok := strings.Cut(s.Text(), ":")
		if !ok {
			continue
		}
		controllers, path, ok := strings.Cut(rest, ":")
		if !ok {
			continue
		}
		switch {
		case id == "0" && controllers == "":
			v2 = path
		case hasController(controllers, "memory"):
			v1 = path
		}
	}
	if err := s.Err(); err != nil {
		return "", "", fmt.Errorf("%s: %w", file, err)
	}
	return v1, v2, nil
}

func hasController(list, name string) bool {
	for c := range strings.SplitSeq(list, ",") {
		if c == name {
			return true
		}
	}
	return false
}

// smallestLimit reads name in mount/path and every directory above it up
// to mount, and returns the smallest limit and its file. A container
// often sees its own cgroup at mount while /proc/self/cgroup names the
// host's path, which then does not exist here: the walk reaches mount.
func smallestLimit(mount, path, name string, parse func(string) (int64, error)) (int64, string, error) {
	var limit int64
	var from string
	// Clean as an absolute path so that the walk never leaves mount.
	dir := filepath.Join(mount, filepath.Clean("/"+path))
	for {
		file := filepath.Join(dir, name)
		data, err := os.ReadFile(file)
		switch {
		case errors.Is(err, fs.ErrNotExist):
		case err != nil:
			return 0, "", err
		default:
			v, err := parse(strings.TrimSpace(string(data)))
			if err != nil {
				return 0, "", fmt.Errorf("%s: %w", file, err)
			}
			if v > 0 && (limit == 0 || v < limit) {
				limit, from = v, file
			}
		}
		if dir == mount {
			return limit, from, nil
		}
		dir = filepath.Dir(dir)
	}
}

// parseCgroupV2Limit reads memory.max: bytes, or "max" for none (0).
func parseCgroupV2Limit(s string) (int64, error) {
	if s == "max" {
		return 0, nil
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil || v < 0 {
		return 0, fmt.Errorf("%q is neither a number of bytes nor \"max\"", s)
	}
	return v, nil
}

// parseCgroupV1Limit reads memory.limit_in_bytes: bytes, with the largest
// values meaning none (0).
func parseCgroupV1Limit(s string) (int64, error) {
	v, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%q is not a number of bytes", s)
	}
	if v >= cgroupV1Unlimited {
		return 0, nil
	}
	return int64(v), nil
}

// memoryLimitBytes reports the runtime's limit as it is, whoever set it.
var memoryLimitBytes = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
	Name: "kubetwin_memory_limit_bytes",
	Help: "The Go runtime's soft memory limit of the operator (--memory-limit, GOMEMLIMIT or 90% of the container's limit); 0: none.",
}, func() float64 {
	if l := debug.SetMemoryLimit(-1); l != math.MaxInt64 {
		return float64(l)
	}
	return 0
})

func init() {
	metrics.Registry.MustRegister(memoryLimitBytes)
}

// setupMemoryLimit applies --memory-limit or its default to the runtime
// and logs what the operator runs with. Without a soft limit the garbage
// collector lets the heap grow to twice what is live (GOGC=100), which at
// fleet size is the difference between fitting the container and not.
func setupMemoryLimit(log logr.Logger, f memoryLimitFlag) {
	gomemlimit := os.Getenv("GOMEMLIMIT")
	l, err := resolveMemoryLimit(f, gomemlimit, debug.SetMemoryLimit(-1), "/")
	if err != nil {
		log.Error(err, "cannot read the container's memory limit; running without a soft memory limit")
	}
	if l.source != "GOMEMLIMIT" && l.bytes > 0 {
		debug.SetMemoryLimit(l.bytes)
	}
	kv := []any{"bytes", l.bytes, "source", l.source}
	if l.cgroupBytes > 0 {
		kv = append(kv, "containerLimitBytes", l.cgroupBytes)
	}
	if gomemlimit != "" {
		kv = append(kv, "gomemlimit", gomemlimit)
		if f.set {
			kv = append(kv, "ignoredFlag", "--memory-limit="+f.String())
		}
	}
	log.Info("memory limit", kv...)
}
