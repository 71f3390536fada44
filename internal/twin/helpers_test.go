package twin

import (
	"encoding/json"
	"math/rand/v2"
	"strings"
	"testing"
)

// mustDecode decodes a JSON object for a test.
func mustDecode(t testing.TB, s string) Doc {
	t.Helper()
	d, err := Decode([]byte(s))
	if err != nil {
		t.Fatalf("Decode(%q): %v", s, err)
	}
	return d
}

// canon returns the canonical encoding of the JSON object s.
func canon(t testing.TB, s string) string {
	t.Helper()
	return string(Encode(mustDecode(t, s)))
}

// assertJSON fails unless got encodes exactly like the JSON object want.
func assertJSON(t testing.TB, got Doc, want string) {
	t.Helper()
	if g, w := string(Encode(got)), canon(t, want); g != w {
		t.Errorf("got  %s\nwant %s", g, w)
	}
}

// assertErr fails unless err's message is want ("" means no error). A
// non-nil error must be an *Error whose Error() matches.
func assertErr(t testing.TB, err error, want string) {
	t.Helper()
	switch {
	case want == "" && err != nil:
		t.Errorf("unexpected error: %v", err)
	case want != "" && err == nil:
		t.Errorf("no error, want %q", want)
	case want != "" && err.Error() != want:
		t.Errorf("error\n got %q\nwant %q", err.Error(), want)
	}
}

// hasNullMember reports whether an object in d (not counting objects inside
// arrays) has a null member, which no merge patch can produce.
func hasNullMember(d Doc) bool {
	for _, v := range d {
		switch x := v.(type) {
		case nil:
			return true
		case map[string]any:
			if hasNullMember(x) {
				return true
			}
		}
	}
	return false
}

// leaves counts the non-object, non-null values in d.
func leaves(d Doc) int {
	n := 0
	for _, v := range d {
		switch x := v.(type) {
		case nil:
		case map[string]any:
			n += leaves(x)
		default:
			n++
		}
	}
	return n
}

// metaMatches reports whether meta has exactly one node per object and leaf
// of doc, each with a string $lastUpdated.
func metaMatches(meta, doc Doc) bool {
	if _, ok := meta[LastUpdatedKey].(string); !ok {
		return false
	}
	want := 1
	if _, ok := meta[LastUpdatedVersionKey]; ok {
		want++
	}
	for k, v := range doc {
		if strings.HasPrefix(k, "$") {
			continue
		}
		child, ok := meta[k].(map[string]any)
		if !ok {
			return false
		}
		sub, _ := v.(map[string]any)
		if !metaMatches(child, sub) {
			return false
		}
		want++
	}
	return len(meta) == want
}

// stdEncode encodes d with encoding/json without HTML escaping.
func stdEncode(t testing.TB, d Doc) string {
	t.Helper()
	var b strings.Builder
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(d); err != nil {
		t.Fatalf("encoding/json: %v", err)
	}
	return strings.TrimSuffix(b.String(), "\n")
}

// gen makes random documents in Doc form, with few distinct keys so that
// two documents overlap, numbers written in several equal ways, and strings
// that need escaping.
type gen struct{ r *rand.Rand }

var (
	genKeys    = []string{"a", "b", "c", "d", "é", "a-b"}
	genStrings = []string{"", "x", "1", "true", "é", "<&>", "a\"b\\c", "line\nbreak\t\x01", "\u2028", "日本"}
	genNumbers = []string{"0", "-0", "1", "1.0", "10e-1", "-2", "2.5", "1e3", "1000", "4503599627370496", "0.1"}
)

func (g gen) doc(depth int) Doc {
	d := Doc{}
	for range g.r.IntN(5) {
		d[genKeys[g.r.IntN(len(genKeys))]] = g.value(depth + 1)
	}
	return d
}

func (g gen) value(depth int) any {
	switch g.r.IntN(9) {
	case 0, 1:
		return genStrings[g.r.IntN(len(genStrings))]
	case 2, 3:
		return json.Number(genNumbers[g.r.IntN(len(genNumbers))])
	case 4:
		return g.r.IntN(2) == 0
	case 5:
		return []any{json.Number("1"), "x"}
	default:
		if depth < 5 {
			return g.doc(depth)
		}
		return "deep"
	}
}
