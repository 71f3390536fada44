package query

import (
	"encoding/json"
	"path/filepath"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/query/querytest"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// device describes a fixture twin.
type device struct {
	id       string
	tags     string // JSON
	reported string // JSON
	state    string // status.connectionState
	activity string // RFC 3339, "" for never
}

// deviceTwin returns the DeviceTwin of a fixture device, as the operator
// leaves it once reconciled.
func (d device) deviceTwin() *v1alpha1.DeviceTwin {
	t := &v1alpha1.DeviceTwin{
		ObjectMeta: metav1.ObjectMeta{Name: "twin-" + d.id, Namespace: "default", ResourceVersion: "1", Generation: 1},
		Spec:       v1alpha1.DeviceTwinSpec{DeviceID: d.id},
		Status: v1alpha1.DeviceTwinStatus{
			DeviceID:        d.id,
			ConnectionState: d.state,
		},
	}
	if d.tags != "" {
		t.Spec.Tags = &apiextensionsv1.JSON{Raw: []byte(d.tags)}
	}
	if d.reported != "" {
		t.Status.Reported = &apiextensionsv1.JSON{Raw: []byte(d.reported)}
		t.Status.ReportedVersion = 1
	}
	if d.activity != "" {
		at, err := time.Parse(time.RFC3339, d.activity)
		if err != nil {
			panic(err)
		}
		mt := metav1.NewTime(at)
		t.Status.LastActivityTime = &mt
	}
	return t
}

// docs renders fixture devices as IoT Hub twin documents.
func docs(devices ...device) []map[string]any {
	out := make([]map[string]any, len(devices))
	for i, d := range devices {
		out[i] = hubtwin.FromDeviceTwin(d.deviceTwin())
	}
	return out
}

// fleet and examples are the example fleet and queries of
// testdata/examples.json: myDeviceId is in Redmond43 and reports cellular;
// the others vary.
var fleet, examples = loadExamples()

// example is a query of testdata/examples.json with its answer: the
// deviceIds of a SELECT *, or the rows (JSON) of a projection or aggregate.
type example = querytest.Example

func loadExamples() ([]device, []example) {
	f, err := querytest.Load(filepath.Join("testdata", "examples.json"))
	if err != nil {
		panic(err)
	}
	devices := make([]device, len(f.Fleet))
	for i, d := range f.Fleet {
		devices[i] = device{id: d.DeviceID, tags: string(d.Tags), reported: string(d.Reported), state: d.ConnectionState, activity: d.LastActivityTime}
	}
	return devices, f.Examples
}

// mustParse parses a query for a test.
func mustParse(t testing.TB, q string) *Query {
	t.Helper()
	parsed, err := Parse(q)
	if err != nil {
		t.Fatalf("Parse(%q): %v", q, err)
	}
	return parsed
}

// run parses and runs a query for a test.
func run(t testing.TB, q string, twins []map[string]any) Result {
	t.Helper()
	res, err := mustParse(t, q).Run(twins)
	if err != nil {
		t.Fatalf("Run(%q): %v", q, err)
	}
	return res
}

// ids returns the deviceIds of twin items.
func ids(items []map[string]any) []string {
	out := []string{}
	for _, it := range items {
		out = append(out, it["deviceId"].(string))
	}
	return out
}

// encodeItems returns items as canonical JSON.
func encodeItems(items []map[string]any) string {
	out := "["
	for i, it := range items {
		if i > 0 {
			out += ","
		}
		out += string(twin.Encode(it))
	}
	return out + "]"
}

// canonJSON returns a JSON array of objects in canonical form.
func canonJSON(t testing.TB, s string) string {
	t.Helper()
	d, err := twin.Decode([]byte(`{"a":` + s + `}`))
	if err != nil {
		t.Fatalf("bad JSON %s: %v", s, err)
	}
	var items []map[string]any
	for _, v := range d["a"].([]any) {
		items = append(items, v.(map[string]any))
	}
	return encodeItems(items)
}

// num is shorthand for a json.Number.
func num(s string) json.Number { return json.Number(s) }
