// Package ratelog bounds the logs an attacker can cause. Every line of one
// kind (a fixed log message) passes a token bucket; lines over it are
// counted, and the next line of that kind that passes is preceded by one
// "log lines suppressed" line with the count. Values an attacker chooses
// (usernames, client ids, topics, error texts quoting them) are truncated,
// so no line grows with the input either.
package ratelog

import (
	"fmt"
	"math"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/time/rate"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

const (
	// DefaultRate is the default sustained rate of lines per kind and
	// second; the burst is twice the rate.
	DefaultRate = 10
	// MaxValueLen bounds a logged string value (username, client id,
	// topic), in bytes.
	MaxValueLen = 128
	// MaxErrorLen bounds a logged error text or formatted value, in bytes.
	MaxErrorLen = 512
	// maxKinds bounds the kinds tracked; kinds are fixed messages, so only
	// a bug reaches it, and the rest share one bucket.
	maxKinds = 256
	// otherKind is the shared kind beyond maxKinds.
	otherKind = "other"
	// SuppressedMessage is the message of the line that reports how many
	// lines of a kind were suppressed.
	SuppressedMessage = "log lines suppressed"
)

// Suppressed counts the log lines a Limiter dropped, by kind.
var Suppressed = prometheus.NewCounterVec(prometheus.CounterOpts{
	Namespace: "kubetwin", Subsystem: "log", Name: "lines_suppressed_total",
	Help: "Log lines dropped by the log rate limit (--log-rate-limit), by kind (the log message).",
}, []string{"kind"})

func init() {
	metrics.Registry.MustRegister(Suppressed)
}

// Limiter is a token bucket per kind of log line. It is safe for
// concurrent use.
type Limiter struct {
	limit rate.Limit
	burst int
	now   func() time.Time

	mu    sync.Mutex
	kinds map[string]*bucket
}

type bucket struct {
	lim        *rate.Limiter
	suppressed int64
}

// New returns a Limiter that lets perSecond lines of each kind through
// per second, with a burst of twice that (at least 1). perSecond <= 0
// means no limit.
func New(perSecond float64) *Limiter {
	l := &Limiter{limit: rate.Inf, now: time.Now, kinds: map[string]*bucket{}}
	if perSecond > 0 {
		l.limit = rate.Limit(perSecond)
		l.burst = max(1, int(math.Ceil(2*perSecond)))
	}
	return l
}

// WithClock makes l read the time from now (tests).
func (l *Limiter) WithClock(now func() time.Time) *Limiter {
	l.now = now
	return l
}

// Allow reports whether a line of kind may be logged now. When it may and
// lines of that kind were suppressed since the last one allowed,
// suppressed is their number: log it first (see SuppressedMessage).
func (l *Limiter) Allow(kind string) (ok bool, suppressed int64) {
	if l == nil || l.limit == rate.Inf {
		return true, 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.kinds[kind]
	if b == nil {
		if len(l.kinds) >= maxKinds {
			kind = otherKind
			b = l.kinds[kind]
		}
		if b == nil {
			b = &bucket{lim: rate.NewLimiter(l.limit, l.burst)}
			l.kinds[kind] = b
		}
	}
	if !b.lim.AllowN(l.now(), 1) {
		b.suppressed++
		Suppressed.WithLabelValues(kind).Inc()
		return false, 0
	}
	suppressed, b.suppressed = b.suppressed, 0
	return true, suppressed
}

// Truncate returns s cut to at most MaxValueLen bytes (on a rune
// boundary), saying how much was cut.
func Truncate(s string) string { return truncate(s, MaxValueLen) }

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	i := n
	for i > 0 && !utf8.RuneStart(s[i]) {
		i--
	}
	return fmt.Sprintf("%s...(%d more bytes)", s[:i], len(s)-i)
}

// Logger logs through a Limiter: each message is a kind. Every string,
// []byte and error value is truncated (MaxValueLen, MaxErrorLen).
type Logger struct {
	log logr.Logger
	lim *Limiter
}

// NewLogger returns a Logger that writes to log and is limited by lim
// (nil: no limit, but values are still truncated).
func NewLogger(log logr.Logger, lim *Limiter) Logger { return Logger{log: log, lim: lim} }

// Info logs msg with keysAndValues if the Limiter allows it.
func (l Logger) Info(msg string, keysAndValues ...any) {
	if !l.log.Enabled() || !l.allow(msg) {
		return
	}
	l.log.Info(msg, truncateValues(keysAndValues)...)
}

// Error logs err and msg with keysAndValues if the Limiter allows it.
func (l Logger) Error(err error, msg string, keysAndValues ...any) {
	if !l.allow(msg) {
		return
	}
	if err != nil {
		err = truncatedError{truncate(err.Error(), MaxErrorLen)}
	}
	l.log.Error(err, msg, truncateValues(keysAndValues)...)
}

func (l Logger) allow(kind string) bool {
	ok, n := l.lim.Allow(kind)
	if ok && n > 0 {
		l.log.Info(SuppressedMessage, "kind", kind, "suppressed", n)
	}
	return ok
}

// truncatedError is an error text already cut to size.
type truncatedError struct{ s string }

func (e truncatedError) Error() string { return e.s }

// truncateValues truncates the values (odd positions) of keysAndValues.
func truncateValues(kv []any) []any {
	out := make([]any, len(kv))
	copy(out, kv)
	for i := 1; i < len(out); i += 2 {
		out[i] = truncateValue(out[i])
	}
	return out
}

func truncateValue(v any) any {
	switch x := v.(type) {
	case string:
		return Truncate(x)
	case []byte:
		return Truncate(string(x))
	case error:
		return truncate(x.Error(), MaxErrorLen)
	case fmt.Stringer:
		return truncate(x.String(), MaxErrorLen)
	}
	return v
}

// V returns a Logger for verbosity level n.
func (l Logger) V(n int) Logger { return Logger{log: l.log.V(n), lim: l.lim} }
