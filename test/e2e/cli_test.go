package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// This file drives the Mosquitto command-line clients the way
// docs/protocol.md tells a device author to.

// cliMessage is one message mosquitto_sub printed.
type cliMessage struct {
	Retained bool
	Topic    string
	Payload  string
}

// JSON decodes the payload (numbers as json.Number); it is nil if the
// payload is not a JSON object.
func (m cliMessage) JSON() map[string]any {
	var out map[string]any
	if decodeJSON([]byte(m.Payload), &out) != nil {
		return nil
	}
	return out
}

func (m cliMessage) String() string {
	r := ""
	if m.Retained {
		r = " (retained)"
	}
	return m.Topic + r + " " + m.Payload
}

// mosquittoSub is a running mosquitto_sub.
type mosquittoSub struct {
	t    *testing.T
	name string
	args []string
	cmd  *exec.Cmd

	mu      sync.Mutex
	msgs    []cliMessage
	changed chan struct{} // closed and replaced on every message and at exit
	stderr  bytes.Buffer
	done    bool
	exited  chan struct{}
}

// startSub runs mosquitto_sub against addr with the given arguments (host,
// port and output format are added) until the test ends or stop/kill.
func startSub(t *testing.T, name, addr string, args ...string) *mosquittoSub {
	t.Helper()
	host, port := splitAddr(t, addr)
	// -F prints the retained flag, the topic and the payload of each message.
	full := append([]string{"-h", host, "-p", port, "-F", "%r %t %p"}, args...)
	s := &mosquittoSub{t: t, name: name, args: full, changed: make(chan struct{}), exited: make(chan struct{})}
	s.cmd = exec.Command(mosquittoSubBin, full...)
	stdout, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	s.cmd.Stderr = &lockedWriter{mu: &s.mu, w: &s.stderr}
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("starting mosquitto_sub: %v", err)
	}
	t.Logf("%s: mosquitto_sub %s", name, shellQuote(full))
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			m, ok := parseSubLine(sc.Text())
			s.mu.Lock()
			if ok {
				s.msgs = append(s.msgs, m)
			} else {
				fmt.Fprintf(&s.stderr, "[unparsed output] %s\n", sc.Text())
			}
			close(s.changed)
			s.changed = make(chan struct{})
			s.mu.Unlock()
		}
		_ = s.cmd.Wait()
		s.mu.Lock()
		s.done = true
		close(s.changed)
		s.changed = make(chan struct{})
		s.mu.Unlock()
		close(s.exited)
	}()
	t.Cleanup(func() {
		s.kill()
		if t.Failed() {
			t.Logf("%s: %s", s.name, s.describe())
		}
	})
	return s
}

// parseSubLine parses "<retained 0|1> <topic> <payload>".
func parseSubLine(line string) (cliMessage, bool) {
	r, rest, ok := strings.Cut(line, " ")
	if !ok || (r != "0" && r != "1") {
		return cliMessage{}, false
	}
	topic, payload, _ := strings.Cut(rest, " ")
	return cliMessage{Retained: r == "1", Topic: topic, Payload: payload}, true
}

// describe lists what the subscriber printed, for failure messages.
func (s *mosquittoSub) describe() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "mosquitto_sub %s received %d message(s):", shellQuote(s.args), len(s.msgs))
	for i, m := range s.msgs {
		fmt.Fprintf(&b, "\n  %d: %s", i, m)
	}
	if s.stderr.Len() > 0 {
		fmt.Fprintf(&b, "\n  stderr: %s", strings.TrimSpace(s.stderr.String()))
	}
	if s.done {
		fmt.Fprintf(&b, "\n  (exited: %v)", s.cmd.ProcessState)
	}
	return b.String()
}

// waitFor waits for a message (received at any time so far) on topic for
// which match holds, and returns it.
func (s *mosquittoSub) waitFor(what, topic string, match func(m cliMessage) bool) cliMessage {
	s.t.Helper()
	deadline := time.NewTimer(wait)
	defer deadline.Stop()
	for {
		s.mu.Lock()
		for _, m := range s.msgs {
			if m.Topic == topic && (match == nil || match(m)) {
				s.mu.Unlock()
				return m
			}
		}
		ch, done := s.changed, s.done
		s.mu.Unlock()
		if done {
			s.t.Fatalf("%s: waiting for %s on %s, but mosquitto_sub exited; %s", s.name, what, topic, s.describe())
		}
		select {
		case <-ch:
		case <-deadline.C:
			s.t.Fatalf("%s: no %s on %s within %s; %s", s.name, what, topic, wait, s.describe())
		}
	}
}

// stop ends mosquitto_sub with SIGINT: it disconnects cleanly (no will).
func (s *mosquittoSub) stop() { s.signal(syscall.SIGINT) }

// kill ends mosquitto_sub with SIGKILL: the broker sees the connection drop.
func (s *mosquittoSub) kill() { s.signal(syscall.SIGKILL) }

func (s *mosquittoSub) signal(sig syscall.Signal) {
	select {
	case <-s.exited:
		return
	default:
	}
	_ = s.cmd.Process.Signal(sig)
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
}

// mosquittoPub runs mosquitto_pub against addr as clientID and fails the
// test if it fails.
func mosquittoPub(t *testing.T, addr, clientID string, args ...string) {
	t.Helper()
	host, port := splitAddr(t, addr)
	full := append([]string{"-h", host, "-p", port, "-i", clientID, "-q", "1"}, args...)
	ctx, cancel := context.WithTimeout(context.Background(), commandWait)
	defer cancel()
	out, err := exec.CommandContext(ctx, mosquittoPubBin, full...).CombinedOutput()
	if err != nil {
		t.Fatalf("mosquitto_pub %s: %v\n%s", shellQuote(full), err, out)
	}
}

func splitAddr(t *testing.T, addr string) (host, port string) {
	t.Helper()
	i := strings.LastIndex(addr, ":")
	if i < 0 {
		t.Fatalf("bad address %q", addr)
	}
	return addr[:i], addr[i+1:]
}

// shellQuote renders arguments for a log line.
func shellQuote(args []string) string {
	q := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \"'{}$#+*%") {
			q[i] = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		} else {
			q[i] = a
		}
	}
	return strings.Join(q, " ")
}

// lockedWriter serialises writes to w under mu.
type lockedWriter struct {
	mu *sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
