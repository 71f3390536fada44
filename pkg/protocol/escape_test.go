package protocol

import (
	"strings"
	"testing"
)

func TestEscapeID(t *testing.T) {
	for id, want := range map[string]string{
		"myDeviceId": "myDeviceId",
		"pump:7.b":   "pump:7.b",
		"line+1":     "line%2B1",
		"bay#3":      "bay%233",
		"50%":        "50%25",
		"%64ev1":     "%2564ev1",
		"a/b c":      "a%2Fb%20c",
		"\xff":       "%FF",
	} {
		if got := EscapeID(id); got != want {
			t.Errorf("EscapeID(%q) = %q, want %q", id, got, want)
		}
	}
}

// TestUnescapeIDRefusesNonCanonical: every device id has one topic level, so
// a broker ACL that compares levels literally cannot be bypassed by another
// spelling of the same id.
func TestUnescapeIDRefusesNonCanonical(t *testing.T) {
	for level, wantErr := range map[string]string{
		"%64ev1":   `%-escape "%64" at byte 0 stands for 'd', which must not be escaped`,
		"line%2b1": `bad %-escape "%2b" at byte 4 (want %XX, X an upper-case hex digit)`,
		"a%41":     `stands for 'A', which must not be escaped`,
		"x%2D":     `stands for '-', which must not be escaped`,
		"50%":      `truncated %-escape at byte 2`,
		"50%2":     `truncated %-escape at byte 2`,
		"50%G0":    `bad %-escape "%G0"`,
		"a b":      `byte 1 (' ') must be escaped as %20`,
		"a\xffb":   `must be escaped as %FF`,
	} {
		got, err := UnescapeID(level)
		if err == nil || !strings.Contains(err.Error(), wantErr) {
			t.Errorf("UnescapeID(%q) = %q, %v; want an error containing %q", level, got, err, wantErr)
		}
	}
	if in, err := ParseInbound("kubetwin/v1/%64ev1/reported/r1"); err == nil {
		t.Errorf("ParseInbound accepted %q as device %q", "kubetwin/v1/%64ev1/reported/r1", in.DeviceID)
	}
	if out, err := ParseOutbound("kubetwin/v1/%64ev1/desired"); err == nil {
		t.Errorf("ParseOutbound accepted %q as device %q", "kubetwin/v1/%64ev1/desired", out.DeviceID)
	}
}

// TestEscapeIDCanonical checks, over every string of up to four bytes from an
// alphabet with the troublesome characters, that UnescapeID inverts EscapeID
// and accepts nothing else: UnescapeID(EscapeID(x)) == x, and
// UnescapeID(s) == x without error implies EscapeID(x) == s.
func TestEscapeIDCanonical(t *testing.T) {
	const alphabet = "%2Bb5Fdf+ -\xff"
	var walk func(s string, n int)
	walk = func(s string, n int) {
		if got, err := UnescapeID(EscapeID(s)); err != nil || got != s {
			t.Fatalf("UnescapeID(EscapeID(%q)) = %q, %v", s, got, err)
		}
		if x, err := UnescapeID(s); err == nil && EscapeID(x) != s {
			t.Fatalf("UnescapeID(%q) = %q, but EscapeID(%q) = %q", s, x, x, EscapeID(x))
		}
		if n == 0 {
			return
		}
		for i := 0; i < len(alphabet); i++ {
			walk(s+alphabet[i:i+1], n-1)
		}
	}
	walk("", 4)
}

func FuzzUnescapeID(f *testing.F) {
	for _, s := range []string{"dev1", "%64ev1", "line%2B1", "line%2b1", "50%25", "50%", "%%25", "a%2F%20b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if got, err := UnescapeID(EscapeID(s)); err != nil || got != s {
			t.Fatalf("UnescapeID(EscapeID(%q)) = %q, %v", s, got, err)
		}
		if x, err := UnescapeID(s); err == nil && EscapeID(x) != s {
			t.Fatalf("UnescapeID(%q) = %q, but EscapeID(%q) = %q", s, x, x, EscapeID(x))
		}
	})
}
