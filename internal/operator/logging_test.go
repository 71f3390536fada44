package operator

import (
	"bytes"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// countingCore counts With calls on the core under LazyFields.
type countingCore struct {
	zapcore.Core
	withs *int
}

func (c countingCore) With(f []zapcore.Field) zapcore.Core {
	*c.withs++
	return countingCore{Core: c.Core.With(f), withs: c.withs}
}

func (c countingCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) {
		return ce.AddCore(e, c)
	}
	return ce
}

// Fields added to a logger are encoded only when it writes, once, and in
// the order they were added; a logger that writes nothing encodes nothing.
func TestLazyFieldsEncodeOnWrite(t *testing.T) {
	var buf bytes.Buffer
	withs := 0
	enc := zapcore.NewJSONEncoder(zapcore.EncoderConfig{MessageKey: "msg"})
	base := countingCore{Core: zapcore.NewCore(enc, zapcore.AddSync(&buf), zapcore.InfoLevel), withs: &withs}
	log := zap.New(base, LazyFields())

	quiet := log.With(zap.String("name", "dev-1")).With(zap.String("reconcileID", "r1"))
	quiet.Debug("not enabled")
	if withs != 0 || buf.Len() != 0 {
		t.Fatalf("a logger that wrote nothing encoded its fields: %d With calls, output %q", withs, buf.String())
	}

	l := log.With(zap.String("a", "1")).With(zap.String("b", "2"))
	l.Info("one", zap.String("c", "3"))
	l.Info("two")
	if withs != 2 {
		t.Errorf("%d With calls on the core, want 2 (each logger's fields encoded once)", withs)
	}
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	want := []string{`{"msg":"one","a":"1","b":"2","c":"3"}`, `{"msg":"two","a":"1","b":"2"}`}
	if len(lines) != len(want) {
		t.Fatalf("output %q, want %q", lines, want)
	}
	for i := range want {
		if lines[i] != want[i] {
			t.Errorf("line %d: %s, want %s", i, lines[i], want[i])
		}
	}
	// A logger derived from one that wrote keeps its own fields only.
	buf.Reset()
	l.With(zap.String("d", "4")).Info("three")
	if got := strings.TrimSpace(buf.String()); got != `{"msg":"three","a":"1","b":"2","d":"4"}` {
		t.Errorf("derived logger wrote %s", got)
	}
	if withs != 3 {
		t.Errorf("%d With calls on the core, want 3 (the parent's encoding reused)", withs)
	}
	if zapcore.LevelOf(log.Core()) != zapcore.InfoLevel {
		t.Errorf("level %v, want info", zapcore.LevelOf(log.Core()))
	}
}
