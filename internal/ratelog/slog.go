package ratelog

import (
	"context"
	"fmt"
	"log/slog"
)

// SlogHandler wraps h (the handler of a library's logger, e.g. mochi-mqtt's)
// so that its records pass lim, each level and message being a kind, and
// its attributes are truncated like a Logger's values.
func SlogHandler(h slog.Handler, lim *Limiter) slog.Handler {
	return &slogHandler{h: h, lim: lim}
}

type slogHandler struct {
	h   slog.Handler
	lim *Limiter
}

func (s *slogHandler) Enabled(ctx context.Context, level slog.Level) bool {
	return s.h.Enabled(ctx, level)
}

func (s *slogHandler) Handle(ctx context.Context, r slog.Record) error {
	kind := r.Level.String() + " " + r.Message
	ok, n := s.lim.Allow(kind)
	if !ok {
		return nil
	}
	if n > 0 {
		sr := slog.NewRecord(r.Time, r.Level, SuppressedMessage, r.PC)
		sr.AddAttrs(slog.String("kind", kind), slog.Int64("suppressed", n))
		if err := s.h.Handle(ctx, sr); err != nil {
			return err
		}
	}
	out := slog.NewRecord(r.Time, r.Level, r.Message, r.PC)
	r.Attrs(func(a slog.Attr) bool {
		out.AddAttrs(truncateAttr(a))
		return true
	})
	return s.h.Handle(ctx, out)
}

func (s *slogHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	t := make([]slog.Attr, len(attrs))
	for i, a := range attrs {
		t[i] = truncateAttr(a)
	}
	return &slogHandler{h: s.h.WithAttrs(t), lim: s.lim}
}

func (s *slogHandler) WithGroup(name string) slog.Handler {
	return &slogHandler{h: s.h.WithGroup(name), lim: s.lim}
}

// truncateAttr bounds an attribute's value: strings to MaxValueLen, other
// values (errors, packets) to MaxErrorLen of their formatted text.
func truncateAttr(a slog.Attr) slog.Attr {
	v := a.Value.Resolve()
	switch v.Kind() {
	case slog.KindString:
		return slog.String(a.Key, Truncate(v.String()))
	case slog.KindGroup:
		g := v.Group()
		t := make([]slog.Attr, len(g))
		for i, ga := range g {
			t[i] = truncateAttr(ga)
		}
		return slog.Attr{Key: a.Key, Value: slog.GroupValue(t...)}
	case slog.KindAny:
		if err, ok := v.Any().(error); ok {
			return slog.String(a.Key, truncate(err.Error(), MaxErrorLen))
		}
		return slog.String(a.Key, truncate(fmt.Sprintf("%+v", v.Any()), MaxErrorLen))
	}
	return slog.Attr{Key: a.Key, Value: v}
}
