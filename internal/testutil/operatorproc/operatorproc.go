// Package operatorproc is the plumbing the end-to-end suites (test/e2e,
// test/abuse) share to run the operator binary as a separate process:
// building it, waiting for the control plane to serve its CRD, starting it
// with its output appended to a log file, signalling and waiting for it,
// and printing the end of its log when a test fails.
package operatorproc

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"time"

	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// GoBuild builds a package of the module in dir into out. It runs the go
// on the PATH, else the one of the GOROOT the tests were built with.
func GoBuild(dir, out, pkg string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go") //nolint:staticcheck // fallback only
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", out, pkg)
	cmd.Dir = dir
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build -o %s %s: %v\n%s", out, pkg, err, b)
	}
	return nil
}

// WaitForCRD waits (up to a minute) until the API server serves DeviceTwins.
func WaitForCRD(c client.Reader) error {
	deadline := time.Now().Add(60 * time.Second)
	for {
		var list v1alpha1.DeviceTwinList
		err := c.List(context.Background(), &list)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the API server does not serve DeviceTwins: %w", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// Environ is the test's environment without what would point the operator
// at another cluster (KUBECONFIG, KUBERNETES_SERVICE_*), nor any variable
// that starts with one of drop (e.g. "POD_NAMESPACE=").
func Environ(drop ...string) []string {
	drop = append([]string{"KUBECONFIG=", "KUBERNETES_SERVICE_"}, drop...)
	var out []string
next:
	for _, kv := range os.Environ() {
		for _, p := range drop {
			if strings.HasPrefix(kv, p) {
				continue next
			}
		}
		out = append(out, kv)
	}
	return out
}

// LogWriter receives a process's output in place of its log file; it is
// told the log file before the process starts and nil once it has exited.
type LogWriter interface {
	io.Writer
	SetFile(f *os.File)
}

// Spec says how to start a process.
type Spec struct {
	Bin  string
	Args []string
	Env  []string
	// LogPath is the file the output is appended to.
	LogPath string
	// Header is written to the log before the process starts.
	Header string
	// Footer, when set, returns what is written to the log after the
	// process exited with err.
	Footer func(err error) string
	// Output, when set, receives the output (and writes it to the log).
	Output LogWriter
}

// Proc is a process started by Start and not yet stopped by SignalAndWait.
// The zero value is ready to use; it may be started again once stopped.
type Proc struct {
	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

// Start starts the process and returns a channel closed once it has exited
// (and its log file is closed). It fails if the process was started and
// not stopped since.
func (p *Proc) Start(s Spec) (<-chan struct{}, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		return nil, errors.New("already running")
	}
	f, err := os.OpenFile(s.LogPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, err
	}
	var out io.Writer = f
	if s.Output != nil {
		s.Output.SetFile(f)
		out = s.Output
	}
	_, _ = io.WriteString(f, s.Header)
	cmd := exec.Command(s.Bin, s.Args...)
	cmd.Env = s.Env
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		if s.Output != nil {
			s.Output.SetFile(nil)
		}
		_ = f.Close()
		return nil, fmt.Errorf("starting %s: %w", s.Bin, err)
	}
	exited := make(chan struct{})
	p.cmd, p.exited = cmd, exited
	go func() {
		err := cmd.Wait()
		if s.Output != nil {
			s.Output.SetFile(nil)
		}
		if s.Footer != nil {
			_, _ = io.WriteString(f, s.Footer(err))
		}
		_ = f.Close()
		close(exited)
	}()
	return exited, nil
}

// Started reports whether the process was started and not stopped since
// (it may have exited by itself).
func (p *Proc) Started() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil
}

// Pid is the process id, or 0 when it is not running.
func (p *Proc) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return 0
	}
	select {
	case <-p.exited:
		return 0
	default:
		return p.cmd.Process.Pid
	}
}

// Running reports whether the process is running.
func (p *Proc) Running() bool { return p.Pid() != 0 }

// SignalAndWait signals the process and waits for it; if it does not exit
// within d it is killed and SignalAndWait returns false. Not started, it
// returns true.
func (p *Proc) SignalAndWait(sig syscall.Signal, d time.Duration) bool {
	p.mu.Lock()
	cmd, exited := p.cmd, p.exited
	p.cmd = nil
	p.mu.Unlock()
	if cmd == nil {
		return true
	}
	_ = cmd.Process.Signal(sig)
	select {
	case <-exited:
		return true
	case <-time.After(d):
		_ = cmd.Process.Kill()
		<-exited
		return false
	}
}

// LogTail returns the last max bytes of the log at path, after a line
// saying how many bytes were cut before them. With maxLine > 0 each line is
// cut to maxLine bytes too (an unbounded line is something a test may be
// looking for).
func LogTail(path string, max, maxLine int) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", err
	}
	var cut string
	if len(b) > max {
		cut = fmt.Sprintf("[... %d bytes cut ...]\n", len(b)-max)
		b = b[len(b)-max:]
	}
	if maxLine <= 0 {
		return cut + string(b), nil
	}
	var out strings.Builder
	out.WriteString(cut)
	for _, line := range strings.Split(string(b), "\n") {
		if len(line) > maxLine {
			line = line[:maxLine] + fmt.Sprintf(" [... %d bytes cut]", len(line)-maxLine)
		}
		out.WriteString(line)
		out.WriteByte('\n')
	}
	return out.String(), nil
}
