package main

// The simulated devices run in a child process (this program started again
// with --role devices), so that they compete with the operator for the
// machine's cores the way separate programs do, rather than inside the
// operator's Go runtime (one scheduler run queue and one garbage collector
// for 1,000 MQTT clients and tens of thousands of waiting requests would
// slow the operator in ways no real deployment has). The parent drives the
// child through stdin (one command per line) and reads JSON lines from its
// stdout; the child's stderr is the parent's.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Message types on the child's stdout.
const (
	msgConnected     = "connected"
	msgReportsStart  = "reports_started"
	msgReportsDone   = "reports_done"
	msgDesired       = "desired"
	msgError         = "error"
	msgClosed        = "closed"
	msgCount         = "count"
	cmdCount         = "count"
	cmdReports       = "reports"
	cmdClose         = "close"
	childRoleDevices = "devices"
)

// childConfig is what the device process needs; it is passed as JSON in
// the environment variable childConfigEnv.
type childConfig struct {
	BrokerURL       string        `json:"broker_url"`
	Devices         int           `json:"devices"`
	ConnectParallel int           `json:"connect_parallel"`
	RequestTimeout  time.Duration `json:"request_timeout"`
	Rate            float64       `json:"rate"`
	Inflight        int           `json:"inflight"`
	Warmup          time.Duration `json:"warmup"`
	Duration        time.Duration `json:"duration"`
	DrainTimeout    time.Duration `json:"drain_timeout"`
	DeviceLogLimit  int           `json:"device_log_limit"`
	StartUnixNano   int64         `json:"start_unix_nano"`
	// Prefix is the twins' name and device id prefix ("dev-" if empty).
	Prefix string `json:"prefix,omitempty"`
}

const childConfigEnv = "KUBETWIN_BENCH_DEVICES_CONFIG"

// childMsg is any message of the child (fields by type).
type childMsg struct {
	Type  string `json:"type"`
	Error string `json:"error,omitempty"`
	// connected
	ConnectSec float64 `json:"connect_sec,omitempty"`
	// reports_started
	T0 int64 `json:"t0,omitempty"`
	// closed, count
	DeviceLogLines int64 `json:"device_log_lines,omitempty"`
}

// reportSummary is the reports_done message.
type reportSummary struct {
	Type     string       `json:"type"`
	Sent     int64        `json:"sent"`
	Skipped  int64        `json:"skipped"`
	AckedWin int64        `json:"acked_win"`
	Errors   int64        `json:"errors"`
	P50Ms    float64      `json:"p50_ms"`
	P99Ms    float64      `json:"p99_ms"`
	MaxMs    float64      `json:"max_ms"`
	DrainSec float64      `json:"drain_sec"`
	Devices  []devSummary `json:"devices"`
}

// devSummary is one device's last acknowledged report.
type devSummary struct {
	Name       string `json:"name"`
	Ver        int64  `json:"ver"`
	Seq        int64  `json:"seq"`
	T          string `json:"t"`
	Errs       int64  `json:"errs,omitempty"`
	LastErr    string `json:"last_err,omitempty"`
	VersionGap string `json:"version_gap,omitempty"`
}

// desiredEvent is an OnDesired call with a setpoint.
type desiredEvent struct {
	Type     string `json:"type"`
	Device   string `json:"device"`
	Setpoint int64  `json:"setpoint"`
	Version  int64  `json:"version"`
	At       int64  `json:"at"` // unix nanoseconds
}

// runDeviceChild is main of the device process.
func runDeviceChild() int {
	var cc childConfig
	if err := json.Unmarshal([]byte(os.Getenv(childConfigEnv)), &cc); err != nil {
		fmt.Fprintln(os.Stderr, "bench devices: bad config:", err)
		return 2
	}
	if cc.StartUnixNano != 0 {
		benchStart = time.Unix(0, cc.StartUnixNano)
	}
	var outMu sync.Mutex
	enc := json.NewEncoder(os.Stdout)
	send := func(v any) {
		outMu.Lock()
		defer outMu.Unlock()
		_ = enc.Encode(v)
	}
	devLog := &lineLog{prefix: "[device] ", limit: int64(cc.DeviceLogLimit), out: os.Stderr}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// Commands; EOF (the parent went away) ends the process.
	cmds := make(chan string)
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			cmds <- strings.TrimSpace(sc.Text())
		}
		cancel()
		close(cmds)
	}()

	start := time.Now()
	devs, err := connectDevices(ctx, cc, devLog, func(e desiredEvent) { e.Type = msgDesired; send(e) })
	if err != nil {
		send(childMsg{Type: msgError, Error: err.Error()})
		closeDevices(devs)
		return 1
	}
	send(childMsg{Type: msgConnected, ConnectSec: time.Since(start).Seconds()})
	for cmd := range cmds {
		switch cmd {
		case cmdReports:
			sum := runReports(ctx, devs, cc, func(t0 time.Time) { send(childMsg{Type: msgReportsStart, T0: t0.UnixNano()}) })
			send(sum)
		case cmdCount:
			send(childMsg{Type: msgCount, DeviceLogLines: devLog.lines.Load()})
		case cmdClose:
			// The parent stops the operator first, so there is nothing to
			// say goodbye to: exiting closes every connection.
			send(childMsg{Type: msgClosed, DeviceLogLines: devLog.lines.Load()})
			return 0
		}
	}
	closeDevices(devs)
	return 0
}

// deviceProc is the parent's handle on the device process.
type deviceProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	msgs  chan json.RawMessage // every message except desired events
	exit  chan error           // the process's end

	mu      sync.Mutex
	waiters map[string]chan desiredEvent // by device name
}

// startDeviceProc starts the device process.
func startDeviceProc(cc childConfig) (*deviceProc, error) {
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	raw, _ := json.Marshal(cc)
	cmd := exec.Command(exe, "--role", childRoleDevices)
	cmd.Env = append(os.Environ(), childConfigEnv+"="+string(raw))
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &deviceProc{
		cmd: cmd, stdin: stdin, msgs: make(chan json.RawMessage, 16), exit: make(chan error, 1),
		waiters: map[string]chan desiredEvent{},
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 1<<28)
		for sc.Scan() {
			line := append([]byte(nil), sc.Bytes()...)
			var m childMsg
			if json.Unmarshal(line, &m) != nil {
				progress("device process said: %s", line)
				continue
			}
			if m.Type == msgDesired {
				var e desiredEvent
				if json.Unmarshal(line, &e) == nil {
					p.mu.Lock()
					ch := p.waiters[e.Device]
					p.mu.Unlock()
					if ch != nil {
						select {
						case ch <- e:
						default:
						}
					}
				}
				continue
			}
			p.msgs <- line
		}
		close(p.msgs)
		p.exit <- cmd.Wait()
	}()
	return p, nil
}

func (p *deviceProc) command(c string) error {
	_, err := io.WriteString(p.stdin, c+"\n")
	return err
}

// next waits for the next message of type want (an error message ends
// the wait with its error) and decodes it into out.
func (p *deviceProc) next(ctx context.Context, want string, timeout time.Duration, out any) error {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case line, ok := <-p.msgs:
			if !ok {
				return errors.New("the device process exited")
			}
			var m childMsg
			_ = json.Unmarshal(line, &m)
			switch m.Type {
			case want:
				return json.Unmarshal(line, out)
			case msgError:
				return fmt.Errorf("device process: %s", m.Error)
			default:
				progress("ignoring device process message %s", line)
			}
		case <-t.C:
			return fmt.Errorf("no %q from the device process within %s", want, timeout)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// waitDesired registers for the next desired event of a device.
func (p *deviceProc) waitDesired(name string) chan desiredEvent {
	ch := make(chan desiredEvent, 4)
	p.mu.Lock()
	p.waiters[name] = ch
	p.mu.Unlock()
	return ch
}

func (p *deviceProc) stopWaiting(name string) {
	p.mu.Lock()
	delete(p.waiters, name)
	p.mu.Unlock()
}

// logLines returns the device library's log line count so far.
func (p *deviceProc) logLines(ctx context.Context) int64 {
	var m childMsg
	if err := p.command(cmdCount); err != nil {
		return -1
	}
	if err := p.next(ctx, msgCount, 30*time.Second, &m); err != nil {
		return -1
	}
	return m.DeviceLogLines
}

// shutdown closes the devices and waits for the process; it returns the
// device library's log line count.
func (p *deviceProc) shutdown() int64 {
	var closed childMsg
	if err := p.command(cmdClose); err == nil {
		if err := p.next(context.Background(), msgClosed, 30*time.Second, &closed); err != nil {
			progress("device process: %v", err)
		}
	}
	_ = p.stdin.Close()
	select {
	case <-p.exit:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exit
	}
	return closed.DeviceLogLines
}
