package watchdecode

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"math/rand"
	"os"
	"reflect"
	"strings"
	"testing"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/api/apitesting/fuzzer"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metafuzzer "k8s.io/apimachinery/pkg/apis/meta/fuzzer"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/runtime/serializer/streaming"
	"k8s.io/apimachinery/pkg/watch"
	restclientwatch "k8s.io/client-go/rest/watch"
	"sigs.k8s.io/randfill"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// decoders are a watch's object decoder and event decoder (framer
// included) as client-go's REST client builds them from ns.
type decoders struct {
	object runtime.Decoder
	info   runtime.SerializerInfo
}

func decodersOf(t testing.TB, ns runtime.NegotiatedSerializer) decoders {
	t.Helper()
	info, ok := runtime.SerializerInfoForMediaType(ns.SupportedMediaTypes(), runtime.ContentTypeJSON)
	if !ok {
		t.Fatal("no JSON serializer")
	}
	return decoders{object: ns.DecoderToVersion(info.Serializer, v1alpha1.GroupVersion), info: info}
}

// events decodes a watch stream as rest.Request.Watch does.
func (d decoders) events(t testing.TB, stream []byte) ([]watch.Event, error) {
	t.Helper()
	fr := d.info.StreamSerializer.Framer.NewFrameReader(io.NopCloser(bytes.NewReader(stream)))
	dec := restclientwatch.NewDecoder(streaming.NewDecoder(fr, d.info.StreamSerializer.Serializer), d.object)
	var out []watch.Event
	for {
		typ, obj, err := dec.Decode()
		if err == io.EOF {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, watch.Event{Type: typ, Object: obj})
	}
}

var (
	twinGVK  = v1alpha1.GroupVersion.WithKind("DeviceTwin")
	claimGVK = v1alpha1.GroupVersion.WithKind("DeviceIDClaim")
)

// schemes are client-go's decoders and this package's, for gvk.
func schemes(t testing.TB, gvk schema.GroupVersionKind) (clientGo, onePass decoders) {
	s, err := NewScheme()
	if err != nil {
		t.Fatal(err)
	}
	ns, err := NegotiatedSerializer(s, gvk)
	if err != nil {
		t.Fatal(err)
	}
	return decodersOf(t, serializer.WithoutConversionCodecFactory{CodecFactory: serializer.NewCodecFactory(s)}), decodersOf(t, ns)
}

// randomJSON is a JSON value of depth at most depth: what tags, desired
// and reported properties and managedFields hold.
func randomJSON(c randfill.Continue, depth int) any {
	switch k := c.Intn(8); {
	case depth <= 0 || k == 0:
		switch c.Intn(6) {
		case 0:
			return c.Int63() - c.Int63()
		case 1:
			return c.Float64() * 1e6
		case 2:
			return c.Intn(2) == 0
		case 3:
			return nil
		case 4:
			return "ünïcødé \"quoted\" \\ </script> \u2028 " + c.String(8)
		default:
			return c.String(16)
		}
	case k < 3:
		a := make([]any, c.Intn(4))
		for i := range a {
			a[i] = randomJSON(c, depth-1)
		}
		return a
	default:
		m := map[string]any{}
		for range c.Intn(5) {
			m[c.String(10)] = randomJSON(c, depth-1)
		}
		return m
	}
}

func marshal(t testing.TB, v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// filler fills DeviceTwins with random values, as the API server could
// serve them: metav1's fuzzer for metadata, JSON documents for the raw
// JSON fields.
func filler(t testing.TB, seed int64) *randfill.Filler {
	s, err := NewScheme()
	if err != nil {
		t.Fatal(err)
	}
	f := fuzzer.FuzzerFor(metafuzzer.Funcs, rand.NewSource(seed), serializer.NewCodecFactory(s))
	f.NumElements(0, 4)
	return f.Funcs(
		func(j *apiextensionsv1.JSON, c randfill.Continue) {
			m := map[string]any{}
			for range 1 + c.Intn(6) {
				m[c.String(12)] = randomJSON(c, 4)
			}
			j.Raw = marshal(t, m)
		},
		func(j *metav1.ManagedFieldsEntry, c randfill.Continue) {
			c.FillNoCustom(j)
			j.FieldsV1 = metav1.NewFieldsV1(string(marshal(t, map[string]any{"f:status": map[string]any{"f:reported": map[string]any{".": map[string]any{}, "f:" + c.String(6): map[string]any{}}}})))
		},
	)
}

// TestDecodeAsClientGo decodes 2,000 random twins and 2,000 random
// claims both ways: every one must take the one-pass path and come out as
// client-go's decoder makes it (kind cleared).
func TestDecodeAsClientGo(t *testing.T) {
	for _, c := range []struct {
		gvk schema.GroupVersionKind
		new func() runtime.Object
	}{
		{twinGVK, func() runtime.Object { return &v1alpha1.DeviceTwin{} }},
		{claimGVK, func() runtime.Object { return &v1alpha1.DeviceIDClaim{} }},
	} {
		t.Run(c.gvk.Kind, func(t *testing.T) { decodeAsClientGo(t, c.gvk, c.new) })
	}
}

func decodeAsClientGo(t *testing.T, gvk schema.GroupVersionKind, newObj func() runtime.Object) {
	clientGo, onePass := schemes(t, gvk)
	f := filler(t, 1)
	for i := range 2000 {
		in := newObj()
		f.Fill(in)
		in.GetObjectKind().SetGroupVersionKind(gvk)
		data := marshal(t, in)
		if err := Decode(data, gvk, newObj()); err != nil {
			t.Fatalf("object %d: one pass failed, so it was not tested: %v\n%s", i, err, data)
		}
		want, _, err := clientGo.object.Decode(data, nil, nil)
		if err != nil {
			t.Fatalf("object %d: client-go: %v", i, err)
		}
		got, _, err := onePass.object.Decode(data, nil, nil)
		if err != nil {
			t.Fatalf("object %d: %v", i, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("object %d decodes as\n%s\nnot as client-go's\n%s\nfrom %s", i, marshal(t, got), marshal(t, want), data)
		}
	}
}

// TestDecodeCapturedTwin: a twin as kube-apiserver served it (kubectl's
// last-applied annotation, managedFields of four managers, a delta,
// conditions).
func TestDecodeCapturedTwin(t *testing.T) {
	data, err := os.ReadFile("../operator/testdata/twin.json")
	if err != nil {
		t.Fatal(err)
	}
	clientGo, onePass := schemes(t, twinGVK)
	if err := Decode(data, twinGVK, &v1alpha1.DeviceTwin{}); err != nil {
		t.Fatal(err)
	}
	want, _, err := clientGo.object.Decode(data, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	got, _, err := onePass.object.Decode(data, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("decodes as\n%s\nnot as client-go's\n%s", marshal(t, got), marshal(t, want))
	}
	if w := want.(*v1alpha1.DeviceTwin); len(w.ManagedFields) == 0 || w.Status.Delta == nil || len(w.Status.Conditions) == 0 {
		t.Fatal("testdata/twin.json has no managedFields, delta or conditions")
	}
}

// watchStream is a watch's events as kube-apiserver encodes them, one per
// line.
func watchStream(t testing.TB, events ...any) []byte {
	var b bytes.Buffer
	for _, e := range events {
		b.Write(marshal(t, e))
		b.WriteByte('\n')
	}
	return b.Bytes()
}

type rawEvent struct {
	Type   string `json:"type"`
	Object any    `json:"object"`
}

// TestWatchStreamAsClientGo decodes a stream of every kind of event a
// twin watch carries, and frames the one-pass decoder leaves to
// client-go's, both ways: the same events, in order.
func TestWatchStreamAsClientGo(t *testing.T) {
	f := filler(t, 2)
	twin := func(name string) *v1alpha1.DeviceTwin {
		in := &v1alpha1.DeviceTwin{}
		f.Fill(in)
		in.TypeMeta = metav1.TypeMeta{Kind: "DeviceTwin", APIVersion: v1alpha1.GroupVersion.String()}
		in.Name = name
		// Larger than the streaming decoder's first buffer (1 KiB), so the
		// frame comes in several reads.
		in.Annotations = map[string]string{"note": strings.Repeat("x", 3000)}
		return in
	}
	gone := apierrors.NewResourceExpired("too old resource version: 1 (42)").ErrStatus
	gone.Kind, gone.APIVersion = "Status", "v1"
	bookmark := map[string]any{"kind": "DeviceTwin", "apiVersion": "kubetwin.io/v1alpha1",
		"metadata": map[string]any{"resourceVersion": "42", "annotations": map[string]string{metav1.InitialEventsAnnotationKey: "true"}}}
	stream := watchStream(t,
		rawEvent{"ADDED", twin("a")},
		rawEvent{"MODIFIED", twin("b")},
		rawEvent{"BOOKMARK", bookmark},
		rawEvent{"DELETED", twin("c")},
		rawEvent{"ERROR", gone},
	)
	// Frames the one pass leaves to client-go: a duplicate name in the
	// twin, and in the event.
	dup := marshal(t, twin("d"))
	dup = append([]byte(`{"metadata":{"name":"first"},`), dup[1:]...)
	stream = append(stream, []byte(`{"type":"MODIFIED","object":`+string(dup)+"}\n")...)
	stream = append(stream, []byte(`{"type":"ADDED","type":"DELETED","object":`+string(marshal(t, twin("e")))+"}\n")...)
	// The members in another order, with white space and another member.
	stream = append(stream, []byte("{ \"object\" :\n "+string(marshal(t, twin("f")))+" , \"extra\": [1, {}],\t\"type\" : \"MODIFIED\" }")...)

	clientGo, onePass := schemes(t, twinGVK)
	want, err := clientGo.events(t, stream)
	if err != nil {
		t.Fatal(err)
	}
	got, err := onePass.events(t, stream)
	if err != nil {
		t.Fatal(err)
	}
	if len(want) != 8 {
		t.Fatalf("client-go decoded %d events, want 8", len(want))
	}
	if len(got) != len(want) {
		t.Fatalf("decoded %d events, client-go %d", len(got), len(want))
	}
	for i := range want {
		if !reflect.DeepEqual(got[i], want[i]) {
			t.Errorf("event %d is %s %s, client-go's %s %s", i, got[i].Type, marshal(t, got[i].Object), want[i].Type, marshal(t, want[i].Object))
		}
	}
	if s, ok := got[4].Object.(*metav1.Status); !ok || s.Code != 410 {
		t.Errorf("the ERROR event's object is %#v, want the 410 Status", got[4].Object)
	}
	if tw, ok := got[5].Object.(*v1alpha1.DeviceTwin); !ok || tw.Name != "d" {
		t.Errorf("the twin with a duplicate name is %#v, want the last name as client-go's", got[5].Object)
	}
	if tw, ok := got[7].Object.(*v1alpha1.DeviceTwin); !ok || tw.Name != "f" || got[7].Type != watch.Modified {
		t.Errorf("the last event is %s %#v, want twin f MODIFIED", got[7].Type, got[7].Object)
	}
}

// TestWatchStreamErrors: a stream cut inside an event, and an event that
// is not JSON, end the watch with an error as client-go's decoder does.
func TestWatchStreamErrors(t *testing.T) {
	clientGo, onePass := schemes(t, twinGVK)
	for name, stream := range map[string]string{
		"cut":          `{"type":"ADDED","object":{"kind":"DeviceTwin","apiVersion":"kubetwin.io/v1alpha1","metadata":{"name":"a"`,
		"not JSON":     `{"type":"ADDED","object":{"kind":"DeviceTwin"}} garbage`,
		"no object":    `{"type":"ADDED"}`,
		"unknown type": `{"type":"RENAMED","object":{"kind":"DeviceTwin","apiVersion":"kubetwin.io/v1alpha1"}}`,
	} {
		t.Run(name, func(t *testing.T) {
			want, wantErr := clientGo.events(t, []byte(stream))
			got, err := onePass.events(t, []byte(stream))
			if wantErr == nil || err == nil {
				t.Fatalf("errors %v, client-go's %v: want both", err, wantErr)
			}
			if len(got) != len(want) {
				t.Fatalf("%d events before the error, client-go %d", len(got), len(want))
			}
		})
	}
}

// brokenReader reads r, then fails with err instead of io.EOF.
type brokenReader struct {
	r   io.Reader
	err error
}

func (b *brokenReader) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if err == io.EOF {
		return n, b.err
	}
	return n, err
}

// TestFrameReaderErrors: a stream that ends, is cut within an event, or
// whose connection breaks ends with client-go's framer's error, the very
// value: client-go's watch resumes after io.EOF, io.ErrUnexpectedEOF and
// a broken connection, and turns any other error into an error event (and
// the reflector into a relist).
func TestFrameReaderErrors(t *testing.T) {
	clientGo, onePass := schemes(t, twinGVK)
	event := `{"type":"ADDED","object":{"kind":"DeviceTwin","apiVersion":"kubetwin.io/v1alpha1","metadata":{"name":"a"}}}`
	reset := errors.New("read tcp 10.0.0.1:443: connection reset by peer")
	for name, c := range map[string]struct {
		stream  string
		readErr error
		want    error
	}{
		"ends":                      {event + "\n", io.EOF, io.EOF},
		"cut within an event":       {event + "\n" + event[:40], io.EOF, io.ErrUnexpectedEOF},
		"broken within an event":    {event + "\n" + event[:40], reset, reset},
		"broken between two events": {event + "\n", reset, reset},
	} {
		t.Run(name, func(t *testing.T) {
			for dn, d := range map[string]decoders{"client-go": clientGo, "one-pass": onePass} {
				fr := d.info.StreamSerializer.Framer.NewFrameReader(io.NopCloser(&brokenReader{strings.NewReader(c.stream), c.readErr}))
				dec := restclientwatch.NewDecoder(streaming.NewDecoder(fr, d.info.StreamSerializer.Serializer), d.object)
				if _, _, err := dec.Decode(); err != nil {
					t.Fatalf("%s: first event: %v", dn, err)
				}
				if _, _, err := dec.Decode(); err != c.want {
					t.Errorf("%s: error %#v, want %#v", dn, err, c.want)
				}
			}
		})
	}
}

// BenchmarkWatchDecode is the CPU a twin's watch event costs: client-go's
// decoders against this package's, on the captured twin.
func BenchmarkWatchDecode(b *testing.B) {
	data, err := os.ReadFile("../operator/testdata/twin.json")
	if err != nil {
		b.Fatal(err)
	}
	const n = 1000
	var stream []byte
	for range n {
		stream = append(stream, `{"type":"ADDED","object":`...)
		stream = append(stream, bytes.TrimSpace(data)...)
		stream = append(stream, "}\n"...)
	}
	clientGo, onePass := schemes(b, twinGVK)
	for name, d := range map[string]decoders{"client-go": clientGo, "one-pass": onePass} {
		b.Run(name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				evs, err := d.events(b, stream)
				if err != nil || len(evs) != n {
					b.Fatal(len(evs), err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/event")
		})
	}
}

// TestSplitEvent: the events kube-apiserver sends are split in one pass
// (the stream test above would pass through client-go's decoder alone);
// what is not a strict event is left to client-go's.
func TestSplitEvent(t *testing.T) {
	obj := `{"kind":"DeviceTwin","metadata":{"name":"a","labels":{"x":"}"}}}`
	for frame, wantType := range map[string]string{
		`{"type":"ADDED","object":` + obj + `}`:                                     "ADDED",
		"{ \"object\" :\n " + obj + " , \"x\": [1, {}],\t\"type\" : \"BOOKMARK\" }": "BOOKMARK",
		`{"type":"ADDED","type":"DELETED","object":` + obj + `}`:                    "",
		`{"type":"ADDED"}`:                         "",
		`{"type":1,"object":` + obj + `}`:          "",
		`{"type":"ADDED","object":` + obj + `} {}`: "",
		`["ADDED",` + obj + `]`:                    "",
	} {
		typ, got, err := splitEvent([]byte(frame))
		if wantType == "" {
			if err == nil {
				t.Errorf("%s: split as %s %s, want an error", frame, typ, got)
			}
			continue
		}
		if err != nil || typ != wantType || string(got) != obj {
			t.Errorf("%s: split as %q %s, %v; want %s %s", frame, typ, got, err, wantType, obj)
		}
	}
}

// FuzzDecodeAsClientGo: whatever the bytes, the object decoder answers as
// client-go's does: the same object, or an error when it errs.
func FuzzDecodeAsClientGo(f *testing.F) {
	captured, err := os.ReadFile("../operator/testdata/twin.json")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(captured)
	f.Add([]byte(`{"kind":"DeviceTwin","apiVersion":"kubetwin.io/v1alpha1","metadata":{"name":"a","creationTimestamp":null},"spec":null}`))
	f.Add([]byte(`{"kind":"Status","apiVersion":"v1","status":"Failure","code":410}`))
	f.Add([]byte(`{"kind":"DeviceTwin","apiVersion":"kubetwin.io/v1alpha1","metadata":{"name":"a","Name":"b","generation":1.0}}`))
	clientGo, onePass := schemes(f, twinGVK)
	f.Fuzz(func(t *testing.T, data []byte) {
		want, _, wantErr := clientGo.object.Decode(data, nil, nil)
		got, _, err := onePass.object.Decode(data, nil, nil)
		if (err == nil) != (wantErr == nil) {
			t.Fatalf("%q: error %v, client-go's %v", data, err, wantErr)
		}
		if err == nil && !reflect.DeepEqual(got, want) {
			t.Fatalf("%q decodes as\n%#v\nnot as client-go's\n%#v", data, got, want)
		}
	})
}

// FuzzSplitEvent: an event split in one pass is the event client-go's
// decoder reads, with the same object bytes.
func FuzzSplitEvent(f *testing.F) {
	f.Add([]byte(`{"type":"ADDED","object":{"kind":"DeviceTwin","metadata":{"name":"a"}}}`))
	f.Add([]byte("{ \"object\" :\n {\"a\":[1,2,{}]} , \"x\": null,\t\"type\" : \"BOOKMARK\" }"))
	f.Add([]byte(`{"type":"ERROR","object":{"kind":"Status","code":410}}`))
	clientGo, _ := schemes(f, twinGVK)
	f.Fuzz(func(t *testing.T, data []byte) {
		typ, obj, err := splitEvent(data)
		if err != nil {
			return // left to client-go's decoder
		}
		var want metav1.WatchEvent
		if _, _, err := clientGo.info.StreamSerializer.Serializer.Decode(data, nil, &want); err != nil {
			t.Fatalf("%q split as %s %s, but client-go's decoder fails: %v", data, typ, obj, err)
		}
		if typ != want.Type || !bytes.Equal(obj, want.Object.Raw) {
			t.Fatalf("%q split as %q %s, client-go's %q %s", data, typ, obj, want.Type, want.Object.Raw)
		}
	})
}

// FuzzWatchStream: a whole stream decodes to client-go's events: the same
// events in order, and an error where client-go's decoder stops with one.
func FuzzWatchStream(f *testing.F) {
	captured, err := os.ReadFile("../operator/testdata/twin.json")
	if err != nil {
		f.Fatal(err)
	}
	f.Add([]byte(`{"type":"ADDED","object":` + string(bytes.TrimSpace(captured)) + "}\n" +
		`{"type":"BOOKMARK","object":{"kind":"DeviceTwin","apiVersion":"kubetwin.io/v1alpha1","metadata":{"resourceVersion":"9"}}}`))
	f.Add([]byte(`{"type":"ERROR","object":{"kind":"Status","apiVersion":"v1","status":"Failure","code":410}}{"type":"ADDED"`))
	clientGo, onePass := schemes(f, twinGVK)
	f.Fuzz(func(t *testing.T, stream []byte) {
		want, wantErr := clientGo.events(t, stream)
		got, err := onePass.events(t, stream)
		if (err == nil) != (wantErr == nil) {
			t.Fatalf("%q: error %v, client-go's %v", stream, err, wantErr)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("%q: events %v, client-go's %v", stream, got, want)
		}
	})
}
