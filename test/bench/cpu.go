package main

import (
	"io"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"k8s.io/client-go/rest"
)

// devicePID is the pid of the device process, once started.
var devicePID atomic.Int64

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat
// (100 on Linux everywhere that matters).
const clockTicks = 100

// cpuSnap is the CPU time used so far by this process and by its child
// processes (envtest's kube-apiserver and etcd), by name.
type cpuSnap struct {
	at   time.Time
	secs map[string]float64
	// machine is the busy CPU time of the whole machine (/proc/stat).
	machine float64
}

// sampleCPU reads /proc; on systems without it the snapshot is empty.
func sampleCPU() cpuSnap {
	s := cpuSnap{at: time.Now(), secs: map[string]float64{}}
	if raw, err := os.ReadFile("/proc/stat"); err == nil {
		line, _, _ := strings.Cut(string(raw), "\n")
		f := strings.Fields(line)
		if len(f) > 5 && f[0] == "cpu" {
			var total float64
			for _, x := range f[1:] {
				v, _ := strconv.ParseFloat(x, 64)
				total += v
			}
			idle, _ := strconv.ParseFloat(f[4], 64)
			iowait, _ := strconv.ParseFloat(f[5], 64)
			s.machine = (total - idle - iowait) / clockTicks
		}
	}
	if _, t, ok := procStat(os.Getpid()); ok {
		s.secs["operator"] = t
	}
	for _, c := range childProcs() {
		comm := c.comm
		if int64(c.pid) == devicePID.Load() {
			comm = "devices"
		}
		s.secs[strings.ReplaceAll(comm, "-", "_")] += c.cpuSecs
	}
	return s
}

// childProc is a child process of this one (envtest's kube-apiserver and
// etcd, the device process).
type childProc struct {
	pid     int
	comm    string
	cpuSecs float64 // utime+stime so far
}

// childProcs lists this process's children from /proc (none without it).
func childProcs() []childProc {
	self := os.Getpid()
	var out []childProc
	dirs, _ := filepath.Glob("/proc/[0-9]*")
	for _, d := range dirs {
		pid, err := strconv.Atoi(filepath.Base(d))
		if err != nil || pid == self {
			continue
		}
		raw, err := os.ReadFile(filepath.Join(d, "stat"))
		if err != nil {
			continue
		}
		if comm, ppid, t, ok := parseStat(string(raw)); ok && ppid == self {
			out = append(out, childProc{pid: pid, comm: comm, cpuSecs: t})
		}
	}
	return out
}

func procStat(pid int) (string, float64, bool) {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return "", 0, false
	}
	comm, _, t, ok := parseStat(string(raw))
	return comm, t, ok
}

// parseStat returns comm, ppid and utime+stime in seconds from a /proc/<pid>/stat line.
func parseStat(s string) (string, int, float64, bool) {
	open, end := strings.IndexByte(s, '('), strings.LastIndexByte(s, ')')
	if open < 0 || end < open {
		return "", 0, 0, false
	}
	comm := s[open+1 : end]
	f := strings.Fields(s[end+1:])
	// f[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
	if len(f) < 13 {
		return "", 0, 0, false
	}
	ppid, _ := strconv.Atoi(f[1])
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return comm, ppid, (ut + st) / clockTicks, true
}

// coresBetween returns the cores each process used on average between a and b.
func coresBetween(a, b cpuSnap) map[string]float64 {
	el := b.at.Sub(a.at).Seconds()
	out := map[string]float64{}
	if el <= 0 {
		return out
	}
	ours := 0.0
	for name, t := range b.secs {
		out[name] = (t - a.secs[name]) / el
		ours += out[name]
	}
	if a.machine > 0 && b.machine > 0 {
		out["other"] = max((b.machine-a.machine)/el-ours, 0)
	}
	return out
}

// coresString formats coresBetween's result.
func coresString(m map[string]float64) string {
	if len(m) == 0 {
		return "n/a"
	}
	order := []string{"kube_apiserver", "etcd", "operator", "devices", "other"}
	var parts []string
	total := 0.0
	seen := map[string]bool{}
	add := func(name string) {
		label := map[string]string{
			"kube_apiserver": "kube-apiserver", "operator": "operator+broker", "devices": "devices",
			"other": "other processes",
		}[name]
		if label == "" {
			label = name
		}
		parts = append(parts, label+" "+strconv.FormatFloat(m[name], 'f', 2, 64))
		total += m[name]
		seen[name] = true
	}
	for _, n := range order {
		if _, ok := m[n]; ok {
			add(n)
		}
	}
	for n := range m {
		if !seen[n] {
			add(n)
		}
	}
	return strings.Join(parts, ", ") + " (total " + strconv.FormatFloat(total, 'f', 2, 64) + " of " + strconv.Itoa(runtime.NumCPU()) + ")"
}

// startProfile starts a CPU profile to file (if set) and returns its stop.
func startProfile(file string) func() {
	if file == "" {
		return func() {}
	}
	f, err := os.Create(file)
	if err != nil {
		progress("cpuprofile: %v", err)
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		progress("cpuprofile: %v", err)
		_ = f.Close()
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		_ = f.Close()
		progress("CPU profile written to %s", file)
	}
}

// apiserverProfile fetches a CPU profile of the kube-apiserver over d (its
// /debug/pprof endpoint) into file, in the background; the returned
// function waits for it. It does nothing when file is empty.
func apiserverProfile(restCfg *rest.Config, d time.Duration, file string) func() {
	if file == "" || restCfg == nil {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		hc, err := rest.HTTPClientFor(restCfg)
		if err != nil {
			progress("apiserver profile: %v", err)
			return
		}
		hc.Timeout = d + 30*time.Second
		secs := max(int(d.Seconds()), 1)
		resp, err := hc.Get(strings.TrimSuffix(restCfg.Host, "/") + "/debug/pprof/profile?seconds=" + strconv.Itoa(secs))
		if err != nil {
			progress("apiserver profile: %v", err)
			return
		}
		defer resp.Body.Close()
		if resp.StatusCode != 200 {
			progress("apiserver profile: %s", resp.Status)
			return
		}
		f, err := os.Create(file)
		if err != nil {
			progress("apiserver profile: %v", err)
			return
		}
		defer f.Close()
		if _, err := io.Copy(f, resp.Body); err != nil {
			progress("apiserver profile: %v", err)
			return
		}
		progress("kube-apiserver CPU profile written to %s", file)
	}()
	return func() { <-done }
}
