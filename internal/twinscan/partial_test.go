package twinscan

import (
	"fmt"
	"reflect"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/query/querytest"
	"github.com/kubetwin/kubetwin/internal/twinscan/twinscantest"
)

func rawJSON(s string) *apiextensionsv1.JSON {
	if s == "" {
		return nil
	}
	return &apiextensionsv1.JSON{Raw: []byte(s)}
}

// exampleTwins are the DeviceTwins of the examples' fleet, as the operator
// leaves them.
func exampleTwins(t testing.TB) ([]*v1alpha1.DeviceTwin, *querytest.File) {
	f, err := querytest.Load("../query/testdata/examples.json")
	if err != nil {
		t.Fatal(err)
	}
	var twins []*v1alpha1.DeviceTwin
	for i, d := range f.Fleet {
		tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{
			Namespace: "fleet", Name: fmt.Sprintf("t%d", i), ResourceVersion: fmt.Sprint(100 + i), Generation: 2,
			CreationTimestamp: metav1.NewTime(time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC)),
		}}
		tw.Spec.Tags = rawJSON(string(d.Tags))
		tw.Spec.Desired = rawJSON(`{"interval": 30, "mode": "eco"}`)
		tw.Status.Reported = rawJSON(string(d.Reported))
		tw.Status.DeviceID = d.DeviceID
		tw.Status.ConnectionState = d.ConnectionState
		tw.Status.ReportedVersion = int64(i)
		tw.Status.DesiredVersion = 2
		if d.LastActivityTime != "" {
			at, err := time.Parse(time.RFC3339, d.LastActivityTime)
			if err != nil {
				t.Fatal(err)
			}
			tw.Status.LastActivityTime = &metav1.Time{Time: at}
		}
		twins = append(twins, tw)
	}
	return twins, f
}

// oddTwins have sections partial must read exactly as encoding/json does:
// duplicate keys, escapes, non-ASCII keys and values, values that are not
// objects on the way, sections that are not objects, whitespace.
func oddTwins() []*v1alpha1.DeviceTwin {
	docs := []struct{ tags, desired, reported string }{
		{`{"a": 1, "a": {"b": "second"}}`, `{"x": {"y": 1}, "x": 2}`, `{"t": {"v": 95.5}, "t": {"w": 1}}`},
		{`{"k\u0065y": "escaped key", "s": "caf\u00e9", "q": "a\"b"}`, `{"é": "accent", "arr": [1, {"a": 2}]}`, ` { "t" : { "v" : 1e2 } } `},
		{`[1, 2]`, `"a string"`, `null`},
		{`{}`, `{"a": {"b": {"c": {"d": -0.5}}}}`, `{"t": {"v": 90}, "connectivity": {"type": "wifi"}}`},
		{`{"location": {"plant": "Redmond43"}, "floor": 3}`, ``, `{"t": {"v": "95"}, "telemetry": {"temperature": 99.1}}`},
		{`{"a": true, "b": false, "c": null, "d": 0}`, `{"a": [], "b": {}}`, `{"$version": 7, "t": {"v": 91}}`},
	}
	var twins []*v1alpha1.DeviceTwin
	for i, d := range docs {
		tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "odd", Name: fmt.Sprintf("odd%d", i), ResourceVersion: "7", Generation: 1}}
		tw.Spec.Tags, tw.Spec.Desired, tw.Status.Reported = rawJSON(d.tags), rawJSON(d.desired), rawJSON(d.reported)
		tw.Spec.DeviceID = fmt.Sprintf("odd-%d", i)
		if i%2 == 0 {
			tw.Status.ConnectionState = v1alpha1.ConnectionStateConnected
			tw.Spec.Status = "disabled"
		}
		twins = append(twins, tw)
	}
	return twins
}

var extraQueries = []string{
	"SELECT * FROM devices WHERE tags.a.b = 'second'",
	"SELECT * FROM devices WHERE tags.a = 1",
	"SELECT * FROM devices WHERE tags.key = 'escaped key' OR tags.s = 'café' OR tags.q = 'a\"b'",
	"SELECT * FROM devices WHERE properties.desired.x = 2 OR properties.desired.x.y = 1",
	"SELECT * FROM devices WHERE properties.reported.t.v > 90",
	"SELECT * FROM devices WHERE properties.reported.t.w = 1",
	"SELECT * FROM devices WHERE IS_DEFINED(properties.desired.arr)",
	"SELECT * FROM devices WHERE properties.desired.[[é]] = 'accent'",
	"SELECT * FROM devices WHERE properties.desired.a.b.c.d < 0",
	"SELECT * FROM devices WHERE properties.reported.$version > 3",
	"SELECT * FROM devices WHERE properties.desired.$version = 2 AND status = 'enabled'",
	"SELECT * FROM devices WHERE status = 'disabled' OR connectionState = 'Connected'",
	"SELECT * FROM devices WHERE IS_DEFINED(tags) AND NOT IS_DEFINED(tags.location)",
	"SELECT * FROM devices WHERE capabilities.iotEdge = false AND version >= 1 AND etag != ''",
	"SELECT * FROM devices WHERE lastActivityTime > '2024' OR connectionStateUpdatedTime = '0001-01-01T00:00:00Z'",
	"SELECT * FROM devices WHERE cloudToDeviceMessageCount = 0 AND authenticationType = 'sas' AND statusUpdateTime != ''",
	"SELECT * FROM devices WHERE IS_DEFINED(properties.reported.$metadata)",
	"SELECT * FROM devices WHERE IS_DEFINED(properties)",
	"SELECT deviceId, tags.a, properties.desired.x, properties.reported.t FROM devices",
	"SELECT tags, properties.desired FROM devices WHERE tags.d = 0",
	"SELECT properties.reported.t.v AS v, COUNT() AS n FROM devices GROUP BY properties.reported.t.v",
	"SELECT MAX(properties.reported.telemetry.temperature) AS hot, AVG(tags.floor) AS f FROM devices",
	"SELECT * FROM devices WHERE tags.c = null OR tags.b = false",
	"SELECT TOP 2 deviceId FROM devices WHERE properties.reported.nothing.here = 1 OR tags.nothing = 2 OR deviceId != ''",
}

// TestPartialMatchesFullDocument: on every twin, the condition of every
// example and extra query gives the same answer on the partial document
// as on the whole one (hubtwin.FromDeviceTwin), and Run of projections,
// groups and aggregates over partial documents gives the same rows.
func TestPartialMatchesFullDocument(t *testing.T) {
	twins, f := exampleTwins(t)
	twins = append(twins, oddTwins()...)
	texts := slicesConcat(extraQueries, f)
	var full []map[string]any
	for _, tw := range twins {
		full = append(full, hubtwin.FromDeviceTwin(tw))
	}
	matched := 0
	for _, text := range texts {
		q, err := query.Parse(text)
		if err != nil {
			t.Fatalf("%s: %v", text, err)
		}
		pw, pa := NewPartial(q.WherePaths()), NewPartial(q.Paths())
		sc := pw.newScratch()
		var parts []map[string]any
		for i, tw := range twins {
			want := q.Match(full[i])
			if got := q.Match(pw.Doc(tw)); got != want {
				t.Errorf("%s on %s: partial document matches %v, whole document %v (partial %v)", text, tw.Name, got, want, pw.Doc(tw))
			}
			// The scratch document, reused from the previous twin.
			if got := q.Match(pw.fill(sc, tw)); got != want {
				t.Errorf("%s on %s: scratch document matches %v, whole document %v (scratch %v)", text, tw.Name, got, want, sc.doc)
			}
			if want {
				matched++
			}
			parts = append(parts, pa.Doc(tw))
		}
		if q.ItemType() == query.ItemTypeTwin {
			continue
		}
		want, _ := q.Run(full)
		got, _ := q.Run(parts)
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s: Run over partial documents gives\n%v\nover whole ones\n%v", text, got, want)
		}
	}
	if matched == 0 {
		t.Fatal("no query matched any twin: the test checks nothing")
	}
}

func slicesConcat(extra []string, f *querytest.File) []string {
	out := append([]string(nil), extra...)
	for _, e := range f.Examples {
		out = append(out, e.Query)
	}
	return out
}

// TestSectionValueErrors: malformed JSON is an error (doc then renders the
// whole document), never a value read from a broken section.
func TestSectionValueErrors(t *testing.T) {
	for _, raw := range []string{`{"a": 1`, `{"a" 1}`, `{"a": tru}`, `{"a": 1} x`, `{"a": "x`, `{"a": 01}`, `{"a": [1,]}`, `[1`} {
		if _, _, err := sectionValue(rawJSON(raw), []string{"a"}); err == nil {
			t.Errorf("%s: no error", raw)
		}
	}
}

const benchResidual = "SELECT * FROM devices WHERE properties.reported.telemetry.temperature > 90"

// BenchmarkResidualWhole: the condition on whole documents, as
// kubectl-twin's listing path and the service API evaluate it.
func BenchmarkResidualWhole(b *testing.B) {
	twins := twinscantest.Fleet(10000)
	q, _ := query.Parse(benchResidual)
	b.ResetTimer()
	for b.Loop() {
		for _, tw := range twins {
			q.Match(hubtwin.FromDeviceTwin(tw))
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(twins)), "ns/twin")
}

// BenchmarkResidualPartial: the same on partial documents.
func BenchmarkResidualPartial(b *testing.B) {
	twins := twinscantest.Fleet(10000)
	q, _ := query.Parse(benchResidual)
	p := NewPartial(q.WherePaths())
	sc := p.newScratch()
	b.ResetTimer()
	for b.Loop() {
		for _, tw := range twins {
			q.Match(p.fill(sc, tw))
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(twins)), "ns/twin")
}
