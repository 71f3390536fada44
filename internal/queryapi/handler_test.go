package queryapi

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus/testutil"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apiserver/pkg/authentication/authenticator"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/queryapi/wire"
	"github.com/kubetwin/kubetwin/internal/twinscan"
	"github.com/kubetwin/kubetwin/internal/twinscan/twinscantest"
)

// twinReader is a client.Reader over fixed twins (a stand-in for the
// cache); List waits on block when it is set.
type twinReader struct {
	twins   []*v1alpha1.DeviceTwin
	block   chan struct{}
	entered chan struct{}
}

func (r *twinReader) Get(context.Context, client.ObjectKey, client.Object, ...client.GetOption) error {
	return fmt.Errorf("not implemented")
}

func (r *twinReader) List(ctx context.Context, l client.ObjectList, opts ...client.ListOption) error {
	if r.block != nil {
		r.entered <- struct{}{}
		<-r.block
	}
	lo := (&client.ListOptions{}).ApplyOptions(opts)
	list := l.(*v1alpha1.DeviceTwinList)
	for _, t := range r.twins {
		if lo.Namespace == "" || t.Namespace == lo.Namespace {
			list.Items = append(list.Items, *t)
		}
	}
	return nil
}

// anyone is authenticated as alice; allow decides the SubjectAccessReview.
func testHandler(r client.Reader, o Options, allow func(authorizer.Attributes) bool) *Handler {
	if o.Twins == nil {
		o.Twins = twinscan.ReaderLister(r)
	}
	o.Authenticator = authenticator.RequestFunc(func(*http.Request) (*authenticator.Response, bool, error) {
		return &authenticator.Response{User: &user.DefaultInfo{Name: "alice"}}, true, nil
	})
	o.Authorizer = authorizer.AuthorizerFunc(func(_ context.Context, a authorizer.Attributes) (authorizer.Decision, string, error) {
		if allow == nil || allow(a) {
			return authorizer.DecisionAllow, "", nil
		}
		return authorizer.DecisionNoOpinion, "no RBAC rule allows it", nil
	})
	o.Log = logr.Discard()
	return NewHandler(o)
}

func postQuery(h http.Handler, ns, q string) *httptest.ResponseRecorder {
	path := "/apis/" + wire.GroupVersion + "/" + wire.Resource
	if ns != "" {
		path = "/apis/" + wire.GroupVersion + "/namespaces/" + ns + "/" + wire.Resource
	}
	body, _ := json.Marshal(wire.TwinQuery{Spec: wire.TwinQuerySpec{Query: q}})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, path, bytes.NewReader(body)))
	return rec
}

func status(t *testing.T, rec *httptest.ResponseRecorder) metav1.Status {
	t.Helper()
	var st metav1.Status
	if err := json.Unmarshal(rec.Body.Bytes(), &st); err != nil || st.Kind != "Status" {
		t.Fatalf("not a Status (%v): %s", err, rec.Body)
	}
	return st
}

// TestResponseBound: an answer over MaxResponseBytes is refused with 422
// ResponseTooLarge naming the flag, and one under it is sent whole.
func TestResponseBound(t *testing.T) {
	twins := twinscantest.Fleet(50)
	h := testHandler(&twinReader{twins: twins}, Options{MaxResponseBytes: 20000}, nil)
	rec := postQuery(h, "scale", "SELECT * FROM devices")
	if rec.Code != http.StatusUnprocessableEntity {
		t.Fatalf("status %d, want 422: %s", rec.Code, rec.Body)
	}
	if st := status(t, rec); st.Reason != wire.ReasonResponseTooLarge || !strings.Contains(st.Message, "--query-api-max-response-bytes") {
		t.Fatalf("refusal %+v", st)
	}
	rec = postQuery(h, "scale", "SELECT TOP 3 * FROM devices")
	if rec.Code != http.StatusCreated {
		t.Fatalf("TOP 3: status %d: %s", rec.Code, rec.Body)
	}
	var tq wire.TwinQuery
	if err := json.Unmarshal(rec.Body.Bytes(), &tq); err != nil || len(tq.Status.Items) != 3 || len(tq.Status.Twins) != 3 {
		t.Fatalf("TOP 3: %v %+v", err, tq.Status)
	}
}

func postSpec(h http.Handler, ns string, spec wire.TwinQuerySpec) *httptest.ResponseRecorder {
	body, _ := json.Marshal(wire.TwinQuery{Spec: spec})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/apis/"+wire.GroupVersion+"/namespaces/"+ns+"/"+wire.Resource, bytes.NewReader(body)))
	return rec
}

// pagedAnswer reads every part of q's paged answer; it fails the test on
// a part that is not 201 or is larger than limit.
func pagedAnswer(t *testing.T, h http.Handler, q string, limit int) (items []string, twins []wire.TwinRef, parts int) {
	t.Helper()
	cont := ""
	for {
		rec := postSpec(h, "scale", wire.TwinQuerySpec{Query: q, Paged: true, Continue: cont})
		if rec.Code != http.StatusCreated {
			t.Fatalf("%s, part %d: status %d: %s", q, parts+1, rec.Code, rec.Body)
		}
		var tq wire.TwinQuery
		if err := json.Unmarshal(rec.Body.Bytes(), &tq); err != nil {
			t.Fatal(err)
		}
		parts++
		n := 0
		for _, it := range tq.Status.Items {
			items = append(items, string(it))
			n += len(it) + 1
		}
		if n > limit {
			t.Fatalf("%s, part %d: %d bytes of items, over the bound %d", q, parts, n, limit)
		}
		if len(tq.Status.Items) == 0 || tq.Status.ItemType == query.ItemTypeTwin && len(tq.Status.Twins) != len(tq.Status.Items) {
			t.Fatalf("%s, part %d: %d items, %d twins", q, parts, len(tq.Status.Items), len(tq.Status.Twins))
		}
		twins = append(twins, tq.Status.Twins...)
		if cont = tq.Status.Continue; cont == "" {
			return items, twins, parts
		}
		if parts > 1000 {
			t.Fatalf("%s: still more after %d parts", q, parts)
		}
	}
}

// TestPagedAnswer: with spec.paged, a SELECT * or a projection without
// groups over the bound comes in parts, each under it, whose items are
// those of the whole answer in its order (TOP included); queries with
// groups over the bound are still refused, and a bad continue token is a
// 400 that says what to send.
func TestPagedAnswer(t *testing.T) {
	twins := twinscantest.Fleet(50)
	const limit = 20000
	whole := testHandler(&twinReader{twins: twins}, Options{}, nil)
	h := testHandler(&twinReader{twins: twins}, Options{MaxResponseBytes: limit}, nil)
	small := testHandler(&twinReader{twins: twins}, Options{MaxResponseBytes: 2000}, nil)
	for _, c := range []struct {
		h     http.Handler
		limit int
		q     string
	}{
		{h, limit, "SELECT * FROM devices"}, {h, limit, "SELECT TOP 37 * FROM devices"},
		{h, limit, "SELECT * FROM devices WHERE tags.customer >= 'customer-10'"},
		{small, 2000, "SELECT deviceId, tags FROM devices"},
		{small, 2000, "SELECT TOP 23 deviceId, properties.reported AS r FROM devices WHERE tags.customer >= 'customer-10'"},
		// Projections evaluated 7 twins at a time: parts end inside and
		// at the ends of chunks.
		{small, -7, "SELECT deviceId, tags FROM devices"},
		{small, -7, "SELECT TOP 23 deviceId, properties.reported AS r FROM devices WHERE tags.customer >= 'customer-10'"},
		// Rows of expressions, not only paths (query.Run, not twinscan.Rows).
		{small, 2000, "SELECT deviceId, version + 1 AS v, STARTSWITH(deviceId, 'dev-00001') AS s FROM devices"},
		{small, -7, "SELECT TOP 31 deviceId, tags.location AS loc, version + 1 AS v FROM devices WHERE tags.customer >= 'customer-10'"},
	} {
		h, limit, q := c.h, c.limit, c.q
		if limit < 0 {
			defer func(n int) { rowsChunk = n }(rowsChunk)
			rowsChunk, limit = -limit, 2000
		}
		rec := postQuery(whole, "scale", q)
		var want wire.TwinQuery
		if err := json.Unmarshal(rec.Body.Bytes(), &want); err != nil || rec.Code != http.StatusCreated {
			t.Fatalf("%s, whole: status %d: %s", q, rec.Code, rec.Body)
		}
		items, refs, parts := pagedAnswer(t, h, q, limit)
		if parts < 2 {
			t.Fatalf("%s: %d part, want several (the whole answer is over %d bytes)", q, parts, limit)
		}
		if len(items) != len(want.Status.Items) {
			t.Fatalf("%s: %d items in %d parts, the whole answer has %d", q, len(items), parts, len(want.Status.Items))
		}
		if len(refs) != len(want.Status.Twins) {
			t.Fatalf("%s: %d twins in %d parts, the whole answer has %d", q, len(refs), parts, len(want.Status.Twins))
		}
		for i := range items {
			if items[i] != string(want.Status.Items[i]) {
				t.Fatalf("%s: item %d differs from the whole answer's: %s against %s", q, i, items[i], want.Status.Items[i])
			}
			if i < len(refs) && refs[i] != want.Status.Twins[i] {
				t.Fatalf("%s: the twin of item %d differs from the whole answer's: %v against %v", q, i, refs[i], want.Status.Twins[i])
			}
		}
	}

	// Rows of groups are not paged: over the bound they are refused as
	// before.
	tiny := testHandler(&twinReader{twins: twins}, Options{MaxResponseBytes: 200}, nil)
	rec := postSpec(tiny, "scale", wire.TwinQuerySpec{Query: "SELECT tags.customer AS c, COUNT() AS n FROM devices GROUP BY tags.customer", Paged: true})
	if rec.Code != http.StatusUnprocessableEntity {
		t.Fatalf("GROUP BY, paged: status %d, want 422: %s", rec.Code, rec.Body)
	}
	for _, c := range []struct {
		spec wire.TwinQuerySpec
		want string
	}{
		{wire.TwinQuerySpec{Query: "SELECT * FROM devices", Paged: true, Continue: "not-a-token"}, "is not a continue token this server sent"},
		{wire.TwinQuerySpec{Query: "SELECT * FROM devices", Paged: true, Continue: "eyJ4IjoxfQ"}, "is not a continue token this server sent"},
		{wire.TwinQuerySpec{Query: "SELECT * FROM devices", Continue: pageKey{DeviceID: "a", Left: -1}.token()}, "set spec.paged too"},
		{wire.TwinQuerySpec{Query: "SELECT COUNT() AS n FROM devices", Paged: true, Continue: pageKey{DeviceID: "a", Left: -1}.token()}, "rows are of groups of twins"},
	} {
		rec := postSpec(h, "scale", c.spec)
		if rec.Code != http.StatusBadRequest || !strings.Contains(status(t, rec).Message, c.want) {
			t.Errorf("%+v: status %d, want 400 saying %q: %s", c.spec, rec.Code, c.want, rec.Body)
		}
	}
}

// TestConcurrencyBound: with MaxConcurrentQueries running, another query
// gets 429 with Retry-After; once one ends, queries are answered again.
func TestConcurrencyBound(t *testing.T) {
	r := &twinReader{twins: twinscantest.Fleet(3), block: make(chan struct{}), entered: make(chan struct{}, 2)}
	h := testHandler(r, Options{MaxConcurrentQueries: 2}, nil)
	done := make(chan int, 2)
	for range 2 {
		go func() { done <- postQuery(h, "scale", "SELECT * FROM devices").Code }()
	}
	<-r.entered
	<-r.entered // both hold a slot, blocked in List
	rec := postQuery(h, "scale", "SELECT * FROM devices")
	if rec.Code != http.StatusTooManyRequests || rec.Header().Get("Retry-After") != "1" {
		t.Fatalf("third query: status %d, Retry-After %q: %s", rec.Code, rec.Header().Get("Retry-After"), rec.Body)
	}
	if st := status(t, rec); !strings.Contains(st.Message, "--query-api-max-concurrent-queries") {
		t.Fatalf("refusal %+v", st)
	}
	close(r.block)
	for range 2 {
		if code := <-done; code != http.StatusCreated {
			t.Fatalf("blocked query ended with %d", code)
		}
	}
	r.block = nil
	if rec := postQuery(h, "scale", "SELECT * FROM devices"); rec.Code != http.StatusCreated {
		t.Fatalf("after the others ended: status %d: %s", rec.Code, rec.Body)
	}
}

// TestRequests: what the API refuses and why, and the SubjectAccessReview
// it asks for.
func TestRequests(t *testing.T) {
	var asked []authorizer.Attributes
	allowFleet := func(a authorizer.Attributes) bool {
		asked = append(asked, a)
		return a.GetNamespace() == "scale"
	}
	h := testHandler(&twinReader{twins: twinscantest.Fleet(3)}, Options{}, allowFleet)
	for _, c := range []struct {
		name, ns, q string
		code        int
		say         string
	}{
		{"allowed", "scale", "SELECT * FROM devices", http.StatusCreated, ""},
		{"another namespace", "other", "SELECT * FROM devices", http.StatusForbidden, `User "alice" cannot list resource "devicetwins" in API group "kubetwin.io" in the namespace "other"`},
		{"all namespaces", "", "SELECT * FROM devices", http.StatusForbidden, "at the cluster scope"},
		{"bad query", "scale", "SELECT * FROM devices WHERE", http.StatusBadRequest, "spec.query: line 1, column"},
		{"empty query", "scale", " ", http.StatusBadRequest, "spec.query is missing"},
	} {
		rec := postQuery(h, c.ns, c.q)
		if rec.Code != c.code {
			t.Errorf("%s: status %d, want %d: %s", c.name, rec.Code, c.code, rec.Body)
			continue
		}
		if c.say != "" && !strings.Contains(status(t, rec).Message, c.say) {
			t.Errorf("%s: %s does not say %q", c.name, rec.Body, c.say)
		}
	}
	a := asked[0]
	if a.GetVerb() != "list" || a.GetAPIGroup() != "kubetwin.io" || a.GetResource() != "devicetwins" || a.GetNamespace() != "scale" || !a.IsResourceRequest() {
		t.Fatalf("SubjectAccessReview for %+v", a)
	}

	// An operator watching one namespace refuses others (the cache has
	// no twins there), so that kubectl-twin lists instead.
	h = testHandler(&twinReader{twins: twinscantest.Fleet(3)}, Options{Namespace: "scale"}, nil)
	for _, ns := range []string{"other", ""} {
		rec := postQuery(h, ns, "SELECT * FROM devices")
		if st := status(t, rec); rec.Code != http.StatusNotFound || st.Reason != wire.ReasonNamespaceNotServed {
			t.Errorf("namespace %q: %d %+v", ns, rec.Code, st)
		}
	}

	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/apis/"+wire.GroupVersion+"/namespaces/scale/"+wire.Resource, nil))
	if rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("GET of the collection: %d", rec.Code)
	}
}

// TestShardGroup: an operator watching one namespace serves the API under
// that namespace's group too (its discovery, and queries whose answer
// names that group), and no other shard's group.
func TestShardGroup(t *testing.T) {
	h := testHandler(&twinReader{twins: twinscantest.Fleet(3)}, Options{Namespace: "scale"}, nil)
	shard := wire.GroupVersionOf(wire.ShardGroup("scale"))
	get := func(path string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
		return rec
	}
	rec := get("/apis/" + shard)
	var rl metav1.APIResourceList
	if err := json.Unmarshal(rec.Body.Bytes(), &rl); rec.Code != http.StatusOK || err != nil || rl.GroupVersion != shard ||
		len(rl.APIResources) != 1 || rl.APIResources[0].Name != wire.Resource {
		t.Fatalf("discovery of %s: %d %s", shard, rec.Code, rec.Body)
	}
	for _, p := range []string{"/apis/" + wire.GroupVersionOf(wire.ShardGroup("other")), "/apis/" + wire.ShardGroup("scale") + "/v2"} {
		if rec := get(p); rec.Code != http.StatusNotFound {
			t.Errorf("%s: %d, want 404", p, rec.Code)
		}
	}
	body, _ := json.Marshal(wire.TwinQuery{TypeMeta: metav1.TypeMeta{APIVersion: shard, Kind: wire.Kind}, Spec: wire.TwinQuerySpec{Query: "SELECT * FROM devices"}})
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/apis/"+shard+"/namespaces/scale/"+wire.Resource, bytes.NewReader(body)))
	var tq wire.TwinQuery
	if err := json.Unmarshal(rec.Body.Bytes(), &tq); rec.Code != http.StatusCreated || err != nil || tq.APIVersion != shard || len(tq.Status.Items) != 3 {
		t.Fatalf("query through %s: %d %s", shard, rec.Code, rec.Body)
	}
	// The cluster's group's apiVersion is not the shard's.
	rec = postQuery(h, "scale", "SELECT * FROM devices")
	if rec.Code != http.StatusCreated || !strings.Contains(rec.Body.String(), `"apiVersion":"`+wire.GroupVersion+`"`) {
		t.Errorf("query through %s: %d %s", wire.GroupVersion, rec.Code, rec.Body)
	}
	// An operator of every namespace has no shard group.
	h = testHandler(&twinReader{twins: twinscantest.Fleet(3)}, Options{}, nil)
	if rec := get("/apis/" + shard); rec.Code != http.StatusNotFound {
		t.Errorf("cluster-wide operator, %s: %d, want 404", shard, rec.Code)
	}
}

// BenchmarkAnswer100k: a residual query over 100,000 cached twins, as the
// handler answers it (list, label prefilter, partial documents on every
// core, sort, encode). The twins are made once, before the timer.
func BenchmarkAnswer100k(b *testing.B) {
	twins := twinscantest.Fleet(100000)
	for _, q := range []string{
		"SELECT * FROM devices WHERE properties.reported.telemetry.temperature > 99",
		"SELECT COUNT() AS n FROM devices WHERE properties.reported.telemetry.temperature > 90",
		"SELECT * FROM devices WHERE tags.location.plant = 'Plant-07'",
		// Narrow projections: of every twin, and of ~12% of them.
		"SELECT deviceId, tags.location.plant AS p FROM devices",
		"SELECT deviceId FROM devices WHERE properties.reported.telemetry.temperature > 90",
	} {
		b.Run(q, func(b *testing.B) {
			// As CacheLister: the cached objects themselves.
			lister := func(context.Context, string) ([]*v1alpha1.DeviceTwin, error) { return twins, nil }
			h := testHandler(nil, Options{Twins: lister}, nil)
			for b.Loop() {
				if rec := postQuery(h, "scale", q); rec.Code != http.StatusCreated {
					b.Fatalf("%d: %.300s", rec.Code, rec.Body)
				}
			}
			b.ReportMetric(float64(runtime.GOMAXPROCS(0)), "procs")
		})
	}
}

// TestPagedRowsMemory: a part of a projection over large twins renders
// little more than it sends. The twins are evaluated a chunk at a time,
// each sized to what is left of the bound: one chunk of thousands of
// 20 KB twins would render tens of megabytes for a part of 256 KiB.
func TestPagedRowsMemory(t *testing.T) {
	twins := twinscantest.Fleet(3000)
	big := `{"blob":"` + strings.Repeat("x", 20000) + `"}`
	for _, tw := range twins {
		tw.Status.Reported = &apiextensionsv1.JSON{Raw: []byte(big)}
	}
	const limit = 256 << 10
	lister := func(context.Context, string) ([]*v1alpha1.DeviceTwin, error) { return twins, nil }
	h := testHandler(nil, Options{Twins: lister, MaxResponseBytes: limit}, nil)
	spec := wire.TwinQuerySpec{Query: "SELECT deviceId, properties.reported AS r FROM devices", Paged: true}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	rec := postSpec(h, "scale", spec)
	runtime.ReadMemStats(&after)
	if rec.Code != http.StatusCreated {
		t.Fatalf("status %d: %.300s", rec.Code, rec.Body)
	}
	var tq wire.TwinQuery
	if err := json.Unmarshal(rec.Body.Bytes(), &tq); err != nil || tq.Status.Continue == "" || len(tq.Status.Items) < 5 {
		t.Fatalf("want a first part of several rows and a continue token: %v, %d rows", err, len(tq.Status.Items))
	}
	// Twin lists and sorting aside, a part costs a few times the bound
	// (the rows, the answer, its copy in the recorder).
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 12*limit {
		t.Errorf("a part of %d bytes allocated %d bytes: more than 12 times the bound (%d twins of 20 KB rendered at once?)", rec.Body.Len(), alloc, alloc/20000)
	}
}

// TestGroupRowsMemory: a query of groups over large twins holds the
// documents of a chunk of twins at a time, and is refused as too large
// once its groups hold more than the bound, before it has read the
// fleet. Held whole, the documents and group keys here are hundreds of
// megabytes.
func TestGroupRowsMemory(t *testing.T) {
	twins := twinscantest.Fleet(8000)
	for i, tw := range twins {
		tw.Status.Reported = &apiextensionsv1.JSON{Raw: fmt.Appendf(nil, `{"n":%d,"blob":"%s"}`, i, strings.Repeat("x", 10000))}
	}
	const limit = 1 << 20
	lister := func(context.Context, string) ([]*v1alpha1.DeviceTwin, error) { return twins, nil }
	h := testHandler(nil, Options{Twins: lister, MaxResponseBytes: limit}, nil)
	peak := func(f func()) uint64 {
		var m runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&m)
		base, top := m.HeapAlloc, m.HeapAlloc
		done := make(chan struct{})
		go func() { f(); close(done) }()
		for {
			select {
			case <-done:
				return top - base
			case <-time.After(time.Millisecond):
				runtime.ReadMemStats(&m)
				top = max(top, m.HeapAlloc)
			}
		}
	}
	// Few groups: answered.
	var rec *httptest.ResponseRecorder
	held := peak(func() {
		rec = postQuery(h, "scale", "SELECT tags.deviceType AS t, COUNT() AS n FROM devices GROUP BY tags.deviceType")
	})
	if rec.Code != http.StatusCreated || !strings.Contains(rec.Body.String(), `"n":8000`) {
		t.Fatalf("GROUP BY tags.deviceType: %d %.300s", rec.Code, rec.Body)
	}
	// A group per twin, each keyed by its reported properties: refused,
	// and counted.
	refused := testutil.ToFloat64(responsesTooLarge)
	held2 := peak(func() {
		rec = postQuery(h, "scale", "SELECT COUNT() AS n FROM devices GROUP BY properties.reported")
	})
	if rec.Code != http.StatusUnprocessableEntity || !strings.Contains(rec.Body.String(), "the groups of the answer hold more than") {
		t.Fatalf("GROUP BY properties.reported: %d %.300s", rec.Code, rec.Body)
	}
	if got := testutil.ToFloat64(responsesTooLarge) - refused; got != 1 {
		t.Errorf("kubetwin_queryapi_responses_too_large_total went up by %v, want 1", got)
	}
	t.Logf("heap held: %d and %d bytes", held, held2)
	if held > 64<<20 || held2 > 64<<20 {
		t.Errorf("queries of groups held %d and %d bytes at their peak: more than 64 MiB", held, held2)
	}
}

// BenchmarkPagedFleet100k: SELECT * of 100,000 cached twins in parts of
// the default bound, every part as the handler answers it (what
// kubectl twin query asks for), and a projection of most of every twin
// likewise. bytes/op is the answer's size.
func BenchmarkPagedFleet100k(b *testing.B) {
	twins := twinscantest.Fleet(100000)
	lister := func(context.Context, string) ([]*v1alpha1.DeviceTwin, error) { return twins, nil }
	h := testHandler(nil, Options{Twins: lister}, nil)
	for _, q := range []string{"SELECT * FROM devices", "SELECT deviceId, tags, properties FROM devices"} {
		b.Run(q, func(b *testing.B) {
			var size, parts int
			for b.Loop() {
				size, parts = 0, 0
				for cont := ""; ; {
					rec := postSpec(h, "scale", wire.TwinQuerySpec{Query: q, Paged: true, Continue: cont})
					if rec.Code != http.StatusCreated {
						b.Fatalf("%d: %.300s", rec.Code, rec.Body)
					}
					var tq wire.TwinQuery
					if err := json.Unmarshal(rec.Body.Bytes(), &tq); err != nil {
						b.Fatal(err)
					}
					size += rec.Body.Len()
					parts++
					if cont = tq.Status.Continue; cont == "" {
						break
					}
				}
			}
			b.ReportMetric(float64(size), "bytes")
			b.ReportMetric(float64(parts), "parts")
		})
	}
}

// TestMarshalAnswer: the items put in place decode as json.Marshal's
// whole answer does, also when the query's text holds "items":[] and the
// items hold characters json.Marshal escapes.
func TestMarshalAnswer(t *testing.T) {
	tq := wire.TwinQuery{
		TypeMeta: metav1.TypeMeta{Kind: wire.Kind, APIVersion: wire.GroupVersion},
		Spec:     wire.TwinQuerySpec{Query: `SELECT * FROM devices WHERE tags.x = '"items":[]'`},
		Status: wire.TwinQueryStatus{ItemType: "twin", Items: []json.RawMessage{
			json.RawMessage(`{"deviceId":"a<b>&c","tags":{"items":[]}}`), json.RawMessage(`{"deviceId":"d","n":1.5e3}`)},
			Twins: []wire.TwinRef{{Namespace: "n", Name: "a"}, {Namespace: "n", Name: "d"}}, Evaluated: 2, Continue: "x"},
	}
	for _, c := range []wire.TwinQuery{tq, {Status: wire.TwinQueryStatus{Items: []json.RawMessage{}}}} {
		got, err := marshalAnswer(&c)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := json.Marshal(&c)
		var g, w any
		if err := json.Unmarshal(got, &g); err != nil {
			t.Fatalf("%v: %s", err, got)
		}
		_ = json.Unmarshal(want, &w)
		if !reflect.DeepEqual(g, w) {
			t.Errorf("marshalAnswer gives\n%s\njson.Marshal\n%s", got, want)
		}
	}
}
