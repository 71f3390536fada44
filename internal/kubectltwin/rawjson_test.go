package kubectltwin

import (
	"bytes"
	"cmp"
	"encoding/json"
	"strings"
	"testing"

	"github.com/go-json-experiment/json/jsontext"

	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/internal/twinscan"
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
	`{"e":"","arr":[{"b":"<x>","a":1}],"o":{"b":[{"z":"\u00e9","a":"<"}],"a\u00e9":null,"A":true,"a":1E+2}}`,
	`{"multi":"line 1\n\n  line 3\n","trail":"x ","lead":" y","colon":"a: b","hash":"#c","dash":"- d","yes":"yes","num":"1.5","null":"null","empty":{}}`,
	`{"` + strings.Repeat("k", 200) + `":{"` + strings.Repeat("j", 130) + `":[{},[],"\t"]},"tags":{"a":{"b":{"c":[1,[2,{"d":"e\nf"}]]}}}}`,
}

// rowColumns are the columns of a projection rawCases are taken as rows of.
var rowColumns = []string{"tags", "deviceId", "y", "properties"}

// writeBoth returns rawWriter's and writeJSON's output for raw, with
// order and sorted (as printResult pairs them).
func writeBoth(t testing.TB, raw []byte, order orderFunc, sorted func([]string) bool) (string, string) {
	doc, err := twin.Decode(raw)
	if err != nil {
		t.Fatalf("%s: %v", raw, err)
	}
	var got, want bytes.Buffer
	(&rawWriter{b: &got, order: order, sorted: sorted}).value(raw, nil, jsonIndent)
	writeJSON(&want, doc, order, nil, jsonIndent)
	return got.String(), want.String()
}

// TestRawJSONAsDecoded: -o json of the query API's items as they came
// is byte for byte -o json of them decoded, for the cases above and the
// documents of make bench-scale's fleet as the operator sends them, as
// twins and as rows of projections (as the operator writes them too).
func TestRawJSONAsDecoded(t *testing.T) {
	var raws []json.RawMessage
	for _, c := range rawCases {
		raws = append(raws, json.RawMessage(c))
	}
	fleet := twinscantest.Fleet(500)
	for _, tw := range fleet {
		raws = append(raws, hubtwin.AppendJSON(nil, tw))
	}
	for _, text := range []string{
		"SELECT deviceId, tags, properties FROM devices",
		"SELECT properties.reported.telemetry AS t, tags.location, properties.desired.$metadata AS m, version FROM devices",
	} {
		q, err := query.Parse(text)
		if err != nil {
			t.Fatal(err)
		}
		cols, _ := q.PathColumns()
		rows, sc := twinscan.NewRows(cols), &twinscan.RowScratch{}
		var items []json.RawMessage
		for _, tw := range fleet {
			items = append(items, rows.Append(nil, sc, tw))
		}
		checkRaw(t, text, items, itemOrder(query.ItemTypeRaw, q.Columns()), rowSorted)
	}
	checkRaw(t, "rows", raws[:len(rawCases)], rowOrder(rowColumns), rowSorted)
	checkRaw(t, "twins", raws, twinDocOrder, twinSorted)
}

// TestYAMLListAsEncodeYAML: -o yaml written a document at a time, from
// the query API's parts or from decoded documents, is byte for byte the
// whole list encoded as one YAML tree.
func TestYAMLListAsEncodeYAML(t *testing.T) {
	var raws []json.RawMessage
	for _, c := range rawCases {
		raws = append(raws, json.RawMessage(c))
	}
	for _, tw := range twinscantest.Fleet(300) {
		raws = append(raws, hubtwin.AppendJSON(nil, tw))
	}
	docs := make([]map[string]any, len(raws))
	for i, r := range raws {
		docs[i], _ = twin.Decode(r)
	}
	for _, order := range []orderFunc{twinDocOrder, rowOrder(rowColumns)} {
		for _, n := range []int{0, 1, len(rawCases), len(raws)} {
			want, err := encodeYAML(docs[:n], order)
			if err != nil {
				t.Fatal(err)
			}
			var fromRaw, fromDocs bytes.Buffer
			l := newYAMLList(&fromRaw, order)
			for at := 0; at < n; at += 100 { // parts, as the query API sends them
				if err := l.add(raws[at:min(at+100, n)]); err != nil {
					t.Fatal(err)
				}
			}
			d := newYAMLList(&fromDocs, order)
			if err := cmp.Or(l.close(), d.addDocs(docs[:n]), d.close()); err != nil {
				t.Fatal(err)
			}
			if fromRaw.String() != string(want) || fromDocs.String() != string(want) {
				t.Errorf("%d documents: the YAML list differs from encodeYAML's:\n%.600s\n%.600s\nwant\n%.600s", n, fromRaw.String(), fromDocs.String(), want)
			}
		}
	}
}

// checkRaw checks items written raw against them decoded, one by one and
// as lists, and for rows, as tables.
func checkRaw(t *testing.T, what string, raws []json.RawMessage, order orderFunc, sorted func([]string) bool) {
	t.Helper()
	docs := make([]map[string]any, len(raws))
	for i, r := range raws {
		if got, want := writeBoth(t, r, order, sorted); got != want {
			t.Fatalf("%s: %s:\nraw     %s\ndecoded %s", what, r, got, want)
		}
		docs[i], _ = twin.Decode(r)
		checkCells(t, r)
	}
	if len(raws) > 0 {
		cols := append(keysOf(docs[len(docs)-1]), "absent")
		for _, o := range []tableOptions{{}, {noHeaders: true}} {
			var got, want bytes.Buffer
			c := &rowCells{columns: cols}
			for at := 0; at < len(raws); at += 300 { // parts, as the query API sends them
				_ = c.add(raws[at:min(at+300, len(raws))])
			}
			if err := c.print(&got, o); err != nil {
				t.Fatal(err)
			}
			if err := printRowTable(&want, cols, docs, o); err != nil {
				t.Fatal(err)
			}
			if got.String() != want.String() {
				t.Errorf("%s, columns %q: rowCells print differently from printRowTable:\n%.600s\n%.600s", what, cols, got.String(), want.String())
			}
		}
	}
	for _, n := range []int{0, 1, 64, 65, len(raws)} {
		n = min(n, len(raws))
		var got, want bytes.Buffer
		if err := printRawJSON(&got, raws[:n], order, sorted); err != nil {
			t.Fatal(err)
		}
		if err := printJSON(&want, docs[:n], order); err != nil {
			t.Fatal(err)
		}
		if got.String() != want.String() {
			t.Errorf("%s, %d items: printRawJSON differs from printJSON:\n%.400s\n%.400s", what, n, got.String(), want.String())
		}
	}
}

// FuzzRawJSON: for any JSON object the query API can send (valid I-JSON:
// no duplicate names, valid UTF-8, which the plugin's decoder of the
// answer checks), rawWriter writes what writeJSON writes decoded, as a
// twin and as a row.
func FuzzRawJSON(f *testing.F) {
	for _, c := range rawCases {
		f.Add([]byte(c))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if t := bytes.TrimSpace(data); len(t) == 0 || t[0] != '{' || !jsontext.Value(data).IsValid() {
			return
		}
		if got, want := writeBoth(t, data, twinDocOrder, twinSorted); got != want {
			t.Fatalf("%q as a twin:\nraw     %s\ndecoded %s", data, got, want)
		}
		if got, want := writeBoth(t, data, rowOrder(rowColumns), rowSorted); got != want {
			t.Fatalf("%q as a row:\nraw     %s\ndecoded %s", data, got, want)
		}
		checkCells(t, data)
		doc, _ := twin.Decode(data)
		var got bytes.Buffer
		if err := writeYAMLItem(&got, doc, twinDocOrder); err != nil {
			t.Fatal(err)
		}
		if want, _ := encodeYAML([]map[string]any{doc}, twinDocOrder); got.String() != string(want) {
			t.Fatalf("%q as a YAML item:\n%s\nwant\n%s", data, got.String(), want)
		}
	})
}

// checkCells: the table cells of raw, a JSON object, and of its members
// are those of them decoded.
func checkCells(t testing.TB, raw []byte) {
	t.Helper()
	doc, err := twin.Decode(raw)
	if err != nil {
		t.Fatalf("%s: %v", raw, err)
	}
	if got, want := string(appendCell(nil, bytes.TrimSpace(raw))), cell(doc); got != want {
		t.Fatalf("%q: cell %s, decoded %s", raw, got, want)
	}
	eachMember(raw, func(key, val []byte) {
		if got, want := string(appendCell(nil, val)), cell(doc[rawString(key)]); got != want {
			t.Fatalf("%q, member %s: cell %s, decoded %s", raw, key, got, want)
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
