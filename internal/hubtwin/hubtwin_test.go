package hubtwin

import (
	"encoding/json"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/twin"
)

func raw(s string) *apiextensionsv1.JSON { return &apiextensionsv1.JSON{Raw: []byte(s)} }

// encode returns the canonical JSON of a document (sorted keys).
func encode(d map[string]any) string { return string(twin.Encode(d)) }

func canon(t *testing.T, s string) string {
	t.Helper()
	d, err := twin.Decode([]byte(s))
	if err != nil {
		t.Fatalf("Decode(%s): %v", s, err)
	}
	return encode(d)
}

func TestFromDeviceTwin(t *testing.T) {
	created := metav1.NewTime(time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC))
	activity := metav1.NewTime(time.Date(2024, 5, 2, 11, 30, 0, 0, time.FixedZone("CEST", 2*3600)))

	tests := map[string]struct {
		twin v1alpha1.DeviceTwin
		want string
	}{
		"new twin: defaults everywhere": {
			twin: v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Name: "dev-1"}},
			want: `{
				"deviceId": "dev-1", "etag": "MA==", "version": 1, "status": "enabled",
				"statusUpdateTime": "0001-01-01T00:00:00Z",
				"connectionState": "Disconnected",
				"connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
				"lastActivityTime": "0001-01-01T00:00:00Z",
				"cloudToDeviceMessageCount": 0, "authenticationType": "sas",
				"capabilities": {"iotEdge": false},
				"tags": {},
				"properties": {
					"desired": {"$version": 0, "$metadata": {"$lastUpdated": "0001-01-01T00:00:00Z"}},
					"reported": {"$version": 0, "$metadata": {"$lastUpdated": "0001-01-01T00:00:00Z"}}
				}
			}`,
		},
		"spec device id when status has none": {
			twin: v1alpha1.DeviceTwin{
				ObjectMeta: metav1.ObjectMeta{Name: "dev-1", ResourceVersion: "1234", Generation: 2, CreationTimestamp: created},
				Spec: v1alpha1.DeviceTwinSpec{
					DeviceID: "My:Device",
					Tags:     raw(`{"location":{"plant":"Redmond43","floor":3}}`),
					Desired:  raw(`{"interval":1.50}`),
				},
				Status: v1alpha1.DeviceTwinStatus{DesiredVersion: 2},
			},
			want: `{
				"deviceId": "My:Device", "etag": "MTIzNA==", "version": 2, "status": "enabled",
				"statusUpdateTime": "0001-01-01T00:00:00Z",
				"connectionState": "Disconnected",
				"connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
				"lastActivityTime": "0001-01-01T00:00:00Z",
				"cloudToDeviceMessageCount": 0, "authenticationType": "sas",
				"capabilities": {"iotEdge": false},
				"tags": {"location": {"plant": "Redmond43", "floor": 3}},
				"properties": {
					"desired": {"interval": 1.50, "$version": 2,
						"$metadata": {"$lastUpdated": "2024-05-01T10:00:00.000000000Z", "$lastUpdatedVersion": 2}},
					"reported": {"$version": 0, "$metadata": {"$lastUpdated": "2024-05-01T10:00:00.000000000Z"}}
				}
			}`,
		},
		"reconciled twin with metadata": {
			twin: v1alpha1.DeviceTwin{
				ObjectMeta: metav1.ObjectMeta{Name: "dev-1", ResourceVersion: "99", Generation: 4, CreationTimestamp: created},
				Spec: v1alpha1.DeviceTwinSpec{
					Tags:    raw(`{"a":"b"}`),
					Desired: raw(`{"x":1}`),
				},
				Status: v1alpha1.DeviceTwinStatus{
					DeviceID:                   "myDeviceId",
					Reported:                   raw(`{"connectivity":{"type":"cellular"}}`),
					ReportedVersion:            7,
					DesiredVersion:             3,
					ConnectionState:            v1alpha1.ConnectionStateConnected,
					ConnectionStateUpdatedTime: &activity,
					LastActivityTime:           &activity,
					Metadata: &v1alpha1.TwinMetadata{
						Desired:  raw(`{"$lastUpdated":"2024-05-01T10:00:01.000000000Z","$lastUpdatedVersion":3,"x":{"$lastUpdated":"2024-05-01T10:00:01.000000000Z","$lastUpdatedVersion":3}}`),
						Reported: raw(`{"$lastUpdated":"2024-05-02T09:30:00.000000000Z","connectivity":{"$lastUpdated":"2024-05-02T09:30:00.000000000Z","type":{"$lastUpdated":"2024-05-02T09:30:00.000000000Z"}}}`),
					},
				},
			},
			want: `{
				"deviceId": "myDeviceId", "etag": "OTk=", "version": 11, "status": "enabled",
				"statusUpdateTime": "0001-01-01T00:00:00Z",
				"connectionState": "Connected",
				"connectionStateUpdatedTime": "2024-05-02T09:30:00Z",
				"lastActivityTime": "2024-05-02T09:30:00Z",
				"cloudToDeviceMessageCount": 0, "authenticationType": "sas",
				"capabilities": {"iotEdge": false},
				"tags": {"a": "b"},
				"properties": {
					"desired": {"x": 1, "$version": 3,
						"$metadata": {"$lastUpdated":"2024-05-01T10:00:01.000000000Z","$lastUpdatedVersion":3,"x":{"$lastUpdated":"2024-05-01T10:00:01.000000000Z","$lastUpdatedVersion":3}}},
					"reported": {"connectivity": {"type": "cellular"}, "$version": 7,
						"$metadata": {"$lastUpdated":"2024-05-02T09:30:00.000000000Z","connectivity":{"$lastUpdated":"2024-05-02T09:30:00.000000000Z","type":{"$lastUpdated":"2024-05-02T09:30:00.000000000Z"}}}}
				}
			}`,
		},
		"sections that are not objects render empty": {
			twin: v1alpha1.DeviceTwin{
				ObjectMeta: metav1.ObjectMeta{Name: "dev-1"},
				Spec:       v1alpha1.DeviceTwinSpec{Tags: raw(`[1]`), Desired: raw(`null`)},
				Status:     v1alpha1.DeviceTwinStatus{Reported: raw(`{bad`)},
			},
			want: `{
				"deviceId": "dev-1", "etag": "MA==", "version": 1, "status": "enabled",
				"statusUpdateTime": "0001-01-01T00:00:00Z",
				"connectionState": "Disconnected",
				"connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
				"lastActivityTime": "0001-01-01T00:00:00Z",
				"cloudToDeviceMessageCount": 0, "authenticationType": "sas",
				"capabilities": {"iotEdge": false},
				"tags": {},
				"properties": {
					"desired": {"$version": 0, "$metadata": {"$lastUpdated": "0001-01-01T00:00:00Z"}},
					"reported": {"$version": 0, "$metadata": {"$lastUpdated": "0001-01-01T00:00:00Z"}}
				}
			}`,
		},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			got := FromDeviceTwin(&tc.twin)
			if g, w := encode(got), canon(t, tc.want); g != w {
				t.Errorf("got  %s\nwant %s", g, w)
			}
		})
	}
}

// TestFromDeviceTwinNumbers checks that numbers are json.Number, kept as
// written, so integers stay exact.
func TestFromDeviceTwinNumbers(t *testing.T) {
	tw := &v1alpha1.DeviceTwin{
		ObjectMeta: metav1.ObjectMeta{Name: "d"},
		Spec:       v1alpha1.DeviceTwinSpec{Tags: raw(`{"big":4503599627370496,"f":2.50}`)},
		Status:     v1alpha1.DeviceTwinStatus{ReportedVersion: 5},
	}
	doc := FromDeviceTwin(tw)
	tags := doc["tags"].(map[string]any)
	if got := tags["big"]; got != json.Number("4503599627370496") {
		t.Errorf("tags.big = %#v", got)
	}
	if got := tags["f"]; got != json.Number("2.50") {
		t.Errorf("tags.f = %#v", got)
	}
	if got := doc["version"]; got != json.Number("6") {
		t.Errorf("version = %#v", got)
	}
	reported := doc["properties"].(map[string]any)["reported"].(map[string]any)
	if got := reported["$version"]; got != json.Number("5") {
		t.Errorf("reported $version = %#v", got)
	}
	if _, ok := doc["cloudToDeviceMessageCount"].(json.Number); !ok {
		t.Errorf("cloudToDeviceMessageCount = %#v", doc["cloudToDeviceMessageCount"])
	}
}

// TestFromDeviceTwinSharesNothing checks that changing the document leaves
// the DeviceTwin alone.
func TestFromDeviceTwinSharesNothing(t *testing.T) {
	tw := &v1alpha1.DeviceTwin{
		ObjectMeta: metav1.ObjectMeta{Name: "d"},
		Spec:       v1alpha1.DeviceTwinSpec{Tags: raw(`{"a":{"b":"c"}}`)},
	}
	doc := FromDeviceTwin(tw)
	doc["tags"].(map[string]any)["a"].(map[string]any)["b"] = "changed"
	if again := FromDeviceTwin(tw); encode(again["tags"].(map[string]any)) != `{"a":{"b":"c"}}` {
		t.Errorf("the DeviceTwin changed: %s", tw.Spec.Tags.Raw)
	}
}

func TestVersionIsMonotonic(t *testing.T) {
	tw := &v1alpha1.DeviceTwin{}
	last := Version(tw)
	steps := []func(){
		func() { tw.Generation = 1 },           // created
		func() { tw.Status.ReportedVersion++ }, // reported patch
		func() { tw.Generation++ },             // tags or desired changed
		func() { tw.Status.DesiredVersion++ },  // desired sent: no change needed
		func() { tw.Generation++; tw.Status.ReportedVersion += 3 },
	}
	for i, step := range steps {
		step()
		v := Version(tw)
		if v < last {
			t.Fatalf("step %d: version went from %d to %d", i, last, v)
		}
		last = v
	}
	if last != 7 {
		t.Errorf("final version %d, want 7", last)
	}
}

func TestETag(t *testing.T) {
	tests := map[string]struct {
		rv, etag string
	}{
		"number":  {rv: "12345", etag: "MTIzNDU="},
		"empty":   {rv: "", etag: "MA=="},
		"opaque":  {rv: "a/b+c", etag: "YS9iK2M="},
		"one":     {rv: "1", etag: "MQ=="},
		"largest": {rv: "18446744073709551615", etag: "MTg0NDY3NDQwNzM3MDk1NTE2MTU="},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if got := ETag(tc.rv); got != tc.etag {
				t.Errorf("ETag(%q) = %q, want %q", tc.rv, got, tc.etag)
			}
			want := tc.rv
			if want == "" {
				want = "0"
			}
			for _, e := range []string{tc.etag, `"` + tc.etag + `"`, " " + tc.etag} {
				rv, err := ResourceVersion(e)
				if err != nil || rv != want {
					t.Errorf("ResourceVersion(%q) = %q, %v; want %q", e, rv, err, want)
				}
			}
		})
	}
}

func TestResourceVersionErrors(t *testing.T) {
	for _, etag := range []string{"", `""`, "*", "not base64!", `"MTIz`} {
		if rv, err := ResourceVersion(etag); err == nil {
			t.Errorf("ResourceVersion(%q) = %q, want an error", etag, rv)
		}
	}
}

// TestFromDeviceTwinConfigurations: the labels the configurations set on a
// twin are its configurations member, as IoT Hub shows
// configurations.[[id]].status; other labels are not.
func TestFromDeviceTwinConfigurations(t *testing.T) {
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Name: "d", Labels: map[string]string{
		v1alpha1.ConfigurationsLabelPrefix + "telemetry-30s": v1alpha1.ConfigurationApplied,
		v1alpha1.ConfigurationsLabelPrefix + "firmware":      v1alpha1.ConfigurationTargeted,
		"location.plant":                     "Redmond43",
		"configurations.kubetwin.io.other/x": "Applied",
	}}}
	got, ok := FromDeviceTwin(tw)["configurations"].(map[string]any)
	if !ok {
		t.Fatalf("no configurations member in %v", FromDeviceTwin(tw))
	}
	if want := `{"firmware":{"status":"Targeted"},"telemetry-30s":{"status":"Applied"}}`; encode(got) != want {
		t.Errorf("configurations = %s, want %s", encode(got), want)
	}
	tw.Labels = map[string]string{"location.plant": "Redmond43"}
	if c, ok := FromDeviceTwin(tw)["configurations"]; ok {
		t.Errorf("a twin no configuration targets has configurations %v", c)
	}
}
