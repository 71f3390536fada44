package kubectltwin

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"testing"
)

// TestWriteStringAsEncodingJSON: the plain-ASCII shortcut writes what
// encoding/json (without HTML escaping) writes, for strings on both sides
// of it.
func TestWriteStringAsEncodingJSON(t *testing.T) {
	cases := []string{"", "deviceId", "Plant-17", "a b <c> & 'd'", `say "hi"`, `back\slash`, "tab\there", "nl\n",
		"\x00\x1f\x7f", "é", "日本", "\u2028\u2029", "\xff\xfe", "~!@#$%^*()_+{}|:?/.,;[]=-`"}
	r := rand.New(rand.NewPCG(1, 2))
	for range 2000 {
		b := make([]byte, r.IntN(12))
		for i := range b {
			b[i] = byte(r.IntN(256))
			if r.IntN(3) > 0 {
				b[i] = byte(0x20 + r.IntN(0x60))
			}
		}
		cases = append(cases, string(b))
	}
	for _, s := range cases {
		var want bytes.Buffer
		enc := json.NewEncoder(&want)
		enc.SetEscapeHTML(false)
		if err := enc.Encode(s); err != nil {
			t.Fatal(err)
		}
		var got bytes.Buffer
		writeString(&got, s)
		if got.String()+"\n" != want.String() {
			t.Errorf("%q: wrote %s, encoding/json %s", s, got.String(), want.String())
		}
	}
}

// TestValidNumberAsEncodingJSON: a json.Number is written as json.Marshal
// writes it, or null where it refuses it.
func TestValidNumberAsEncodingJSON(t *testing.T) {
	cases := []string{"0", "-0", "1", "-12", "3.25", "1e9", "1E+9", "2.5e-3", "01", "-", "", ".5", "5.", "1e", "1e+",
		"+1", "0x10", "1.2.3", "NaN", "Infinity", " 1", "1 ", "00", "-01", "1_000", "9007199254740993"}
	r := rand.New(rand.NewPCG(3, 4))
	const alphabet = "0123456789-+.eE"
	for range 5000 {
		b := make([]byte, 1+r.IntN(8))
		for i := range b {
			b[i] = alphabet[r.IntN(len(alphabet))]
		}
		cases = append(cases, string(b))
	}
	for _, s := range cases {
		want, err := json.Marshal(json.Number(s))
		if err != nil {
			want = []byte("null")
		}
		var got bytes.Buffer
		writeJSON(&got, json.Number(s), twinDocOrder, nil, "")
		if got.String() != string(want) {
			t.Errorf("json.Number %q: wrote %s, json.Marshal %s (err %v)", s, got.String(), want, err)
		}
	}
}

// TestPrintJSONAsEncodeJSON: the streamed output is encodeJSON's, for a
// list of documents larger than one write, an empty list, and others.
func TestPrintJSONAsEncodeJSON(t *testing.T) {
	var docs []map[string]any
	for i := range 3000 {
		docs = append(docs, map[string]any{"deviceId": fmt.Sprintf("dev-%04d", i), "tags": map[string]any{"n": json.Number("1")},
			"properties": map[string]any{"reported": map[string]any{"$version": json.Number("2"), "ok": true, "s": "x\"y"}}})
	}
	for _, v := range []any{docs, []map[string]any{}, docs[:1], docs[:64], docs[:65], docs[:129], map[string]any{"a": nil}, []any{"x", json.Number("3")}} {
		var got bytes.Buffer
		if err := printJSON(&got, v, twinDocOrder); err != nil {
			t.Fatal(err)
		}
		if want := encodeJSON(v, twinDocOrder); got.String() != string(want) {
			t.Errorf("printJSON of %T (%d bytes) differs from encodeJSON (%d bytes)", v, got.Len(), len(want))
		}
	}
}
