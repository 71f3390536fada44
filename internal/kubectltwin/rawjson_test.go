package kubectltwin

import (
	"bytes"
	"encoding/json"
	"testing"

	"github.com/go-json-experiment/json/jsontext"

	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/internal/twinscan/twinscantest"
)

// rawCases are JSON objects with what writeJSON treats apart: the twin
// document's ordered members, empty objects and arrays, arrays of
// objects (whose paths restart), escapes and non-ASCII text, numbers as
// written.
var rawCases = []string{
	`{}`, `{"a":[]}`, `{"a":{}}`, ` { "b" : 1 , "a" : [ 1 , { "z" : null , "y" : true } ] } `,
	`{"deviceId":"d","properties":{"reported":{"x":1,"$version":2,"$metadata":{"b":1,"a":2}},"desired":{"$version":1}},"tags":{"z":"\u00e9","a":"tab\tq\"uote\\\\"},"etag":"e"}`,
	`{"properties":[{"desired":1,"$version":2}],"k\u0041ey":"\u2028\ud83d\ude00","e":-1.5e+10,"n":0,"f":false,"s":"<&>"}`,
	`{"a":[[],[{}],[[1,2],"x"]],"deviceId":{"deviceId":1,"etag":2}}`,
}

// writeBoth returns rawWriter's and writeJSON's output for raw.
func writeBoth(t testing.TB, raw []byte) (string, string) {
	doc, err := twin.Decode(raw)
	if err != nil {
		t.Fatalf("%s: %v", raw, err)
	}
	var got, want bytes.Buffer
	(&rawWriter{b: &got, order: twinDocOrder, sorted: twinSorted}).value(raw, nil, jsonIndent)
	writeJSON(&want, doc, twinDocOrder, nil, jsonIndent)
	return got.String(), want.String()
}

// TestRawJSONAsDecoded: -o json of the query API's items as they came
// is byte for byte -o json of them decoded, for the cases above and the
// documents of make bench-scale's fleet as the operator sends them.
func TestRawJSONAsDecoded(t *testing.T) {
	var raws []json.RawMessage
	for _, c := range rawCases {
		raws = append(raws, json.RawMessage(c))
	}
	for _, tw := range twinscantest.Fleet(500) {
		raws = append(raws, hubtwin.AppendJSON(nil, tw))
	}
	docs := make([]map[string]any, len(raws))
	for i, r := range raws {
		if got, want := writeBoth(t, r); got != want {
			t.Fatalf("%s:\nraw     %s\ndecoded %s", r, got, want)
		}
		docs[i], _ = twin.Decode(r)
	}
	for _, n := range []int{0, 1, 64, 65, len(raws)} {
		var got, want bytes.Buffer
		if err := printRawJSON(&got, raws[:n], twinDocOrder, twinSorted); err != nil {
			t.Fatal(err)
		}
		if err := printJSON(&want, docs[:n], twinDocOrder); err != nil {
			t.Fatal(err)
		}
		if got.String() != want.String() {
			t.Errorf("%d items: printRawJSON differs from printJSON:\n%.400s\n%.400s", n, got.String(), want.String())
		}
	}
}

// FuzzRawJSON: for any JSON object the query API can send (valid I-JSON:
// no duplicate names, valid UTF-8, which the plugin's decoder of the
// answer checks), rawWriter writes what writeJSON writes decoded.
func FuzzRawJSON(f *testing.F) {
	for _, c := range rawCases {
		f.Add([]byte(c))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if t := bytes.TrimSpace(data); len(t) == 0 || t[0] != '{' || !jsontext.Value(data).IsValid() {
			return
		}
		if got, want := writeBoth(t, data); got != want {
			t.Fatalf("%q:\nraw     %s\ndecoded %s", data, got, want)
		}
	})
}

// TestTableDocAsDecoded: the members a table of twins shows are those of
// the document decoded whole.
func TestTableDocAsDecoded(t *testing.T) {
	raws := []string{
		`{"deviceId":"d\u00e9","connectionState":"Connected","lastActivityTime":"2026-12-06T10:00:00Z","version":7,"status":"disabled",` +
			`"tags":{"b":[1,{"c":null}],"a":"x"},"properties":{"desired":{"$version":3,"a":{"$version":9}},"reported":{"x":{"$version":1}}}}`,
		`{"properties":{"reported":{"$version":2}},"tags":{}}`, `{}`,
	}
	for _, tw := range twinscantest.Fleet(50) {
		raws = append(raws, string(hubtwin.AppendJSON(nil, tw)))
	}
	for _, raw := range raws {
		full, err := twin.Decode([]byte(raw))
		if err != nil {
			t.Fatal(err)
		}
		for _, wide := range []bool{false, true} {
			d := tableDoc([]byte(raw), wide)
			keys := []string{"deviceId", "connectionState", "lastActivityTime"}
			if wide {
				keys = append(keys, "version", "status", "tags")
			}
			for _, k := range keys {
				if got, want := cell(d[k]), cell(full[k]); got != want {
					t.Errorf("%s (wide %v): %s is %s, decoded %s", raw, wide, k, got, want)
				}
			}
			for _, s := range []string{"desired", "reported"} {
				if got, want := cell(sectionVersion(d, s)), cell(sectionVersion(full, s)); got != want {
					t.Errorf("%s: %s $version is %s, decoded %s", raw, s, got, want)
				}
			}
		}
	}
}
