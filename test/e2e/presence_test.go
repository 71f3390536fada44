package e2e

import (
	"bytes"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	. "github.com/onsi/gomega"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// A device that connects is Connected; a device process that dies without
// a DISCONNECT is soon not: Mosquitto publishes its last will, the embedded
// broker sees its connection drop.
func TestPresence(t *testing.T) {
	forEachBroker(t, testPresence)
}

func testPresence(t *testing.T, kind brokerKind) {
	g := NewWithT(t)
	ns, op := setup(t, kind)
	id := "presence-" + randomSuffix()
	createTwin(t, ns, id, id, `{"telemetryConfig":{"sendFrequencyInSecs":5}}`)
	tw := waitObserved(t, ns, id)
	c := cond(tw, v1alpha1.ConditionConnected)
	g.Expect(c.Status).To(BeEquivalentTo("False"), "Connected before the device ever connected: %+v", c)
	g.Expect(c.Reason).To(Equal(v1alpha1.ReasonNeverConnected), "Connected before the device ever connected: %+v", c)

	for round := 1; round <= 2; round++ {
		sim := startDeviceSim(t, "--broker", op.brokerURL(), "--id", id, "--apply-desired")
		sim.waitOutput(id + ": connected")
		g.Eventually(func(g Gomega) {
			tw := getTwin(g, ns, id)
			c := cond(tw, v1alpha1.ConditionConnected)
			g.Expect(c.Status).To(BeEquivalentTo("True"), "Connected condition: %+v", c)
			g.Expect(c.Reason).To(Equal(v1alpha1.ReasonConnected), "Connected condition: %+v", c)
			g.Expect(tw.Status.ConnectionState).To(Equal(v1alpha1.ConnectionStateConnected), "status.connectionState")
		}, wait, tick).Should(Succeed(), "round %d: the device connected; device-sim output:\n%s", round, sim.output())

		// The device dies: its socket closes without an MQTT DISCONNECT.
		sim.kill()
		g.Eventually(func(g Gomega) {
			tw := getTwin(g, ns, id)
			c := cond(tw, v1alpha1.ConditionConnected)
			g.Expect(c.Status).To(BeEquivalentTo("False"), "Connected condition: %+v", c)
			g.Expect(c.Reason).To(Equal(v1alpha1.ReasonDisconnected), "Connected condition: %+v", c)
			g.Expect(tw.Status.ConnectionState).To(Equal(v1alpha1.ConnectionStateDisconnected), "status.connectionState")
		}, wait, tick).Should(Succeed(), "round %d: the device process was killed; device-sim output:\n%s", round, sim.output())
	}
}

// deviceSim is a device-sim process.
type deviceSim struct {
	t      *testing.T
	cmd    *exec.Cmd
	mu     sync.Mutex
	out    bytes.Buffer
	exited chan struct{}
}

// startDeviceSim runs the device simulator built by TestMain.
func startDeviceSim(t *testing.T, args ...string) *deviceSim {
	t.Helper()
	s := &deviceSim{t: t, exited: make(chan struct{})}
	s.cmd = exec.Command(deviceSimBin, args...)
	w := &lockedWriter{mu: &s.mu, w: &s.out}
	s.cmd.Stdout, s.cmd.Stderr = w, w
	if err := s.cmd.Start(); err != nil {
		t.Fatalf("starting device-sim: %v", err)
	}
	go func() { _ = s.cmd.Wait(); close(s.exited) }()
	t.Cleanup(func() {
		s.kill()
		if t.Failed() {
			t.Logf("device-sim %s output:\n%s", strings.Join(args, " "), s.output())
		}
	})
	return s
}

func (s *deviceSim) output() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.out.String()
}

// waitOutput waits until the simulator has printed want.
func (s *deviceSim) waitOutput(want string) {
	s.t.Helper()
	deadline := time.Now().Add(wait)
	for !strings.Contains(s.output(), want) {
		select {
		case <-s.exited:
			s.t.Fatalf("device-sim exited (%v) before printing %q:\n%s", s.cmd.ProcessState, want, s.output())
		default:
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("device-sim did not print %q within %s:\n%s", want, wait, s.output())
		}
		time.Sleep(tick)
	}
}

// kill ends the simulator with SIGKILL: no offline presence, no DISCONNECT.
func (s *deviceSim) kill() {
	select {
	case <-s.exited:
		return
	default:
	}
	_ = s.cmd.Process.Signal(syscall.SIGKILL)
	<-s.exited
}
