package abuse

import (
	"fmt"
	"os"
	"strconv"
	"testing"
	"time"
)

// attacks are the attacks of issue 11, in the order TestAbuse runs them.
var attacks = []struct {
	name string
	run  func(t *testing.T, h *harness)
}{
	{"1-preauth/huge-packet", attackHugePacket},
	{"1-preauth/no-connect", attackSilent},
	{"1-preauth/per-ip-flood", attackIPFlood},
	{"1-preauth/websocket", attackWebSocket},
	{"2-slow-consumer", attackSlowConsumer},
	{"3-rid-reuse", attackRIDReuse},
	{"4-oversized", attackOversized},
	{"5-presence-flood", attackPresence},
	{"6-metadata-amplification", attackMetadata},
	{"7-abandoned-sessions", attackSessions},
	{"8-retained/embedded", attackRetainedEmbedded},
	{"8-retained/mosquitto", attackRetainedExternal},
	{"9-query-flood", attackQueries},
	{"10-topic-escapes", attackEscapes},
	{"11-log-flood", attackLogFlood},
}

// TestAbuse runs each attack once against an operator serving a fleet of
// legitimate devices (KUBETWIN_ABUSE_DEVICES, default 200), then checks
// that every report the fleet had acknowledged is stored.
func TestAbuse(t *testing.T) {
	h := newHarness(t, envInt(t, "KUBETWIN_ABUSE_DEVICES", abuseDevices), reportInterval)
	// The fleet alone first: the bounds hold without any attack.
	h.attack(t, "0-baseline", func(t *testing.T, h *harness) {
		time.Sleep(3 * reportInterval) // a measuring period, not synchronisation
	})
	for _, a := range attacks {
		h.attack(t, a.name, a.run)
	}
	t.Run("every-acknowledged-report-is-stored", func(t *testing.T) {
		ok, failed := h.fleet.counts()
		t.Logf("the fleet sent %d acknowledged and %d failed reports", ok, failed)
		h.checkStored(t)
	})
	if rss := h.mon.max(&h.mon.rss, time.Time{}); rss > h.rssBound {
		t.Errorf("guarantee broken: operator memory: VmRSS reached %s during the suite, over the %s bound", mib(rss), mib(h.rssBound))
	}
}

// TestSoak is make soak: KUBETWIN_SOAK_DEVICES legitimate devices (default
// 1,000, each reporting every KUBETWIN_SOAK_REPORT_INTERVAL, default 10s)
// and all attacks, repeated for KUBETWIN_SOAK_DURATION (e.g. 10m), printing
// memory, goroutines, report latency and lost reports.
func TestSoak(t *testing.T) {
	d := os.Getenv("KUBETWIN_SOAK_DURATION")
	if d == "" {
		t.Skip("a soak run: make soak, or set KUBETWIN_SOAK_DURATION (e.g. 10m)")
	}
	dur, err := time.ParseDuration(d)
	if err != nil {
		t.Fatalf("KUBETWIN_SOAK_DURATION: %v", err)
	}
	n := envInt(t, "KUBETWIN_SOAK_DEVICES", 1000)
	interval := soakReportInterval
	if s := os.Getenv("KUBETWIN_SOAK_REPORT_INTERVAL"); s != "" {
		if interval, err = time.ParseDuration(s); err != nil || interval <= 0 {
			t.Fatalf("KUBETWIN_SOAK_REPORT_INTERVAL=%q: want a positive duration", s)
		}
	}
	h := newHarness(t, n, interval)
	start := time.Now()
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		tk := time.NewTicker(30 * time.Second)
		defer tk.Stop()
		last := time.Now()
		for {
			select {
			case <-stop:
				return
			case now := <-tk.C:
				h.soakLine(start, last)
				last = now
			}
		}
	}()
	h.soakLine(start, start)
	for round := 1; time.Since(start) < dur; round++ {
		h.round = round // new request ids and values (harness.rid)
		for _, a := range attacks {
			if time.Since(start) >= dur {
				break
			}
			h.attack(t, fmt.Sprintf("round%d/%s", round, a.name), a.run)
		}
	}
	close(stop)
	<-done
	h.soakLine(start, start)
	lost := h.checkStored(t)
	ok, failed := h.fleet.counts()
	lat, _ := h.fleet.since(start)
	h.mon.mu.Lock()
	first := h.mon.rss[0].v
	h.mon.mu.Unlock()
	t.Logf("SOAK SUMMARY: %d devices for %s: %d reports acknowledged, %d failed, %d lost (acknowledged but not stored); report latency p50 %s p99 %s; VmRSS first %s, max %s, last %s; goroutines last %d",
		n, time.Since(start).Round(time.Second), ok, failed, lost, percentile(lat, 50).Round(time.Millisecond), percentile(lat, 99).Round(time.Millisecond),
		mib(first), mib(h.mon.max(&h.mon.rss, start)), mib(h.mon.last(&h.mon.rss)), h.mon.last(&h.mon.gor))
}

// soakLine prints one line of the soak's progress; latency is over the
// reports sent since from.
func (h *harness) soakLine(start, from time.Time) {
	lat, failed := h.fleet.since(from)
	ok, allFailed := h.fleet.counts()
	h.t.Logf("soak %6s  VmRSS %9s  heap %9s  goroutines %5d  reports %6d (p50 %5s p99 %6s, failed %d; total ok %d failed %d)",
		time.Since(start).Round(time.Second), mib(h.mon.last(&h.mon.rss)), mib(h.mon.last(&h.mon.heap)), h.mon.last(&h.mon.gor),
		len(lat), percentile(lat, 50).Round(time.Millisecond), percentile(lat, 99).Round(time.Millisecond), len(failed), ok, allFailed)
}

func envInt(t *testing.T, name string, def int) int {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		t.Fatalf("%s=%q: want a positive number", name, s)
	}
	return n
}
