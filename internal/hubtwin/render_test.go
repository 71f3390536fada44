package hubtwin

import (
	"bytes"
	"encoding/json"
	"fmt"
	"reflect"
	"slices"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/internal/twinscan/twinscantest"
)

// marshalDoc is what the query API sent before AppendJSON: the map of
// FromDeviceTwin through encoding/json, without HTML escaping.
func marshalDoc(t *testing.T, tw *v1alpha1.DeviceTwin) []byte {
	t.Helper()
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(FromDeviceTwin(tw)); err != nil {
		t.Fatal(err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
}

// TestAppendJSONAsFromDeviceTwin: AppendJSON's document is
// FromDeviceTwin's, for twins with every section absent, null, empty,
// not an object, holding "$version" or "$metadata", with and without
// metadata, configurations and characters JSON escapes.
func TestAppendJSONAsFromDeviceTwin(t *testing.T) {
	sections := []*apiextensionsv1.JSON{
		nil, raw(``), raw(`null`), raw(`{}`), raw(` { } `), raw(`[1,2]`), raw(`"text"`), raw(`7`),
		raw(`{"a":1,"b":{"c":"d"}}`), raw(` {"z":true, "a":[1,{"x":null}], "n":1.50e3} `),
		raw(`{"$version":99,"a":1}`), raw(`{"$metadata":{"x":1},"b":2}`), raw(`{"s":"$version"}`),
		raw(`{"html":"<a href=\"x\">&amp;</a>","uni":"\u00e9\u2028 \ud83d\ude00","esc":"tab\tnl\n"}`),
	}
	metas := []*apiextensionsv1.JSON{nil, raw(`{}`), raw(`null`), raw(`[]`), raw(` {} `),
		raw(`{"$lastUpdated":"2026-12-06T10:00:00.000000000Z","a":{"$lastUpdated":"2026-12-06T10:00:00.000000000Z","$lastUpdatedVersion":4}}`)}
	created := metav1.NewTime(time.Date(2024, 5, 1, 10, 0, 0, 0, time.UTC))
	activity := metav1.NewTime(time.Date(2024, 5, 2, 11, 30, 0, 0, time.FixedZone("CEST", 2*3600)))

	var twins []*v1alpha1.DeviceTwin
	for i := range 3 * len(sections) * len(metas) {
		tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: fmt.Sprintf("dev-%d", i)}}
		tw.Spec.Tags = sections[i%len(sections)]
		tw.Spec.Desired = sections[(i/3)%len(sections)]
		tw.Status.Reported = sections[(i/7)%len(sections)]
		if m := i % (len(metas) + 1); m < len(metas) {
			tw.Status.Metadata = &v1alpha1.TwinMetadata{Desired: metas[m], Reported: metas[(m+i/len(sections))%len(metas)]}
		}
		tw.Status.DesiredVersion = int64(i % 4)
		tw.Status.ReportedVersion = int64(i % 5)
		tw.Generation = int64(i % 3)
		if i%2 == 0 {
			tw.CreationTimestamp = created
			tw.ResourceVersion = fmt.Sprint(1000 + i)
			tw.Status.LastActivityTime = &activity
			tw.Status.ConnectionStateUpdatedTime = &activity
			tw.Status.ConnectionState = v1alpha1.ConnectionStateConnected
		}
		switch i % 5 {
		case 0:
			tw.Spec.DeviceID = `dev"ice\<1>&` + "\u00e9"
		case 1:
			tw.Status.DeviceID = "reported-id"
		case 2:
			tw.Labels = map[string]string{v1alpha1.ConfigurationsLabelPrefix + "fw": "Applied", v1alpha1.ConfigurationsLabelPrefix + "a": "Targeted", "other": "x"}
			tw.Spec.Status = "disabled"
		}
		twins = append(twins, tw)
	}
	for i, tw := range twins {
		got := AppendJSON([]byte("prefix"), tw)
		if !bytes.HasPrefix(got, []byte("prefix")) {
			t.Fatalf("twin %d: AppendJSON dropped what b held: %.40s", i, got)
		}
		got = got[len("prefix"):]
		want := marshalDoc(t, tw)
		g, err := twin.Decode(got)
		if err != nil {
			t.Fatalf("twin %d: AppendJSON gives invalid JSON: %v\n%s", i, err, got)
		}
		w, _ := twin.Decode(want)
		if !reflect.DeepEqual(g, w) {
			t.Fatalf("twin %d (tags %s, desired %s, reported %s):\nAppendJSON  %s\nFromDeviceTwin %s", i,
				rawOf(tw.Spec.Tags), rawOf(tw.Spec.Desired), rawOf(tw.Status.Reported), got, want)
		}
		// AppendMembers: the same document, with only the members kept.
		if all := AppendMembers(nil, tw, func(string) bool { return true }); !bytes.Equal(all, got) {
			t.Fatalf("twin %d: AppendMembers keeping all:\n%s\nAppendJSON:\n%s", i, all, got)
		}
		for _, keep := range [][]string{{}, {"deviceId"}, {"tags", "version"}, {"properties"}, {"configurations", "authenticationType"},
			{"etag", "lastActivityTime", "status", "statusUpdateTime"}, {"capabilities", "cloudToDeviceMessageCount", "connectionState", "connectionStateUpdatedTime"},
			{"nonexistent", "deviceId"}} {
			part := AppendMembers(nil, tw, func(m string) bool { return slices.Contains(keep, m) })
			p, err := twin.Decode(part)
			if err != nil {
				t.Fatalf("twin %d, members %q: invalid JSON %v\n%s", i, keep, err, part)
			}
			wantPart := map[string]any{}
			for _, k := range keep {
				if v, ok := w[k]; ok {
					wantPart[k] = v
				}
			}
			if !reflect.DeepEqual(p, wantPart) {
				t.Fatalf("twin %d, members %q:\n%s\nwant those of\n%s", i, keep, part, want)
			}
		}
	}
}

func rawOf(j *apiextensionsv1.JSON) string {
	if j == nil {
		return "<nil>"
	}
	return string(j.Raw)
}

// TestAppendJSONBytes: for twins as the API server sends them (sections
// with their keys in order, as it encodes objects), AppendJSON writes the
// bytes the query API sent before, so an answer is the same byte for byte.
func TestAppendJSONBytes(t *testing.T) {
	for i, tw := range twinscantest.Fleet(300) {
		if i%3 == 0 {
			tw.Labels[v1alpha1.ConfigurationsLabelPrefix+"fw"] = "Targeted"
		}
		if i%4 == 0 {
			tw.Status.Metadata = nil
		}
		// The fleet's sections as the API server would send them.
		sections := []*apiextensionsv1.JSON{tw.Spec.Tags, tw.Spec.Desired, tw.Status.Reported}
		if m := tw.Status.Metadata; m != nil {
			sections = append(sections, m.Desired, m.Reported)
		}
		for _, s := range sections {
			d, err := twin.DecodeRaw(s.Raw)
			if err != nil {
				t.Fatal(err)
			}
			s.Raw = twin.Encode(d)
		}
		if got, want := AppendJSON(nil, tw), marshalDoc(t, tw); !bytes.Equal(got, want) {
			t.Fatalf("twin %d:\nAppendJSON  %s\nencoding/json %s", i, got, want)
		}
	}
}

// BenchmarkAppendJSON against rendering the map and encoding it, per twin
// of make bench-scale's fleet.
func BenchmarkAppendJSON(b *testing.B) {
	fleet := twinscantest.Fleet(1000)
	b.Run("AppendJSON", func(b *testing.B) {
		var buf []byte
		for i := 0; b.Loop(); i++ {
			buf = AppendJSON(buf[:0], fleet[i%len(fleet)])
		}
	})
	b.Run("FromDeviceTwin+encoding/json", func(b *testing.B) {
		var buf bytes.Buffer
		enc := json.NewEncoder(&buf)
		enc.SetEscapeHTML(false)
		for i := 0; b.Loop(); i++ {
			buf.Reset()
			if err := enc.Encode(FromDeviceTwin(fleet[i%len(fleet)])); err != nil {
				b.Fatal(err)
			}
		}
	})
}
