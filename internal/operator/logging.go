package operator

import (
	"sync"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// LazyFields is a zap option that encodes a logger's added fields
// (logr's WithValues) only when it writes an entry. controller-runtime
// adds the object's name and a reconcile id to the logger of every
// reconcile, and zap encodes them at once into a new buffer (~4 KB per
// reconcile, most of a no-op reconcile's allocation); a reconcile that
// logs nothing then encodes nothing.
func LazyFields() zap.Option {
	return zap.WrapCore(func(c zapcore.Core) zapcore.Core { return &lazyCore{base: c, parent: c} })
}

// lazyCore is parent with fields yet to be added (With) on first use.
// Each keeps only its own fields: a child materializes its parent, once,
// rather than copying the fields of every ancestor.
type lazyCore struct {
	base   zapcore.Core // the root: levels and Sync
	parent zapcore.Core // base or a *lazyCore
	fields []zapcore.Field

	once sync.Once
	core zapcore.Core
}

func (c *lazyCore) Enabled(l zapcore.Level) bool { return c.base.Enabled(l) }

func (c *lazyCore) With(fields []zapcore.Field) zapcore.Core {
	if len(fields) == 0 {
		return c
	}
	return &lazyCore{base: c.base, parent: c, fields: fields}
}

func (c *lazyCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if !c.base.Enabled(e.Level) {
		return ce
	}
	return c.materialized().Check(e, ce)
}

func (c *lazyCore) Write(e zapcore.Entry, fields []zapcore.Field) error {
	return c.materialized().Write(e, fields)
}

func (c *lazyCore) Sync() error { return c.base.Sync() }

func (c *lazyCore) materialized() zapcore.Core {
	c.once.Do(func() {
		c.core = c.parent
		if p, ok := c.parent.(*lazyCore); ok {
			c.core = p.materialized()
		}
		if len(c.fields) > 0 {
			c.core = c.core.With(c.fields)
		}
	})
	return c.core
}

// Level is base's, for zap's LevelOf.
func (c *lazyCore) Level() zapcore.Level { return zapcore.LevelOf(c.base) }
