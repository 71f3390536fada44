package abuse

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kubetwin/kubetwin/internal/testutil/mosquitto"
	"github.com/kubetwin/kubetwin/internal/testutil/operatorproc"
)

const (
	readyWait = 120 * time.Second // for an operator process to serve
	stopWait  = 30 * time.Second  // for it to exit after SIGTERM
	tick      = 100 * time.Millisecond
)

// operatorProc is the operator binary running as a separate process, its
// output counted line by line.
type operatorProc struct {
	t          *testing.T
	name       string
	args       []string
	logPath    string
	healthAddr string
	// metricsAddr is where it serves Prometheus metrics over plain HTTP
	// ("" when disabled).
	metricsAddr string
	// probe, when set, must succeed before the operator counts as ready
	// (e.g. an MQTT round trip).
	probe func() error

	log *logCounter

	proc operatorproc.Proc
}

// newOperatorProc prepares an operator with the given flags (health and
// metrics addresses are added). It is killed when the test ends.
func newOperatorProc(t *testing.T, name string, metrics bool, args ...string) *operatorProc {
	t.Helper()
	o := &operatorProc{
		t:          t,
		name:       name,
		logPath:    filepath.Join(t.TempDir(), name+".log"),
		healthAddr: freeAddr(t),
	}
	o.args = append([]string{"--health-probe-bind-address=" + o.healthAddr, "--zap-log-level=info"}, args...)
	if metrics {
		o.metricsAddr = freeAddr(t)
		o.args = append(o.args, "--metrics-bind-address="+o.metricsAddr, "--metrics-secure=false")
	} else {
		o.args = append(o.args, "--metrics-bind-address=0")
	}
	t.Cleanup(func() {
		o.proc.SignalAndWait(syscall.SIGKILL, stopWait)
		if t.Failed() {
			o.printLogTail(64 << 10)
		}
	})
	return o
}

// start starts the process and waits until it is ready.
func (o *operatorProc) start() {
	o.t.Helper()
	if o.log == nil {
		o.log = &logCounter{}
	}
	exited, err := o.proc.Start(operatorproc.Spec{
		Bin:     managerBin,
		Args:    o.args,
		Env:     append(filteredEnv(), "KUBECONFIG="+kubeconfigPath),
		LogPath: o.logPath,
		Header:  fmt.Sprintf("===== abuse: %s started at %s: %s %s\n", o.name, time.Now().Format(time.RFC3339Nano), managerBin, strings.Join(o.args, " ")),
		Footer: func(err error) string {
			return fmt.Sprintf("===== abuse: %s exited at %s: %v\n", o.name, time.Now().Format(time.RFC3339Nano), err)
		},
		Output: o.log,
	})
	if err != nil {
		o.t.Fatal(err)
	}
	if err := o.waitReady(exited); err != nil {
		o.t.Fatalf("%s: %v (its log is below)", o.name, err)
	}
}

// filteredEnv is the test's environment without what would point the
// operator at another cluster or make it serve admission webhooks.
func filteredEnv() []string { return operatorproc.Environ("POD_NAMESPACE=") }

func (o *operatorProc) waitReady(exited <-chan struct{}) error {
	deadline := time.Now().Add(readyWait)
	hc := &http.Client{Timeout: 2 * time.Second}
	for ready := false; ; {
		select {
		case <-exited:
			return errors.New("the operator exited while starting")
		default:
		}
		if !ready {
			if resp, err := hc.Get("http://" + o.healthAddr + "/readyz"); err == nil {
				_ = resp.Body.Close()
				ready = resp.StatusCode == http.StatusOK
			}
		}
		var err error
		if ready {
			if o.probe == nil {
				return nil
			}
			if err = o.probe(); err == nil {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("not ready within %s (readyz %v, probe: %v)", readyWait, ready, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// pid is the process id, or 0 when it is not running.
func (o *operatorProc) pid() int { return o.proc.Pid() }

// stop sends SIGTERM and waits for the process.
func (o *operatorProc) stop() {
	o.t.Helper()
	if !o.proc.SignalAndWait(syscall.SIGTERM, stopWait) {
		o.t.Errorf("%s did not exit within %s of SIGTERM; killed it", o.name, stopWait)
	}
}

// printLogTail logs the end of the operator's output, each line cut to
// 1 KiB (an unbounded line is one of the things the suite looks for).
func (o *operatorProc) printLogTail(max int) {
	tail, err := operatorproc.LogTail(o.logPath, max, 1024)
	if err != nil {
		o.t.Logf("%s log: %v", o.name, err)
		return
	}
	o.t.Logf("%s log (end, %s):\n%s", o.name, o.logPath, tail)
}

// logCounter passes the operator's output to its log file and counts
// lines and the longest line since the last mark.
type logCounter struct {
	mu        sync.Mutex
	f         *os.File
	lines     int64
	cur       int // length of the unfinished line
	maxLine   int // longest line since mark
	maxPrefix string
}

// SetFile sets the log file the output is passed to (nil: none).
func (l *logCounter) SetFile(f *os.File) {
	l.mu.Lock()
	l.f = f
	l.mu.Unlock()
}

func (l *logCounter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f != nil {
		_, _ = l.f.Write(p)
	}
	rest := p
	for len(rest) > 0 {
		i := bytes.IndexByte(rest, '\n')
		seg := rest
		if i >= 0 {
			seg = rest[:i]
		}
		if l.cur == 0 && len(seg) > 0 && l.maxLine < len(seg) {
			l.maxPrefix = string(seg[:min(len(seg), 160)])
		}
		l.cur += len(seg)
		if l.cur > l.maxLine {
			l.maxLine = l.cur
		}
		if i < 0 {
			break
		}
		l.lines++
		l.cur = 0
		rest = rest[i+1:]
	}
	return len(p), nil
}

// mark returns the line count and resets the longest line.
func (l *logCounter) mark() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.maxLine, l.maxPrefix = 0, ""
	return l.lines
}

// since returns the lines written since a mark and the longest line since
// then (with its start).
func (l *logCounter) since(mark int64) (lines int64, maxLine int, prefix string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lines - mark, l.maxLine, l.maxPrefix
}

// rssBytes is the resident set size of a process.
func rssBytes(pid int) (int64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("/proc/%d/status has no VmRSS", pid)
}

// scrapeMetrics reads a Prometheus text endpoint and returns, for each
// metric name, the sum of its series, and each labelled series by itself
// (`name{label="value"}`).
func scrapeMetrics(addr string) (map[string]float64, error) {
	hc := &http.Client{Timeout: 5 * time.Second}
	resp, err := hc.Get("http://" + addr + "/metrics")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	out := map[string]float64{}
	s := bufio.NewScanner(resp.Body)
	s.Buffer(make([]byte, 64<<10), 1<<20)
	for s.Scan() {
		line := s.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		sp := strings.LastIndexByte(line, ' ')
		if sp < 0 {
			continue
		}
		v, err := strconv.ParseFloat(line[sp+1:], 64)
		if err != nil {
			continue
		}
		name := line[:sp]
		if i := strings.IndexByte(name, '{'); i >= 0 {
			out[name] = v // one series, by its labels
			name = name[:i]
		}
		out[name] += v
	}
	return out, s.Err()
}

// supportedFlags returns the flags the operator binary accepts.
func supportedFlags() (map[string]bool, error) {
	out, _ := exec.Command(managerBin, "--help").CombinedOutput() // exits 0 or 2 depending on the flag package
	flags := map[string]bool{}
	for _, line := range strings.Split(string(out), "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "-") {
			continue
		}
		name := strings.TrimLeft(strings.Fields(line)[0], "-")
		flags[name] = true
	}
	if len(flags) == 0 {
		return nil, fmt.Errorf("%s --help listed no flags:\n%s", managerBin, out)
	}
	return flags, nil
}

// freeAddr is a 127.0.0.1 address with a port that was free a moment ago.
func freeAddr(t *testing.T) string {
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(mosquitto.FreePort(t)))
}
