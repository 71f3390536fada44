package main

import (
	"flag"
	"io"
	"math"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"testing"

	"github.com/go-logr/logr/funcr"
	promtestutil "github.com/prometheus/client_golang/prometheus/testutil"
)

// writeTree writes files (path relative to root: content) under a new
// root directory.
func writeTree(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, content := range files {
		full := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

func TestCgroupMemoryLimit(t *testing.T) {
	const v1Unlimited = "9223372036854771712\n"
	for name, tc := range map[string]struct {
		files     map[string]string
		want      int64
		wantFile  string // relative to root; "" when none
		wantError string
	}{
		"no cgroup filesystem": {files: map[string]string{}},
		"v2 limit in a cgroup namespace": {
			files:    map[string]string{"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": "1073741824\n"},
			want:     1 << 30,
			wantFile: "sys/fs/cgroup/memory.max",
		},
		"v2 without /proc/self/cgroup": {
			files:    map[string]string{"sys/fs/cgroup/memory.max": "536870912\n"},
			want:     512 << 20,
			wantFile: "sys/fs/cgroup/memory.max",
		},
		"v2 max": {files: map[string]string{"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": "max\n"}},
		"v2 smallest of the cgroup and its parents": {
			files: map[string]string{
				"proc/self/cgroup":                           "0::/kubepods/pod1/c1\n",
				"sys/fs/cgroup/kubepods/memory.max":          "4294967296\n",
				"sys/fs/cgroup/kubepods/pod1/memory.max":     "1073741824\n",
				"sys/fs/cgroup/kubepods/pod1/c1/memory.max":  "max\n",
				"sys/fs/cgroup/kubepods/pod1/c1/cgroup.type": "domain\n",
			},
			want:     1 << 30,
			wantFile: "sys/fs/cgroup/kubepods/pod1/memory.max",
		},
		"v2 path outside the mount stays inside": {
			files:    map[string]string{"proc/self/cgroup": "0::/../../etc\n", "sys/fs/cgroup/memory.max": "1073741824\n"},
			want:     1 << 30,
			wantFile: "sys/fs/cgroup/memory.max",
		},
		"v2 malformed": {
			files:     map[string]string{"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/memory.max": "lots\n"},
			wantError: `sys/fs/cgroup/memory.max: "lots" is neither a number of bytes nor "max"`,
		},
		"v1 container sees its own cgroup at the mount": {
			files: map[string]string{
				"proc/self/cgroup":                           "12:pids:/docker/abc\n4:memory:/docker/abc\n0::/docker/abc\n",
				"sys/fs/cgroup/memory/memory.limit_in_bytes": "536870912\n",
			},
			want:     512 << 20,
			wantFile: "sys/fs/cgroup/memory/memory.limit_in_bytes",
		},
		"v1 unlimited": {
			files: map[string]string{
				"proc/self/cgroup":                           "4:memory:/\n",
				"sys/fs/cgroup/memory/memory.limit_in_bytes": v1Unlimited,
			},
		},
		"v1 nested under an unlimited parent, memory listed with other controllers": {
			files: map[string]string{
				"proc/self/cgroup":                                          "5:cpu,memory:/process_api/a1\n0::/\n",
				"sys/fs/cgroup/memory/memory.limit_in_bytes":                v1Unlimited,
				"sys/fs/cgroup/memory/process_api/memory.limit_in_bytes":    v1Unlimited,
				"sys/fs/cgroup/memory/process_api/a1/memory.limit_in_bytes": "2147483648\n",
				// The hybrid layout's v2 hierarchy has no memory controller.
				"sys/fs/cgroup/unified/cgroup.controllers": "\n",
			},
			want:     2 << 30,
			wantFile: "sys/fs/cgroup/memory/process_api/a1/memory.limit_in_bytes",
		},
		"v1 malformed": {
			files: map[string]string{
				"proc/self/cgroup":                           "4:memory:/\n",
				"sys/fs/cgroup/memory/memory.limit_in_bytes": "-1\n",
			},
			wantError: `sys/fs/cgroup/memory/memory.limit_in_bytes: "-1" is not a number of bytes`,
		},
	} {
		t.Run(name, func(t *testing.T) {
			root := writeTree(t, tc.files)
			got, file, err := cgroupMemoryLimit(root)
			if tc.wantError != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantError) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantError)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			wantFile := ""
			if tc.wantFile != "" {
				wantFile = filepath.Join(root, tc.wantFile)
			}
			if got != tc.want || file != wantFile {
				t.Errorf("limit %d from %q, want %d from %q", got, file, tc.want, wantFile)
			}
		})
	}
}

func parseMemoryLimitFlag(args ...string) (memoryLimitFlag, error) {
	fs := flag.NewFlagSet("test", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var f memoryLimitFlag
	bindMemoryLimitFlag(fs, &f)
	return f, fs.Parse(args)
}

func TestMemoryLimitFlag(t *testing.T) {
	if f, err := parseMemoryLimitFlag(); err != nil || f.set {
		t.Fatalf("unset flag: %+v, %v; want unset", f, err)
	}
	for in, want := range map[string]int64{
		"900Mi": 900 << 20, "2Gi": 2 << 30, "1G": 1e9, "1000000000": 1e9, "1.5Gi": 3 << 29, "0": 0, " 64Mi ": 64 << 20,
	} {
		f, err := parseMemoryLimitFlag("--memory-limit=" + in)
		if err != nil || !f.set || f.bytes != want {
			t.Errorf("--memory-limit=%q: %+v, %v; want %d bytes", in, f, err, want)
		}
	}
	for in, want := range map[string]string{
		"":         "is not a quantity of bytes",
		"lots":     "is not a quantity of bytes",
		"1GB":      "is not a quantity of bytes",
		"-1Gi":     "is negative",
		"1Ki":      "is under the 32Mi",
		"100m":     "is under the 32Mi",
		"100000Ei": "more bytes than a 64-bit limit holds",
	} {
		f, err := parseMemoryLimitFlag("--memory-limit=" + in)
		if err == nil || !strings.Contains(err.Error(), "memory-limit") || !strings.Contains(err.Error(), want) {
			t.Errorf("--memory-limit=%q: %+v, error %v; want one naming the flag and %q", in, f, err, want)
		}
		if f.set {
			t.Errorf("--memory-limit=%q was refused but changed the flag: %+v", in, f)
		}
	}
}

func TestResolveMemoryLimit(t *testing.T) {
	gi := writeTree(t, map[string]string{"sys/fs/cgroup/memory.max": "1073741824\n"})
	unlimited := writeTree(t, map[string]string{"sys/fs/cgroup/memory.max": "max\n"})
	broken := writeTree(t, map[string]string{"sys/fs/cgroup/memory.max": "?\n"})
	for name, tc := range map[string]struct {
		flag       memoryLimitFlag
		gomemlimit string
		runtime    int64
		root       string
		want       memoryLimit
		wantError  bool
	}{
		"90% of the container's limit": {root: gi, runtime: math.MaxInt64,
			want: memoryLimit{bytes: 966367641, source: filepath.Join(gi, "sys/fs/cgroup/memory.max"), cgroupBytes: 1 << 30}},
		"unlimited container":         {root: unlimited, runtime: math.MaxInt64, want: memoryLimit{source: "none"}},
		"unreadable cgroup: none":     {root: broken, runtime: math.MaxInt64, want: memoryLimit{source: "none"}, wantError: true},
		"flag wins over the cgroup":   {flag: memoryLimitFlag{set: true, bytes: 700 << 20}, root: gi, runtime: math.MaxInt64, want: memoryLimit{bytes: 700 << 20, source: "--memory-limit"}},
		"flag 0 turns it off":         {flag: memoryLimitFlag{set: true}, root: gi, runtime: math.MaxInt64, want: memoryLimit{source: "none"}},
		"GOMEMLIMIT wins over both":   {flag: memoryLimitFlag{set: true, bytes: 700 << 20}, gomemlimit: "500MiB", runtime: 500 << 20, root: gi, want: memoryLimit{bytes: 500 << 20, source: "GOMEMLIMIT"}},
		"GOMEMLIMIT=off wins as none": {gomemlimit: "off", runtime: math.MaxInt64, root: gi, want: memoryLimit{source: "GOMEMLIMIT"}},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := resolveMemoryLimit(tc.flag, tc.gomemlimit, tc.runtime, tc.root)
			if (err != nil) != tc.wantError {
				t.Errorf("error %v, want error: %v", err, tc.wantError)
			}
			if got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestSetupMemoryLimit: the flag reaches the runtime and the metric, is
// logged, and GOMEMLIMIT wins over it (the runtime applied GOMEMLIMIT at
// start, so the operator leaves the limit alone).
func TestSetupMemoryLimit(t *testing.T) {
	before := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(before) })
	var logged []string
	log := funcr.New(func(prefix, args string) { logged = append(logged, args) }, funcr.Options{})

	t.Setenv("GOMEMLIMIT", "")
	setupMemoryLimit(log, memoryLimitFlag{set: true, bytes: 700 << 20})
	if got := debug.SetMemoryLimit(-1); got != 700<<20 {
		t.Errorf("runtime limit %d, want %d", got, 700<<20)
	}
	if got := promtestutil.ToFloat64(memoryLimitBytes); got != 700<<20 {
		t.Errorf("kubetwin_memory_limit_bytes %v, want %d", got, 700<<20)
	}
	if len(logged) != 1 || !strings.Contains(logged[0], `"msg"="memory limit" "bytes"=734003200 "source"="--memory-limit"`) {
		t.Errorf("logged %q", logged)
	}

	debug.SetMemoryLimit(500 << 20) // as the runtime does from GOMEMLIMIT at start
	t.Setenv("GOMEMLIMIT", "500MiB")
	logged = nil
	setupMemoryLimit(log, memoryLimitFlag{set: true, bytes: 700 << 20})
	if got := debug.SetMemoryLimit(-1); got != 500<<20 {
		t.Errorf("runtime limit %d, want GOMEMLIMIT's %d", got, 500<<20)
	}
	if got := promtestutil.ToFloat64(memoryLimitBytes); got != 500<<20 {
		t.Errorf("kubetwin_memory_limit_bytes %v, want %d", got, 500<<20)
	}
	if len(logged) != 1 || !strings.Contains(logged[0], `"source"="GOMEMLIMIT" "gomemlimit"="500MiB" "ignoredFlag"="--memory-limit=734003200"`) {
		t.Errorf("logged %q", logged)
	}

	debug.SetMemoryLimit(math.MaxInt64)
	if got := promtestutil.ToFloat64(memoryLimitBytes); got != 0 {
		t.Errorf("kubetwin_memory_limit_bytes %v with no limit, want 0", got)
	}
}
