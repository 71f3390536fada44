package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	. "github.com/onsi/gomega"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/pkg/device"
)

// Killing the operator (SIGKILL, in the middle of a stream of reports) loses
// no report it acknowledged: for every device, the stored reported document
// is the last one that got a 204.
func TestKillLosesNoAcknowledgedReport(t *testing.T) {
	forEachBroker(t, testKillLosesNoAcknowledgedReport)
}

// reporter is one device reporting {"seq": n} for n = 1, 2, ...
type reporter struct {
	id     string
	client *device.Client

	mu sync.Mutex
	st reportState
}

// reportState is what a reporter has done so far.
type reportState struct {
	id          string
	sent        int64 // highest n sent
	lastAcked   int64 // highest n that got a 204
	lastVersion int64 // the reported version of that 204
	acked       int   // reports that got a 204
	ackedAfter  int   // of which after the restart
	err         error // a report that failed: the device stopped
	slowest     time.Duration
	slowestSeq  int64
}

func (r *reporter) snapshot() reportState {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.st
}

func (s reportState) String() string {
	return fmt.Sprintf("%s: sent up to seq %d, last acknowledged seq %d (version %d), %d acknowledged (%d after the restart), slowest report seq %d took %s, err=%v",
		s.id, s.sent, s.lastAcked, s.lastVersion, s.acked, s.ackedAfter, s.slowestSeq, s.slowest.Round(time.Millisecond), s.err)
}

func testKillLosesNoAcknowledgedReport(t *testing.T, kind brokerKind) {
	g := NewWithT(t)
	ns, op := setup(t, kind)
	const devices = 20
	logs := newDeviceLog(t)

	sfx := randomSuffix()
	reporters := make([]*reporter, devices)
	for i := range reporters {
		id := fmt.Sprintf("kill-%s-%02d", sfx, i)
		createTwin(t, ns, id, id, "")
		reporters[i] = &reporter{id: id, st: reportState{id: id}}
	}
	for _, r := range reporters {
		waitObserved(t, ns, r.id)
	}

	// Watch every status write: a device's stored seq must never go back.
	seqs := watchSeqs(t, ns)

	// Connect the devices (pkg/device: persistent session, clean session false).
	var wg sync.WaitGroup
	errs := make([]error, devices)
	for i, r := range reporters {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), wait)
			defer cancel()
			r.client, errs[i] = device.Connect(ctx, device.Options{
				BrokerURL: op.brokerURL(),
				DeviceID:  r.id,
				Logger:    logs.logger(r.id),
				// Resend unanswered requests sooner than the default 10s.
				RequestTimeout: 3 * time.Second,
			})
		})
	}
	wg.Wait()
	for _, r := range reporters {
		if r.client != nil {
			t.Cleanup(func() { _ = r.client.Close() })
		}
	}
	for i, r := range reporters {
		if errs[i] != nil {
			t.Fatalf("device %s: %v", r.id, errs[i])
		}
	}

	// Every device reports {"seq": n}, n = 1, 2, ..., one at a time, with
	// small pauses, until told to stop. A report that is not answered is
	// resent by the library; Report returns nil only on a 204.
	var stop, restarted atomic.Bool
	loops := sync.WaitGroup{}
	for i, r := range reporters {
		loops.Go(func() {
			for n := int64(1); !stop.Load(); n++ {
				r.mu.Lock()
				r.st.sent = n
				r.mu.Unlock()
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				start := time.Now()
				v, err := r.client.Report(ctx, map[string]any{"seq": n})
				took := time.Since(start)
				cancel()
				r.mu.Lock()
				st := &r.st
				if took > st.slowest {
					st.slowest, st.slowestSeq = took, n
				}
				if err != nil {
					st.err = fmt.Errorf("report seq %d: %w", n, err)
					r.mu.Unlock()
					return
				}
				st.lastAcked, st.lastVersion = n, v
				st.acked++
				if restarted.Load() {
					st.ackedAfter++
				}
				r.mu.Unlock()
				// Pacing, not synchronisation: devices report at uneven
				// rates, as real ones do.
				time.Sleep(time.Duration(10+(int(n)*7+i*13)%40) * time.Millisecond)
			}
		})
	}
	stopAll := func() {
		stop.Store(true)
		done := make(chan struct{})
		go func() { loops.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(3 * time.Minute):
			t.Errorf("device loops did not finish")
		}
	}
	t.Cleanup(func() { // also on a failure below
		if t.Failed() {
			// Do not wait for reports the operator may never answer.
			stop.Store(true)
			for _, r := range reporters {
				_ = r.client.Close()
			}
		}
		stopAll()
	})

	// Kill it in mid-stream: once every device has had reports
	// acknowledged.
	g.Eventually(func(g Gomega) {
		for _, r := range reporters {
			s := r.snapshot()
			if s.err != nil {
				StopTrying("a device's report failed").Wrap(s.err).Now()
			}
			g.Expect(s.acked).To(BeNumerically(">=", 3), "acknowledged reports before the kill: %s", s)
		}
	}, wait, tick).Should(Succeed())
	before := 0
	for _, r := range reporters {
		before += r.snapshot().acked
	}
	t.Logf("%d reports acknowledged before the kill; killing the operator (SIGKILL)", before)
	op.kill()
	// Restart it once every device has a report the dead operator did not
	// answer, so the restarted one must deal with reports in flight.
	g.Eventually(func(g Gomega) {
		for _, r := range reporters {
			s := r.snapshot()
			g.Expect(s.sent).To(BeNumerically(">", s.lastAcked), "a device with no unanswered report: %s", s)
		}
	}, wait, tick).Should(Succeed())
	op.start()
	restarted.Store(true)
	t.Logf("operator restarted")

	// Let the devices recover and keep reporting for a while.
	g.Eventually(func(g Gomega) {
		for _, r := range reporters {
			s := r.snapshot()
			if s.err != nil {
				StopTrying("a device's report failed").Wrap(s.err).Now()
			}
			g.Expect(s.ackedAfter).To(BeNumerically(">=", 10), "acknowledged reports after the restart: %s", s)
		}
	}, 90*time.Second, 200*time.Millisecond).Should(Succeed())
	stopAll()

	total := 0
	for _, r := range reporters {
		s := r.snapshot()
		t.Log(s)
		total += s.acked
		g.Expect(s.err).NotTo(HaveOccurred(), "device %s", s.id)
		g.Expect(s.lastAcked).To(Equal(s.sent), "device %s: the last report it sent was not acknowledged", s.id)
	}
	t.Logf("%d reports acknowledged in all", total)

	// The API server has, for every device, the last acknowledged report,
	// right away (a 204 means stored) and for good (no old, redelivered
	// report may overwrite it afterwards).
	check := func(g Gomega) {
		for _, r := range reporters {
			s := r.snapshot()
			tw := getTwin(g, ns, s.id)
			g.Expect(doc(tw.Status.Reported)).To(Equal(obj{"seq": num(fmt.Sprint(s.lastAcked))}),
				"device %s: status.reported (reportedVersion %d) is not its last acknowledged report; %s", s.id, tw.Status.ReportedVersion, s)
			g.Expect(tw.Status.ReportedVersion).To(BeNumerically(">=", int64(s.acked)),
				"device %s: status.reportedVersion is below the number of acknowledged reports; %s", s.id, s)
			g.Expect(tw.Status.ReportedVersion).To(BeNumerically(">=", s.lastVersion),
				"device %s: status.reportedVersion is below the version of the last 204; %s", s.id, s)
		}
	}
	check(g)
	g.Consistently(check, 3*time.Second, 500*time.Millisecond).Should(Succeed())
	g.Expect(seqs.regressions()).To(BeEmpty(), "a stored report was overwritten by an older one")
}

// seqWatch follows the status.reported.seq of every twin of a namespace
// through a watch, which sees every write in order, and records every time
// it went back.
type seqWatch struct {
	mu      sync.Mutex
	last    map[string]int64
	regress []string
}

func watchSeqs(t *testing.T, ns string) *seqWatch {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w, err := k8s.Watch(ctx, &v1alpha1.DeviceTwinList{}, client.InNamespace(ns))
	if err != nil {
		cancel()
		t.Fatalf("watching DeviceTwins: %v", err)
	}
	s := &seqWatch{last: map[string]int64{}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range w.ResultChan() {
			tw, ok := ev.Object.(*v1alpha1.DeviceTwin)
			if !ok {
				continue
			}
			n, ok := doc(tw.Status.Reported)["seq"].(json.Number)
			if !ok {
				continue
			}
			seq, _ := n.Int64()
			s.mu.Lock()
			if prev, ok := s.last[tw.Name]; ok && seq < prev {
				s.regress = append(s.regress, fmt.Sprintf("%s: status.reported.seq went from %d back to %d (reportedVersion %d, resourceVersion %s)",
					tw.Name, prev, seq, tw.Status.ReportedVersion, tw.ResourceVersion))
			}
			s.last[tw.Name] = seq
			s.mu.Unlock()
		}
	}()
	t.Cleanup(func() { w.Stop(); cancel(); <-done })
	return s
}

func (s *seqWatch) regressions() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.regress...)
}

// deviceLog collects the device library's logs of a test and prints them
// if it fails.
type deviceLog struct {
	mu    sync.Mutex
	lines []string
}

func newDeviceLog(t *testing.T) *deviceLog {
	l := &deviceLog{}
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		l.mu.Lock()
		defer l.mu.Unlock()
		lines := l.lines
		if len(lines) > 2000 {
			lines = lines[len(lines)-2000:]
		}
		t.Logf("device library log (%d lines, last %d):\n%s", len(l.lines), len(lines), strings.Join(lines, "\n"))
	})
	return l
}

func (l *deviceLog) logger(id string) logr.Logger {
	return funcr.New(func(prefix, args string) {
		line := time.Now().Format("15:04:05.000") + " " + id + " " + prefix + " " + args
		l.mu.Lock()
		l.lines = append(l.lines, line)
		l.mu.Unlock()
	}, funcr.Options{})
}
