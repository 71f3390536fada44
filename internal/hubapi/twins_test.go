package hubapi_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubapi"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
)

func TestTwinGet(t *testing.T) {
	reset(t)
	ctx := context.Background()
	tw := newTwin(t, devNS, "get-1", "getDevice1", `{"location":{"region":"US","plant":"Redmond43"}}`, `{"telemetry":{"interval":30}}`)
	tw.Spec.Status = v1alpha1.DeviceDisabled
	if err := k8s.Update(ctx, tw); err != nil {
		t.Fatal(err)
	}
	now := metav1.NewTime(time.Date(2025, 3, 4, 5, 6, 7, 0, time.UTC))
	tw.Status = v1alpha1.DeviceTwinStatus{
		DeviceID:                   "getDevice1",
		Reported:                   &apiextensionsv1.JSON{Raw: []byte(`{"fw":"1.0","connectivity":{"type":"cellular"}}`)},
		ReportedVersion:            4,
		DesiredVersion:             2,
		ConnectionState:            v1alpha1.ConnectionStateConnected,
		ConnectionStateUpdatedTime: &now,
		LastActivityTime:           &now,
	}
	if err := k8s.Status().Update(ctx, tw); err != nil {
		t.Fatal(err)
	}
	waitCached(t, tw)

	r := call(t, http.MethodGet, "/twins/getDevice1", nil, nil).expect(t, http.StatusOK)
	doc := r.object(t)
	etag := hubtwin.ETag(tw.ResourceVersion)
	if got := r.header.Get("Etag"); got != strconv.Quote(etag) {
		t.Errorf("ETag header %q, want %q", got, strconv.Quote(etag))
	}
	for k, want := range map[string]string{
		"deviceId":                   `"getDevice1"`,
		"etag":                       strconv.Quote(etag),
		"version":                    strconv.FormatInt(tw.Generation+4, 10),
		"status":                     `"disabled"`,
		"connectionState":            `"Connected"`,
		"connectionStateUpdatedTime": `"2025-03-04T05:06:07Z"`,
		"lastActivityTime":           `"2025-03-04T05:06:07Z"`,
		"cloudToDeviceMessageCount":  `0`,
		"authenticationType":         `"sas"`,
		"capabilities":               `{"iotEdge":false}`,
		"tags":                       `{"location":{"region":"US","plant":"Redmond43"}}`,
	} {
		valueEqual(t, k, doc[k], want)
	}
	props, _ := doc["properties"].(map[string]any)
	desired, _ := props["desired"].(map[string]any)
	reported, _ := props["reported"].(map[string]any)
	valueEqual(t, "desired.telemetry", desired["telemetry"], `{"interval":30}`)
	valueEqual(t, "desired.$version", desired["$version"], `2`)
	valueEqual(t, "reported.fw", reported["fw"], `"1.0"`)
	valueEqual(t, "reported.connectivity", reported["connectivity"], `{"type":"cellular"}`)
	valueEqual(t, "reported.$version", reported["$version"], `4`)
	for _, sec := range []map[string]any{desired, reported} {
		if _, ok := sec["$metadata"].(map[string]any); !ok {
			t.Errorf("section without $metadata: %v", sec)
		}
	}

	call(t, http.MethodGet, "/twins/noSuchDevice", nil, nil).
		expectError(t, http.StatusNotFound, "DeviceNotFound", `device "noSuchDevice" is not registered`)
}

func TestTwinPatch(t *testing.T) {
	reset(t)
	tw := newTwin(t, devNS, "patch-1", "patchDevice1", `{"location":{"region":"US"},"old":"x"}`, `{"keep":true}`)
	first := call(t, http.MethodGet, "/twins/patchDevice1", nil, nil).expect(t, http.StatusOK).object(t)
	etag := first["etag"].(string)

	patch := `{"tags":{"location":{"plant":"Redmond43"},"old":null},"properties":{"desired":{"telemetry":{"interval":60}}}}`
	r := call(t, http.MethodPatch, "/twins/patchDevice1", map[string]string{"If-Match": strconv.Quote(etag)}, patch).expect(t, http.StatusOK)
	doc := r.object(t)
	valueEqual(t, "reply tags", doc["tags"], `{"location":{"region":"US","plant":"Redmond43"}}`)
	valueEqual(t, "reply desired.telemetry", doc["properties"].(map[string]any)["desired"].(map[string]any)["telemetry"], `{"interval":60}`)

	stored := getTwinObject(t, devNS, tw.Name)
	jsonEqual(t, "spec.tags", stored.Spec.Tags, `{"location":{"region":"US","plant":"Redmond43"}}`)
	jsonEqual(t, "spec.desired", stored.Spec.Desired, `{"keep":true,"telemetry":{"interval":60}}`)
	if doc["etag"] != hubtwin.ETag(stored.ResourceVersion) {
		t.Errorf("reply etag %v, stored resourceVersion %s", doc["etag"], stored.ResourceVersion)
	}
	var managed bool
	for _, mf := range stored.ManagedFields {
		managed = managed || mf.Manager == hubapi.FieldManager
	}
	if !managed {
		t.Errorf("no managedFields entry of %s", hubapi.FieldManager)
	}

	// The first etag is stale now.
	r = call(t, http.MethodPatch, "/twins/patchDevice1", map[string]string{"If-Match": strconv.Quote(etag)}, `{"tags":{"x":"1"}}`)
	r.expectError(t, http.StatusPreconditionFailed, "PreconditionFailed", "")
	if msg := r.errorMessage(t); !strings.Contains(msg, "is not current") {
		t.Errorf("412 message %q", msg)
	}
	if again := getTwinObject(t, devNS, tw.Name); again.ResourceVersion != stored.ResourceVersion {
		t.Error("a refused patch changed the twin")
	}
	call(t, http.MethodPatch, "/twins/patchDevice1", map[string]string{"If-Match": `"bm90LWFuLWV0YWc="`}, `{"tags":{"x":"1"}}`).
		expectError(t, http.StatusPreconditionFailed, "PreconditionFailed", "")
	call(t, http.MethodPatch, "/twins/patchDevice1", map[string]string{"If-Match": `"%%%"`}, `{"tags":{"x":"1"}}`).
		expectError(t, http.StatusPreconditionFailed, "PreconditionFailed", `If-Match "%%%" is not an etag of this hub: read the twin for its etag, or send "*"`)

	// "*" and no If-Match take any version.
	call(t, http.MethodPatch, "/twins/patchDevice1", map[string]string{"If-Match": `"*"`}, `{"tags":{"x":"1"}}`).expect(t, http.StatusOK)
	r = call(t, http.MethodPatch, "/twins/patchDevice1", nil, `{"tags":{"location":null},"properties":{"desired":null}}`).expect(t, http.StatusOK)
	valueEqual(t, "tags after delete", r.object(t)["tags"], `{"x":"1"}`)
	stored = getTwinObject(t, devNS, tw.Name)
	jsonEqual(t, "spec.tags", stored.Spec.Tags, `{"x":"1"}`)
	jsonEqual(t, "spec.desired", stored.Spec.Desired, `{}`)

	// A patch that changes nothing writes nothing.
	r = call(t, http.MethodPatch, "/twins/patchDevice1", nil, `{"tags":{"x":"1"}}`).expect(t, http.StatusOK)
	if r.object(t)["etag"] != hubtwin.ETag(stored.ResourceVersion) || getTwinObject(t, devNS, tw.Name).ResourceVersion != stored.ResourceVersion {
		t.Error("a patch without changes wrote the twin")
	}

	// A reply is only sent once the cache has the write: a read right after sees it.
	r = call(t, http.MethodPatch, "/twins/patchDevice1", nil, `{"tags":{"seq":1}}`).expect(t, http.StatusOK)
	got := call(t, http.MethodGet, "/twins/patchDevice1", nil, nil).expect(t, http.StatusOK).object(t)
	if got["etag"] != r.object(t)["etag"] {
		t.Errorf("GET after PATCH: etag %v, the PATCH replied %v", got["etag"], r.object(t)["etag"])
	}
}

func TestTwinPatchRejects(t *testing.T) {
	reset(t)
	tw := newTwin(t, devNS, "reject-1", "rejectDevice1", `{"a":"b"}`, `{"c":1}`)
	for _, tc := range []struct {
		name, body, msg string
	}{
		{"array in tags", `{"tags":{"list":[1,2]}}`, "tags.list: arrays are not allowed in device twins"},
		{"array deep in desired", `{"properties":{"desired":{"x":{"y":[true]}}}}`, "properties.desired.x.y: arrays are not allowed in device twins"},
		{"$ key in desired", `{"properties":{"desired":{"$version":3}}}`, "properties.desired: $version is read-only"},
		{"nested $ key", `{"properties":{"desired":{"x":{"$y":1}}}}`, "properties.desired.x: $y is read-only"},
		{"dot in key", `{"tags":{"a.b":1}}`, `tags: key "a.b" must not contain '.'`},
		{"reported", `{"properties":{"reported":{"fw":"2"}}}`, "properties.reported: reported properties are written by the device only (the back end may write tags and properties.desired)"},
		{"tags not an object", `{"tags":5}`, "tags: must be a JSON object"},
		{"body an array", `[{"tags":{}}]`, "the request body: twin document must be a JSON object, got an array"},
		{"unknown member", `{"foo":1}`, `"foo" is not a member of a twin that can be written (the back end may write tags and properties.desired)`},
		{"other device", `{"deviceId":"someoneElse","tags":{"a":"c"}}`, `deviceId: "someoneElse" does not match the device id of the path "rejectDevice1"`},
		{"empty body", ``, "the request body is empty: a JSON object is required"},
		{"too big", `{"tags":{"s":"` + strings.Repeat("x", 5000) + `"}}`, "tags.s: string is 5000 bytes, more than the 4096 allowed"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			call(t, http.MethodPatch, "/twins/rejectDevice1", nil, tc.body).
				expectError(t, http.StatusBadRequest, "ArgumentInvalid", tc.msg)
			if got := getTwinObject(t, devNS, tw.Name); got.ResourceVersion != tw.ResourceVersion {
				t.Error("a refused patch changed the twin")
			}
		})
	}
	// A section over its size limit after the merge is refused whole.
	big := map[string]any{}
	for i := range 3 {
		big["k"+strconv.Itoa(i)] = strings.Repeat("v", 4000)
	}
	body, _ := json.Marshal(map[string]any{"tags": big})
	call(t, http.MethodPatch, "/twins/rejectDevice1", nil, body).
		expectError(t, http.StatusBadRequest, "ArgumentInvalid", "tags: tags is 12008 bytes, more than the 8192 allowed")
	if got := getTwinObject(t, devNS, tw.Name); got.ResourceVersion != tw.ResourceVersion {
		t.Error("a refused patch changed the twin")
	}
}

func TestTwinReplace(t *testing.T) {
	reset(t)
	tw := newTwin(t, devNS, "replace-1", "replaceDevice1", `{"a":"1","b":{"c":"2"}}`, `{"x":1,"y":2}`)
	doc := call(t, http.MethodGet, "/twins/replaceDevice1", nil, nil).expect(t, http.StatusOK).object(t)
	// Send back what GET returned, changed: the read-only members, the
	// desired $version and $metadata and the reported properties are ignored.
	doc["tags"] = map[string]any{"b": map[string]any{"d": "3"}}
	doc["properties"].(map[string]any)["desired"] = map[string]any{"z": true, "$version": 7, "$metadata": map[string]any{}}
	r := call(t, http.MethodPut, "/twins/replaceDevice1", map[string]string{"If-Match": strconv.Quote(doc["etag"].(string))}, doc).expect(t, http.StatusOK)
	valueEqual(t, "reply tags", r.object(t)["tags"], `{"b":{"d":"3"}}`)
	stored := getTwinObject(t, devNS, tw.Name)
	jsonEqual(t, "spec.tags", stored.Spec.Tags, `{"b":{"d":"3"}}`)
	jsonEqual(t, "spec.desired", stored.Spec.Desired, `{"z":true}`)

	// The old etag is stale; a PUT with it changes nothing.
	call(t, http.MethodPut, "/twins/replaceDevice1", map[string]string{"If-Match": strconv.Quote(doc["etag"].(string))}, `{"tags":{}}`).
		expectError(t, http.StatusPreconditionFailed, "PreconditionFailed", "")
	// A document must be valid as a whole: no nulls, no $ keys.
	call(t, http.MethodPut, "/twins/replaceDevice1", nil, `{"tags":{"a":null}}`).
		expectError(t, http.StatusBadRequest, "ArgumentInvalid", "tags.a: null is only allowed in a patch, where it deletes the key")
	call(t, http.MethodPut, "/twins/replaceDevice1", nil, `{"properties":{"desired":{"a":{"$b":1}}}}`).
		expectError(t, http.StatusBadRequest, "ArgumentInvalid", `properties.desired.a: key "$b" must not contain '$'`)
	if got := getTwinObject(t, devNS, tw.Name); got.ResourceVersion != stored.ResourceVersion {
		t.Error("a refused replace changed the twin")
	}
}

// TestAwaitReconcile checks that with AwaitReconcile a write replies with
// the twin as the operator left it, whose etag stays valid.
func TestAwaitReconcile(t *testing.T) {
	reset(t)
	ctx := context.Background()
	tw := newTwin(t, devNS, "await-1", "awaitDevice1", `{"a":"1"}`, "")
	h, err := newHandler(hubapi.Options{AwaitReconcile: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	// A stand-in for the operator: it records the generation it saw.
	done := make(chan error, 1)
	go func() {
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			cur := &v1alpha1.DeviceTwin{}
			if err := k8s.Get(ctx, client.ObjectKeyFromObject(tw), cur); err != nil {
				done <- err
				return
			}
			if cur.Generation > tw.Generation {
				cur.Status.ObservedGeneration = cur.Generation
				done <- k8s.Status().Update(ctx, cur)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
		done <- context.DeadlineExceeded
	}()
	req := httptest.NewRequest(http.MethodPatch, "/twins/awaitDevice1?api-version=2021-04-12", strings.NewReader(`{"tags":{"a":"2"}}`))
	req.Header.Set("Authorization", ownerToken(t))
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	if err := <-done; err != nil {
		t.Fatalf("operator stand-in: %v", err)
	}
	if rec.Code != http.StatusOK {
		t.Fatalf("status %d: %s", rec.Code, rec.Body)
	}
	var doc map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &doc); err != nil {
		t.Fatal(err)
	}
	final := getTwinObject(t, devNS, tw.Name)
	if final.Status.ObservedGeneration != final.Generation || doc["etag"] != hubtwin.ETag(final.ResourceVersion) {
		t.Errorf("reply etag %v; the twin after the operator's write has etag %s", doc["etag"], hubtwin.ETag(final.ResourceVersion))
	}
	// That etag works for the next write.
	call(t, http.MethodPatch, "/twins/awaitDevice1", map[string]string{"If-Match": strconv.Quote(doc["etag"].(string))}, `{"tags":{"a":"3"}}`).
		expect(t, http.StatusOK)
}
