package twin

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"
)

// manyEmpty returns a document of outer objects each holding inner empty
// objects, keyed "0", "1", ...: tiny by [Size] (its keys), large as stored.
func manyEmpty(outer, inner int) Doc {
	d := Doc{}
	for i := range outer {
		o := Doc{}
		for j := range inner {
			o[strconv.Itoa(j)] = Doc{}
		}
		d[strconv.Itoa(i)] = o
	}
	return d
}

// grouped returns a document of groups of 32 members "p<key>" made by val,
// until its Size reaches nearly 32 KB: a legitimate twin of many small
// properties.
func grouped(keyLen int, val func() any) Doc {
	d := Doc{}
	for g := 0; Size(d) < 32768-200; g++ {
		obj := Doc{}
		d["group"+strconv.Itoa(g)] = obj
		for j := 0; j < 32 && Size(d) < 32768-100; j++ {
			obj[fmt.Sprintf("p%0*d", keyLen-1, j)] = val()
		}
	}
	return d
}

// StoredSize is exactly the JSON of the document plus the JSON of the
// metadata UpdateMetadata builds, with the widest stamps.
func TestStoredSizeIsWhatIsStored(t *testing.T) {
	docs := map[string]Doc{
		"nil":      nil,
		"empty":    {},
		"flat":     {"a": "x", "n": json.Number("12.5"), "b": true, "i": json.Number("-3")},
		"nested":   {"o": Doc{"k": "v", "m": Doc{"x": false, "e": Doc{}}}, "s": ""},
		"escapes":  {"q\"uote": "a\\b\n\t\x01", "uni": "température 日本"},
		"many":     manyEmpty(3, 40),
		"grouped":  grouped(10, func() any { return json.Number("12.5") }),
		"sized 32": sized(8, 32768),
	}
	now := time.Date(2026, 12, 6, 6, 0, 0, 0, time.UTC)
	for name, d := range docs {
		t.Run(name, func(t *testing.T) {
			meta := UpdateMetadata(nil, d, d, now, 1e18) // 19 digits
			if got, want := StoredSize(Desired, d), len(Encode(d))+len(Encode(meta)); got != want {
				t.Errorf("desired: StoredSize = %d, want %d", got, want)
			}
			meta = UpdateMetadata(nil, d, d, now, 0)
			if got, want := StoredSize(Reported, d), len(Encode(d))+len(Encode(meta)); got != want {
				t.Errorf("reported: StoredSize = %d, want %d", got, want)
			}
			if got, want := StoredSize(Tags, d), len(Encode(d)); got != want {
				t.Errorf("tags: StoredSize = %d, want %d", got, want)
			}
		})
	}
}

// Strings and numbers count as the API server's encoding/json writes them:
// HTML characters escaped, numbers as float64 where that is longer.
func TestStoredSizeCountsEscapes(t *testing.T) {
	for _, v := range []any{"<>&", "\x01\x1f", "a\u2028b", "bad\xffutf8", "plain", json.Number("1e-7"), json.Number("0.5")} {
		d := Doc{"k<": v}
		var want int
		if n, ok := v.(json.Number); ok {
			f, _ := strconv.ParseFloat(string(n), 64)
			want = len(must(json.Marshal(map[string]any{"k<": f})))
		} else {
			want = len(must(json.Marshal(d)))
		}
		if got := StoredSize(Tags, d); got != want {
			t.Errorf("%q: StoredSize = %d, want %d", v, got, want)
		}
	}
}

func must(b []byte, err error) []byte {
	if err != nil {
		panic(err)
	}
	return b
}

// The amplification of the hardening issue: a document far below 32 KB by
// the IoT Hub rule whose every empty object (or empty string) would get a
// $metadata node is refused, from spec.desired as from a reported patch.
func TestManyEmptyMembersRefused(t *testing.T) {
	emptyStrings := Doc{}
	for i := range 100 {
		o := Doc{}
		for j := range 80 {
			o[strconv.Itoa(j)] = ""
		}
		emptyStrings[strconv.Itoa(i)] = o
	}
	for name, d := range map[string]Doc{"empty objects": manyEmpty(100, 80), "empty strings": emptyStrings} {
		t.Run(name, func(t *testing.T) {
			if Size(d) > 32768 {
				t.Fatalf("test document is %d bytes by Size; it must pass that rule", Size(d))
			}
			n := StoredSize(Reported, d)
			want := fmt.Sprintf("reported: reported takes %d bytes as stored with its $metadata, more than the 262144 allowed", n)
			assertErr(t, CheckSize(Reported, "reported", d), want)
			n = StoredSize(Desired, d)
			want = fmt.Sprintf("spec.desired: desired takes %d bytes as stored with its $metadata, more than the 262144 allowed", n)
			assertErr(t, ValidateDocument(Desired, "spec.desired", d), want)
			if _, err := ParseSection(Desired, "spec.desired", Encode(d)); err == nil || err.Error() != want {
				t.Errorf("ParseSection: %v, want %q", err, want)
			}
		})
	}
}

// Documents of 32 KB by the IoT Hub rule made of ordinary properties still
// pass in every section that has $metadata.
func TestLegitimate32KBDocumentsPass(t *testing.T) {
	docs := map[string]Doc{
		"8 strings of 4 KB":                 sized(8, 32768),
		"1,800 numbers under 10-byte keys":  grouped(10, func() any { return json.Number("12.5") }),
		"1,000 16-byte strings":             grouped(16, func() any { return strings.Repeat("v", 16) }),
		"1,400 booleans under 16-byte keys": grouped(16, func() any { return true }),
	}
	for name, d := range docs {
		t.Run(name, func(t *testing.T) {
			if Size(d) < 32000 || Size(d) > 32768 {
				t.Fatalf("test document is %d bytes by Size, want about 32 KB", Size(d))
			}
			for _, s := range []Section{Desired, Reported} {
				if err := ValidateDocument(s, s.String(), d); err != nil {
					t.Errorf("%s: %v", s, err)
				}
			}
		})
	}
}

// A document exactly at the stored limit passes; one byte more is refused.
func TestStoredSizeLimitEdge(t *testing.T) {
	limit := Reported.MaxStoredSize()
	d := Doc{"s": ""}
	o := Doc{}
	d["o"] = o
	for i := 0; StoredSize(Reported, d) < limit-4000; i += 50 {
		for j := range 50 {
			o[strconv.Itoa(i+j)] = Doc{}
		}
	}
	d["s"] = strings.Repeat("x", limit-StoredSize(Reported, d))
	if err := CheckSize(Reported, "reported", d); err != nil {
		t.Fatalf("at the limit: %v", err)
	}
	d["s"] = d["s"].(string) + "x"
	want := fmt.Sprintf("reported: reported takes %d bytes as stored with its $metadata, more than the %d allowed", limit+1, limit)
	assertErr(t, CheckSize(Reported, "reported", d), want)
}
