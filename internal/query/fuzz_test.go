package query

import (
	"errors"
	"math/rand/v2"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"

	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/kubetwin/kubetwin/internal/twin"
)

// fuzzQueries seed both fuzz targets: the queries of testdata/examples.json,
// the test tables' queries and some odd ones.
var fuzzQueries = []string{
	"SELECT * FROM devices WHERE tags.location.region = 'US'",
	"SELECT * FROM devices WHERE tags.location.region = 'US' AND properties.reported.telemetryConfig.sendFrequencyInSecs >= 60",
	"SELECT * FROM devices WHERE properties.reported.connectivity.type IN ['wired', 'wifi']",
	"SELECT * FROM devices WHERE is_defined(properties.reported.connectivity)",
	"SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS numberOfDevices\n  FROM devices GROUP BY properties.reported.telemetryConfig.status",
	"SELECT DeviceId, LastActivityTime FROM devices WHERE status = 'enabled' AND connectionState = 'Disconnected'",
	"SELECT COUNT() AS totalNumberOfDevices FROM devices",
	"SELECT * FROM devices WHERE tags.location.plant = 'Redmond43' AND properties.reported.connectivity.type = 'cellular'",
	"SELECT TOP 2 deviceId, tags.a + 1, -tags.b * 2 % 3 / 4 AS [[group]] FROM devices WHERE NOT (tags.a != 3) OR tags.b NIN [0x1F, -2.5e-3, null, true, \"x\\\"\"]",
	"SELECT * FROM devices WHERE STARTSWITH(deviceId, 'a') AND ENDS_WITH(deviceId, 'b')",
	"SELECT * FROM devices WHERE starts_with(tags.[[my-key]], '\\u00e9\\uD83D\\uDE00') AND deviceId IN ['a'] AND connectionState <> 'Connected'",
	"SELECT MIN(tags.x), MAX(tags.x), AVG(tags.x), SUM(tags.x), COUNT() FROM devices",
	"SELECT tags.x, COUNT() FROM devices GROUP BY devices.tags.x",
	"select top 0 * from DEVICES where (((true)))",
	"SELECT * FROM devices WHERE tags.x = 'abc",
	"SELECT * FROM devices WHERE tags.[[x",
	"SELECT * FROM devices WHERE 1e999 = 1",
	"SELECT * FROM devices WHERE tags.x ! 1 \xff",
	"SELECT * FROM devices\nWHERE tags.x =\n\t",
	"SELECT deviceId, COUNT() FROM devices",
	"SELECT * FROM devices WHERE tags.a.[[ ]].b = 'a' AND tags.x = '' AND tags.y != 2.5",
	"",
}

// fuzzSeeds returns fuzzQueries and queries from the equivalence test's
// generator.
func fuzzSeeds() []string {
	seeds := append([]string(nil), fuzzQueries...)
	g := generator{r: rand.New(rand.NewPCG(7, 7))}
	for range 40 {
		seeds = append(seeds, g.query())
	}
	return seeds
}

func FuzzParse(f *testing.F) {
	for _, q := range fuzzSeeds() {
		f.Add(q)
	}
	f.Fuzz(func(t *testing.T, src string) {
		q, err := Parse(src)
		if err != nil {
			var perr *Error
			if !errors.As(err, &perr) {
				t.Fatalf("error %T is not an *Error: %v", err, err)
			}
			lines := strings.Count(src, "\n") + 1
			if perr.Line < 1 || perr.Column < 1 || perr.Line > lines {
				t.Fatalf("error position out of the query (%d lines): %v", lines, err)
			}
			// The column is at most one past the end of its line.
			line := strings.Split(src, "\n")[perr.Line-1]
			if perr.Column > utf8.RuneCountInString(line)+1 {
				t.Fatalf("error column past the end of line %q: %v", line, err)
			}
			if perr.Msg == "" {
				t.Fatal("empty error message")
			}
			return
		}
		// The canonical form is the same query.
		s := q.String()
		q2, err := Parse(s)
		if err != nil {
			t.Fatalf("String() %q of %q does not parse: %v", s, src, err)
		}
		if s2 := q2.String(); s2 != s {
			t.Fatalf("String() is not stable:\n%q\n%q", s, s2)
		}
		// Plans are valid selectors.
		p := q.Plan()
		if _, err := labels.Parse(p.LabelSelector); err != nil {
			t.Fatalf("label selector %q: %v", p.LabelSelector, err)
		}
		if _, err := fields.ParseSelector(p.FieldSelector); err != nil {
			t.Fatalf("field selector %q: %v", p.FieldSelector, err)
		}
		if p.NeedsResidual != (q.where != nil) {
			t.Fatalf("NeedsResidual %v for %s", p.NeedsResidual, s)
		}
	})
}

// FuzzEval runs a fuzzed query over a small fleet built from fuzzed tags and
// reported properties: it must not panic, must be deterministic, and the
// plan must not change the answer.
func FuzzEval(f *testing.F) {
	tags := []string{
		`{"location":{"region":"US","plant":"Redmond43"}}`,
		`{"a":3,"b":"3","c":true,"d":2.5,"e":{"f":"two words"},"group":"-x","x":""}`,
		`{"a":4503599627370496,"b":-2,"c":1e-7,"my-key":"é"}`,
		`{}`,
	}
	reported := []string{
		`{"connectivity":{"type":"cellular"},"telemetryConfig":{"status":"Success","sendFrequencyInSecs":300}}`,
		`{"a":null,"b":[1,2],"c":{"d":{"e":1}}}`,
		`{}`,
	}
	for i, q := range fuzzSeeds() {
		f.Add(q, tags[i%len(tags)], reported[i%len(reported)])
	}
	f.Fuzz(func(t *testing.T, src, tagsJSON, reportedJSON string) {
		q, err := Parse(src)
		if err != nil {
			return
		}
		// Malformed JSON stands for an empty section, so that the query
		// still runs.
		tagDoc, err := twin.Decode([]byte(tagsJSON))
		if err != nil {
			tagDoc = map[string]any{}
		}
		repDoc, err := twin.Decode([]byte(reportedJSON))
		if err != nil {
			repDoc = map[string]any{}
		}
		// Run on documents as they come (any JSON: arrays, nulls, odd
		// numbers): no panic, same answer twice.
		raw := []map[string]any{
			{"deviceId": "b", "connectionState": "Connected", "tags": tagDoc, "properties": map[string]any{"reported": repDoc}},
			{"deviceId": "a", "tags": repDoc, "properties": map[string]any{"desired": tagDoc}},
			{"deviceId": "c"},
		}
		r1, err := q.Run(raw)
		if err != nil {
			t.Fatal(err)
		}
		r2, _ := q.Run(raw)
		if !reflect.DeepEqual(r1, r2) {
			t.Fatalf("Run is not deterministic: %v / %v", r1, r2)
		}
		for _, d := range raw {
			q.Match(d)
		}
		// The plan's guarantee holds for twins the operator has
		// reconciled, whose tags follow the twin rules and hold numbers
		// as the API server writes them.
		if twin.ValidateDocument(twin.Tags, "spec.tags", tagDoc) != nil {
			return
		}
		tagDoc = canonicalNumbers(tagDoc).(map[string]any)
		var objs []object
		for i, state := range []string{"Connected", "", "Disconnected"} {
			id := []string{"myDeviceId", "a,b=c", "x"}[i]
			tg := tagDoc
			if i == 2 {
				tg = map[string]any{}
			}
			doc := map[string]any{
				"deviceId": id, "status": "enabled", "connectionState": state,
				"tags": tg, "properties": map[string]any{"reported": repDoc, "desired": map[string]any{}},
			}
			if state == "" {
				doc["connectionState"] = "Disconnected"
			}
			objs = append(objs, object{
				doc:    doc,
				labels: labels.Set(twin.MirrorLabels(tg)),
				fields: fields.Set{FieldDeviceID: id, FieldConnectionState: state},
			})
		}
		checkPlan(t, q, objs)
	})
}

// canonicalNumbers rewrites every number as the API server would write it
// (as a float64, in encoding/json's format).
func canonicalNumbers(v any) any {
	switch x := v.(type) {
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			out[k] = canonicalNumbers(e)
		}
		return out
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = canonicalNumbers(e)
		}
		return out
	}
	if kindOf(v) == kNumber {
		return formatNumber(toFloat(v))
	}
	return v
}
