// Package mosquitto starts real Mosquitto brokers for tests: on a free port
// of 127.0.0.1, without persistence, logging to a file that is printed when
// the test fails, and stopped when the test ends.
package mosquitto

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Binary returns the path of the mosquitto binary (Debian installs it in
// /usr/sbin, which is not always on the PATH).
func Binary() (string, error) {
	if p, err := exec.LookPath("mosquitto"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"} {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("mosquitto is not installed (apt-get install mosquitto mosquitto-clients)")
}

// BaseConfig is the configuration every test broker gets before the
// caller's: the operator holds many unacknowledged messages (it acknowledges
// a report only once it is stored), and Mosquitto's default window of 20 was
// seen delivering a device's queued messages out of order.
const BaseConfig = "persistence false\nmax_inflight_messages 1000\nlog_dest stderr\nlog_timestamp_format %H:%M:%S\n"

// Start runs a broker with extra configuration (e.g. "allow_anonymous
// true\n") for the rest of the test and returns its address. A port taken
// by someone else in the meantime is retried on another one.
func Start(t testing.TB, extra string) string {
	t.Helper()
	for attempt := 1; ; attempt++ {
		addr, log, err := StartOn(t, FreePort(t), extra)
		if err == nil {
			return addr
		}
		if attempt < 3 && strings.Contains(log, "Address already in use") {
			t.Logf("mosquitto: %v; trying another port", err)
			continue
		}
		t.Fatalf("%v\n%s", err, log)
	}
}

// StartOn starts a broker on port; on failure it returns the broker's log.
func StartOn(t testing.TB, port int, extra string) (addr, log string, err error) {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	conf := filepath.Join(dir, "mosquitto.conf")
	cfg := fmt.Sprintf("listener %d 127.0.0.1\n", port) + BaseConfig + extra
	if err := os.WriteFile(conf, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "mosquitto.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-c", conf)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting mosquitto: %v", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		_ = logf.Close()
		if t.Failed() {
			if b, err := os.ReadFile(logf.Name()); err == nil {
				t.Logf("mosquitto log:\n%s", b)
			}
		}
	})
	addr = fmt.Sprintf("127.0.0.1:%d", port)
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-exited:
			b, _ := os.ReadFile(logf.Name())
			return "", string(b), fmt.Errorf("mosquitto exited (%v)", cmd.ProcessState)
		default:
		}
		// Listening, and it is this Mosquitto that listens.
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			_ = c.Close()
			if b, _ := os.ReadFile(logf.Name()); strings.Contains(string(b), " running") {
				return addr, "", nil
			}
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(logf.Name())
			return "", string(b), fmt.Errorf("mosquitto did not listen on %s: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// FreePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
