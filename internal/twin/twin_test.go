package twin

import (
	"errors"
	"fmt"
	"testing"
)

func TestSection(t *testing.T) {
	tests := map[string]struct {
		s       Section
		name    string
		maxSize int
	}{
		"tags":     {Tags, "tags", 8192},
		"desired":  {Desired, "desired", 32768},
		"reported": {Reported, "reported", 32768},
		"unknown":  {Section(7), "Section(7)", 0},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			if got := tt.s.String(); got != tt.name {
				t.Errorf("String() = %q, want %q", got, tt.name)
			}
			if got := tt.s.MaxSize(); got != tt.maxSize {
				t.Errorf("MaxSize() = %d, want %d", got, tt.maxSize)
			}
		})
	}
}

func TestLimits(t *testing.T) {
	if MaxDepth != 10 || MaxKeyLength != 1024 || MaxStringLength != 4096 || MaxInt != 4503599627370496 {
		t.Errorf("limits = %d %d %d %d", MaxDepth, MaxKeyLength, MaxStringLength, MaxInt)
	}
}

func TestError(t *testing.T) {
	tests := map[string]struct {
		err  *Error
		want string
	}{
		"with path": {&Error{Path: "spec.desired.telemetry.intervals", Rule: "arrays are not allowed in device twins"},
			"spec.desired.telemetry.intervals: arrays are not allowed in device twins"},
		"no path": {&Error{Rule: "keys must not be empty"}, "keys must not be empty"},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			if got := tt.err.Error(); got != tt.want {
				t.Errorf("Error() = %q, want %q", got, tt.want)
			}
			var target *Error
			if !errors.As(fmt.Errorf("wrapped: %w", tt.err), &target) || target != tt.err {
				t.Errorf("errors.As did not find the *Error")
			}
		})
	}
}

func TestJoinPath(t *testing.T) {
	tests := map[string]struct {
		path, key, want string
	}{
		"root":          {"", "a", "a"},
		"nested":        {"spec.desired", "a", "spec.desired.a"},
		"unicode":       {"spec.tags", "température", "spec.tags.température"},
		"dot":           {"spec.desired", "a.b", `spec.desired["a.b"]`},
		"space":         {"spec.desired", "a b", `spec.desired["a b"]`},
		"brackets":      {"spec.desired", "a[0]", `spec.desired["a[0]"]`},
		"empty":         {"spec.desired", "", `spec.desired[""]`},
		"control":       {"x", "a\nb", `x["a\nb"]`},
		"quote at root": {"", `a"b`, `["a\"b"]`},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			if got := joinPath(tt.path, tt.key); got != tt.want {
				t.Errorf("joinPath(%q, %q) = %q, want %q", tt.path, tt.key, got, tt.want)
			}
		})
	}
}
