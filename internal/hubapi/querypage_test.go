package hubapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/internal/twinscan"
	"github.com/kubetwin/kubetwin/internal/twinscan/twinscantest"
)

// TestQueryPagesEqualFullRun: reading a query page by page through
// runQuery (SELECT * and projections, with or without TOP, from the
// matches after the continuation point; groups from the whole result,
// computed a chunk of twins at a time) gives exactly
// what running it over the documents of every device at once gives, for
// random fleets, conditions and page sizes. Some twins want an id another
// twin holds, and some are being deleted: neither is a device.
func TestQueryPagesEqualFullRun(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	conditions := []string{
		"",
		" WHERE tags.plant = 'p1'",
		" WHERE tags.plant != 'p1' AND properties.desired.level > 2",
		" WHERE NOT IS_DEFINED(tags.plant)",
		" WHERE STARTSWITH(deviceId, 'D')",
		" WHERE tags.plant IN ['p0', 'p2'] OR properties.desired.level = 0",
	}
	selects := []string{
		"SELECT * FROM devices",
		"SELECT deviceId, tags.plant AS plant FROM devices",
		"SELECT properties.desired FROM devices",
		"SELECT TOP 5 * FROM devices",
		"SELECT TOP 3 deviceId FROM devices",
		"SELECT TOP 11 deviceId, properties.desired AS d FROM devices",
		"SELECT TOP 0 deviceId FROM devices",
	}
	groups := []string{
		"SELECT tags.plant, COUNT() AS n FROM devices",
		"SELECT MAX(properties.desired.level) AS highest FROM devices",
	}
	for round := range 300 {
		n := rng.IntN(40)
		var twins []*v1alpha1.DeviceTwin
		holders := map[string]*v1alpha1.DeviceTwin{}
		for i := range n {
			tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{
				Namespace: "ns", Name: fmt.Sprintf("t%d", i), UID: types.UID(fmt.Sprint(i))}}
			// Ids in an order unrelated to names, some sharing a prefix,
			// some wanted by more than one twin.
			tw.Spec.DeviceID = fmt.Sprintf("%c-%02d", "Dd-x"[rng.IntN(4)], rng.IntN(30))
			tags := `{}`
			if p := rng.IntN(4); p < 3 {
				tags = fmt.Sprintf(`{"plant":"p%d"}`, p)
			}
			tw.Spec.Tags = &apiextensionsv1.JSON{Raw: []byte(tags)}
			tw.Spec.Desired = &apiextensionsv1.JSON{Raw: fmt.Appendf(nil, `{"level":%d}`, rng.IntN(5))}
			// Most reconciled, their tags mirrored into labels; the others'
			// labels are stale (the label selector must not hide them).
			tw.Generation = 1
			if rng.IntN(4) > 0 {
				tg, _ := twin.DecodeRaw([]byte(tags))
				tw.Labels = twin.MirrorLabels(tg)
				tw.Status.ObservedGeneration = 1
			} else {
				tw.Labels = map[string]string{"plant": "p9"}
			}
			if rng.IntN(10) == 0 {
				tw.DeletionTimestamp = &metav1.Time{Time: time.Unix(1, 0)}
			}
			if _, held := holders[tw.Spec.DeviceID]; !held && rng.IntN(5) > 0 {
				holders[tw.Spec.DeviceID] = tw
			}
			twins = append(twins, tw)
		}
		h := &Handler{opts: Options{
			Namespace: "ns",
			Twins: func(context.Context, string) ([]*v1alpha1.DeviceTwin, error) {
				return slices.Clone(twins), nil
			},
			Resolve: func(_ context.Context, id string) (*v1alpha1.DeviceTwin, error) {
				if t := holders[id]; t != nil {
					return t, nil
				}
				return nil, deviceid.ErrNotFound
			},
		}}
		var docs []map[string]any
		for _, tw := range twins {
			if holders[tw.Spec.DeviceID] == tw && tw.DeletionTimestamp == nil {
				docs = append(docs, hubtwin.FromDeviceTwin(tw))
			}
		}

		text := selects[rng.IntN(len(selects))] + conditions[rng.IntN(len(conditions))]
		if round%5 == 4 {
			text = groups[rng.IntN(len(groups))] + conditions[rng.IntN(len(conditions))]
			if strings.Contains(text, "tags.plant,") {
				text += " GROUP BY tags.plant"
			}
		}
		q, err := query.Parse(text)
		if err != nil {
			t.Fatalf("%s: %v", text, err)
		}
		full, _ := q.Run(docs)
		want := mustJSONItems(t, full.Items)

		size := 1 + rng.IntN(7)
		// Every other round, a byte limit that cuts some pages short.
		maxBytes := DefaultMaxQueryPageBytes
		if round%2 == 1 {
			maxBytes = 1 + rng.IntN(1200)
		}
		// Pages from the twins listed, and from an Order of them (with a
		// twin of another namespace, which it leaves out).
		order := twinscan.NewOrder("ns")
		for _, tw := range twins {
			order.Set(nil, tw)
		}
		order.Set(nil, &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "other", Name: "t0"}})
		for _, ordered := range []bool{false, true} {
			h.opts.Order = nil
			if ordered {
				h.opts.Order = func(context.Context) (*twinscan.Order, error) { return order, nil }
			}
			got := readPages(t, h, q, size, maxBytes, len(twins))
			if !slices.Equal(got, want) {
				t.Fatalf("round %d: %q in pages of %d (ordered %v):\n got %v\nwant %v", round, text, size, ordered, got, want)
			}
		}
	}
}

// readPages reads q through h.runQuery in pages of size items and
// maxBytes, checking each page's size and token, and returns the items.
func readPages(t *testing.T, h *Handler, q *query.Query, size, maxBytes, twins int) []string {
	t.Helper()
	hash := queryHash(q)
	var got []string
	var from *continuation
	for pages := 0; ; pages++ {
		if pages > twins+1 {
			t.Fatalf("%q: more pages than twins", q)
		}
		p := newPage(size, maxBytes)
		next, err := h.runQuery(context.Background(), q, hash, from, p)
		if err != nil {
			t.Fatal(err)
		}
		var items []json.RawMessage
		if err := json.Unmarshal(p.body(), &items); err != nil {
			t.Fatalf("%q: page body: %v", q, err)
		}
		full := len(items) == size || p.cut
		if len(items) > size || (next != "" && !full) || (next == "" && p.cut) {
			t.Fatalf("%q size %d: page of %d items (cut %v), next %q", q, size, len(items), p.cut, next)
		}
		if len(items) > 1 && len(p.body()) > maxBytes {
			t.Fatalf("%q: a page of %d items is %d bytes, over the %d allowed", q, len(items), len(p.body()), maxBytes)
		}
		for _, it := range items {
			got = append(got, string(it))
		}
		if next == "" {
			return got
		}
		_, top := q.Top()
		if from, err = decodeContinuation(next, hash, q.PerTwin(), top); err != nil {
			t.Fatalf("%q: token %q: %v", q, next, err)
		}
	}
}

// mustJSONItems encodes items as pages do.
func mustJSONItems(t *testing.T, items []map[string]any) []string {
	p := newPage(len(items)+1, 1<<30)
	var out []string
	for _, it := range items {
		p.item.Reset()
		if err := p.enc.Encode(it); err != nil {
			t.Fatal(err)
		}
		out = append(out, strings.TrimSuffix(p.item.String(), "\n"))
	}
	return out
}

// TestInOrder: reading any number of elements through inOrder gives the
// smallest ones in order, for any batch size; reading all gives a sort.
func TestInOrder(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 5))
	for range 2000 {
		n := rng.IntN(300)
		s := rng.Perm(n)
		want := slices.Sorted(slices.Values(s))
		read := rng.IntN(n + 2)
		var got []int
		for v := range inOrder(s, func(a, b int) int { return a - b }, rng.IntN(20)) {
			if len(got) == read {
				break
			}
			got = append(got, v)
		}
		if !slices.Equal(got, want[:min(read, n)]) {
			t.Fatalf("n %d, read %d: got %v, want %v", n, read, got, want[:min(read, n)])
		}
	}
}

// TestGroupStart: a GROUP BY token is honoured only while the groups
// before its offset are the same; a token naming rows that do not exist,
// e.g. one forged for an aggregate without GROUP BY (one row, no group
// keys), is stale, not a panic.
func TestGroupStart(t *testing.T) {
	keys := []string{`"a"`, `"b"`, "u", "n1;"}
	tok := func(offset int, prefix []string) *continuation {
		return &continuation{V: continuationVersion, Query: "q", Offset: offset, Groups: groupsHash(prefix)}
	}
	if i, err := groupStart(tok(2, keys[:2]), keys); err != nil || i != 2 {
		t.Errorf("unchanged groups: %d, %v", i, err)
	}
	if i, err := groupStart(tok(4, keys), keys); err != nil || i != 4 {
		t.Errorf("at the end: %d, %v", i, err)
	}
	for name, c := range map[string]*continuation{
		"a group before it changed": tok(2, []string{`"a"`, `"c"`}),
		"groups reordered":          tok(2, []string{`"b"`, `"a"`}),
		"past the last group":       tok(5, append(keys, "x")),
		"no groups at all":          tok(1, []string{"u"}),
	} {
		k := keys
		if name == "no groups at all" {
			k = nil
		}
		if _, err := groupStart(c, k); !errors.Is(err, errStaleContinuation) {
			t.Errorf("%s: %v, want errStaleContinuation", name, err)
		}
	}
	// Length-prefixed: keys that concatenate alike still differ.
	if groupsHash([]string{"ab", "c"}) == groupsHash([]string{"a", "bc"}) {
		t.Error("groupsHash confuses [ab c] with [a bc]")
	}
}

// BenchmarkQueryPage: one page of 100 from the middle of a 100,000-twin
// fleet (twinscantest.Fleet), through runQuery, with the twins' device
// ids resolved from a map (the cache's lookups cost more): from the twins
// listed (scan) and from an Order of them (ordered).
func BenchmarkQueryPage(b *testing.B) {
	twins := twinscantest.Fleet(100000)
	holders := map[string]*v1alpha1.DeviceTwin{}
	for i, tw := range twins {
		tw.UID = types.UID(fmt.Sprint(i))
		tw.Spec.DeviceID = tw.Name
		holders[tw.Name] = tw
	}
	h := &Handler{opts: Options{
		Namespace: "scale",
		Twins: func(context.Context, string) ([]*v1alpha1.DeviceTwin, error) {
			return slices.Clone(twins), nil
		},
		Resolve: func(_ context.Context, id string) (*v1alpha1.DeviceTwin, error) { return holders[id], nil },
	}}
	order := twinscan.NewOrder("scale")
	for _, tw := range twins {
		order.Set(nil, tw)
	}
	for _, text := range []string{
		"SELECT * FROM devices",
		"SELECT * FROM devices WHERE tags.location.plant = 'Plant-07'",
		"SELECT * FROM devices WHERE properties.reported.telemetry.temperature > 90",
		"SELECT deviceId, properties.reported.telemetry.temperature FROM devices",
	} {
		q, err := query.Parse(text)
		if err != nil {
			b.Fatal(err)
		}
		from := &continuation{After: &twinKey{ID: "dev-050000", Namespace: "scale", Name: "dev-050000"}}
		for _, ordered := range []bool{false, true} {
			name := "scan/" + text
			h.opts.Order = nil
			if ordered {
				name = "ordered/" + text
				h.opts.Order = func(context.Context) (*twinscan.Order, error) { return order, nil }
			}
			b.Run(name, func(b *testing.B) {
				for b.Loop() {
					if _, err := h.runQuery(context.Background(), q, "h", from, newPage(100, DefaultMaxQueryPageBytes)); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

// TestQueryGroupsBound: a query of groups whose groups hold more than the
// bound (8 pages, at least 1 MiB) is refused with a 400 that says so and
// what to do, and counted; one of few groups over the same twins is
// answered. The twins are read a chunk at a time.
func TestQueryGroupsBound(t *testing.T) {
	var twins []*v1alpha1.DeviceTwin
	for i := range 300 {
		tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: fmt.Sprintf("t%03d", i)}}
		tw.Spec.DeviceID = tw.Name
		tw.Spec.Tags = &apiextensionsv1.JSON{Raw: fmt.Appendf(nil, `{"i":%d,"kind":"k%d","blob":"%s"}`, i, i%3, strings.Repeat("x", 10000))}
		twins = append(twins, tw)
	}
	h := &Handler{opts: Options{
		Namespace: "ns",
		Twins:     func(context.Context, string) ([]*v1alpha1.DeviceTwin, error) { return slices.Clone(twins), nil },
		Resolve: func(_ context.Context, id string) (*v1alpha1.DeviceTwin, error) {
			return twins[slices.IndexFunc(twins, func(t *v1alpha1.DeviceTwin) bool { return t.Spec.DeviceID == id })], nil
		},
	}}
	few, _ := query.Parse("SELECT tags.kind AS kind, COUNT() AS n FROM devices GROUP BY tags.kind")
	if got := readPages(t, h, few, 10, DefaultMaxQueryPageBytes, len(twins)); len(got) != 3 || !strings.Contains(got[0], `"n":100`) {
		t.Errorf("GROUP BY tags.kind: %v", got)
	}
	many, _ := query.Parse("SELECT COUNT() AS n FROM devices GROUP BY tags")
	before := testutil.ToFloat64(queriesTooLarge)
	_, err := h.runQuery(context.Background(), many, queryHash(many), nil, newPage(10, 1000))
	if !errors.Is(err, errGroupsTooLarge) || !strings.Contains(err.Error(), "more than 1048576 bytes") {
		t.Fatalf("GROUP BY tags over 3 MB of tags: %v", err)
	}
	h.queries = make(chan struct{}, 1)
	h.opts.MaxBodyBytes, h.opts.MaxQueryPageBytes = 1<<16, 1000
	req := &request{w: httptest.NewRecorder(), r: httptest.NewRequest(http.MethodPost, "/devices/query",
		strings.NewReader(`{"query": "SELECT COUNT() AS n FROM devices GROUP BY tags"}`))}
	rep, aerr := h.query(context.Background(), req)
	if req.release != nil {
		req.release()
	}
	if aerr == nil || aerr.status != http.StatusBadRequest || !strings.Contains(aerr.msg, "narrow the query") {
		t.Fatalf("the service API answers %+v, %+v", rep, aerr)
	}
	if got := testutil.ToFloat64(queriesTooLarge) - before; got != 1 {
		t.Errorf("kubetwin_service_queries_too_large_total went up by %v, want 1", got)
	}
}
