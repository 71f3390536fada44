package ratelog

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// clock is a settable time for Limiter.WithClock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func TestLimiterBurstThenRateThenSuppressedCount(t *testing.T) {
	c := &clock{t: time.Unix(1000, 0)}
	l := New(10).WithClock(c.now)
	before := testutil.ToFloat64(Suppressed.WithLabelValues("refused"))
	for i := range 20 {
		if ok, n := l.Allow("refused"); !ok || n != 0 {
			t.Fatalf("line %d of the burst: ok=%v suppressed=%d", i, ok, n)
		}
	}
	for range 500 {
		if ok, _ := l.Allow("refused"); ok {
			t.Fatal("a line over the burst passed without time passing")
		}
	}
	// Another kind has its own bucket.
	if ok, _ := l.Allow("dropped"); !ok {
		t.Fatal("another kind was limited")
	}
	c.add(100 * time.Millisecond) // one token at 10/s
	ok, n := l.Allow("refused")
	if !ok || n != 500 {
		t.Fatalf("after 100ms: ok=%v suppressed=%d, want true 500", ok, n)
	}
	if ok, _ := l.Allow("refused"); ok {
		t.Fatal("second line after 100ms passed")
	}
	if got := testutil.ToFloat64(Suppressed.WithLabelValues("refused")) - before; got != 501 {
		t.Errorf("metric grew by %v, want 501", got)
	}
}

func TestLimiterZeroMeansNoLimit(t *testing.T) {
	l := New(0)
	for range 1000 {
		if ok, _ := l.Allow("k"); !ok {
			t.Fatal("limited")
		}
	}
	var nilLim *Limiter
	if ok, _ := nilLim.Allow("k"); !ok {
		t.Fatal("nil Limiter limited")
	}
}

func TestLimiterBoundsKinds(t *testing.T) {
	l := New(1)
	for i := range 3 * maxKinds {
		l.Allow(strings.Repeat("x", i))
	}
	if len(l.kinds) > maxKinds+1 {
		t.Fatalf("%d kinds tracked", len(l.kinds))
	}
}

func TestTruncate(t *testing.T) {
	if got := Truncate("short"); got != "short" {
		t.Errorf("Truncate(short) = %q", got)
	}
	long := strings.Repeat("é", 40000) // 2 bytes a rune
	got := Truncate(long)
	if len(got) > MaxValueLen+32 || !strings.HasPrefix(got, strings.Repeat("é", MaxValueLen/2)) ||
		!strings.Contains(got, "more bytes") {
		t.Errorf("Truncate(80000 bytes) = %q", got)
	}
	odd := "a" + strings.Repeat("é", 100) // the cut falls inside a rune
	if got := Truncate(odd); !strings.HasPrefix(got, "a"+strings.Repeat("é", 63)+"...") {
		t.Errorf("Truncate cut a rune: %q", got)
	}
}

func TestLoggerLimitsAndTruncates(t *testing.T) {
	var lines []string
	log := funcr.New(func(prefix, args string) { lines = append(lines, prefix+" "+args) }, funcr.Options{})
	c := &clock{t: time.Unix(1000, 0)}
	l := NewLogger(log, New(10).WithClock(c.now))
	huge := strings.Repeat("u", 64<<10)
	for range 1000 {
		l.Info("refused device connection", "username", huge, "raw", []byte(huge), "error", errors.New(huge), "n", 7)
		l.Error(errors.New(huge), "refused topic", "topic", huge)
	}
	c.add(time.Second)
	l.Info("refused device connection", "username", "u")
	if len(lines) != 20+20+2 {
		t.Fatalf("%d lines, want 42 (two bursts, one suppressed line and the line after a second)", len(lines))
	}
	for _, s := range lines {
		if len(s) > 2048 {
			t.Fatalf("line of %d bytes: %.200s", len(s), s)
		}
	}
	if s := lines[40]; !strings.Contains(s, SuppressedMessage) || !strings.Contains(s, `"suppressed"=980`) {
		t.Errorf("line 41 = %s, want the suppressed count 980", s)
	}
}

func TestSlogHandlerLimitsAndTruncates(t *testing.T) {
	var buf bytes.Buffer
	c := &clock{t: time.Unix(1000, 0)}
	log := slog.New(SlogHandler(slog.NewTextHandler(&buf, nil), New(10).WithClock(c.now))).With("listener", strings.Repeat("l", 5000))
	type packet struct{ Payload []byte }
	huge := strings.Repeat("c", 64<<10)
	for range 1000 {
		log.Warn("client store quota reached", "client", huge, "pk", packet{Payload: []byte(huge)},
			"error", errors.New(huge), slog.Group("g", "id", huge))
	}
	c.add(time.Second)
	log.Warn("client store quota reached", "client", "c")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 22 {
		t.Fatalf("%d lines, want 22", len(lines))
	}
	for _, s := range lines {
		if len(s) > 2048 {
			t.Fatalf("line of %d bytes: %.200s", len(s), s)
		}
	}
	if !strings.Contains(lines[20], SuppressedMessage) || !strings.Contains(lines[20], "suppressed=980") {
		t.Errorf("line 21 = %s", lines[20])
	}
}
