package hubapi_test

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubapi"
)

// pagingSeed makes a failing run of the paging tests repeatable:
// go test ./internal/hubapi/ -run TestPaging -paging-seed=N.
var pagingSeed = flag.Uint64("paging-seed", 13, "seed of the randomized paging tests")

// The query shapes of the paging tests: every SELECT form the service API
// answers. "%s" is the WHERE clause ("" or " WHERE ..."), "%d" TOP's n.
var pagingShapes = []struct {
	text string
	top  bool // has a %d for TOP's n
	// perTwin: one row per matching twin (continued by position); else
	// rows of groups (continued by offset, refused once groups change).
	perTwin bool
}{
	{"SELECT * FROM devices%s", false, true},
	{"SELECT TOP %d * FROM devices%s", true, true},
	{"SELECT deviceId FROM devices%s", false, true},
	{"SELECT deviceId, tags.plant AS plant, properties.desired.level FROM devices%s", false, true},
	{"SELECT tags.plant FROM devices%s", false, true}, // rows are {} where undefined
	{"SELECT LastActivityTime, connectionState FROM devices%s", false, true},
	{"SELECT properties.reported.status AS status, tags.n * 2 AS twice FROM devices%s", false, true},
	{"SELECT TOP %d deviceId, tags.n FROM devices%s", true, true},
	{"SELECT COUNT() AS total FROM devices%s", false, false},
	{"SELECT COUNT() AS c, SUM(tags.n) AS s, AVG(tags.n) AS a, MIN(tags.kind) AS lo, MAX(properties.desired.level) AS hi FROM devices%s", false, false},
	{"SELECT tags.plant AS plant, COUNT() AS c FROM devices%s GROUP BY tags.plant", false, false},
	{"SELECT properties.reported.status AS status, COUNT() AS numberOfDevices FROM devices%s GROUP BY properties.reported.status", false, false},
	{"SELECT TOP %d tags.kind, COUNT() AS c, MAX(tags.n) AS m FROM devices%s GROUP BY tags.kind", true, false},
	{"SELECT COUNT() AS c FROM devices%s GROUP BY tags.n", false, false},
}

var pagingWheres = []string{
	"",
	" WHERE tags.plant = 'p1'",
	" WHERE properties.desired.level > 1",
	" WHERE NOT IS_DEFINED(tags.plant)",
	" WHERE tags.plant IN ['p0', 'p2'] OR properties.reported.status = 'Error'",
	" WHERE tags.n % 2 = 0 AND tags.kind != 'a'",
	" WHERE connectionState = 'Connected'",
}

// pagingQuery draws a query: a shape, a WHERE clause and TOP's n.
func pagingQuery(rng *rand.Rand) (text string, perTwin bool) {
	s := pagingShapes[rng.IntN(len(pagingShapes))]
	where := pagingWheres[rng.IntN(len(pagingWheres))]
	if s.top {
		return fmt.Sprintf(s.text, rng.IntN(12), where), s.perTwin
	}
	return fmt.Sprintf(s.text, where), s.perTwin
}

// pagingFleet creates n random twins in devNS, some with reported
// properties and a connection state, and waits until the cache holds them.
func pagingFleet(t *testing.T, rng *rand.Rand, n int) []*v1alpha1.DeviceTwin {
	t.Helper()
	ids := map[string]bool{}
	var twins []*v1alpha1.DeviceTwin
	for len(twins) < n {
		tw := randomTwin(rng, fmt.Sprintf("pg-%d", len(twins)))
		if ids[tw.Spec.DeviceID] {
			continue
		}
		ids[tw.Spec.DeviceID] = true
		createRandomTwin(t, rng, tw)
		twins = append(twins, tw)
	}
	return twins
}

// randomTwin returns a twin named name with a random device id, tags and
// desired properties. Values mix types (tags.kind is a string or a
// number) and are sometimes missing, so that rows and groups do too.
func randomTwin(rng *rand.Rand, name string) *v1alpha1.DeviceTwin {
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: devNS, Name: name}}
	// Ids in an order unrelated to names, some sharing a prefix.
	tw.Spec.DeviceID = fmt.Sprintf("%c%c-%02d", "Dd-x"[rng.IntN(4)], "ab"[rng.IntN(2)], rng.IntN(100))
	tags := map[string]any{"n": rng.IntN(5)}
	if p := rng.IntN(4); p < 3 {
		tags["plant"] = fmt.Sprintf("p%d", p)
	}
	switch rng.IntN(3) {
	case 0:
		tags["kind"] = "a"
	case 1:
		tags["kind"] = "b"
	default:
		tags["kind"] = rng.IntN(3)
	}
	tw.Spec.Tags = rawObject(tags)
	if rng.IntN(4) > 0 {
		tw.Spec.Desired = rawObject(map[string]any{"level": rng.IntN(4)})
	}
	return tw
}

// createRandomTwin creates tw, gives some twins a status (reported
// properties, connection state, last activity), and waits for the cache.
func createRandomTwin(t *testing.T, rng *rand.Rand, tw *v1alpha1.DeviceTwin) {
	t.Helper()
	ctx := context.Background()
	if err := k8s.Create(ctx, tw); err != nil {
		t.Fatalf("creating twin %s: %v", tw.Name, err)
	}
	if rng.IntN(3) > 0 {
		statuses := []string{"Pending", "Error", "Success"}
		tw.Status.Reported = rawObject(map[string]any{"status": statuses[rng.IntN(len(statuses))]})
		tw.Status.ConnectionState = v1alpha1.ConnectionStateConnected
		if rng.IntN(2) == 0 {
			tw.Status.ConnectionState = v1alpha1.ConnectionStateDisconnected
		}
		at := metav1.NewTime(time.Date(2026, 1, 1, 0, rng.IntN(60), 0, 0, time.UTC))
		tw.Status.LastActivityTime = &at
		if err := k8s.Status().Update(ctx, tw); err != nil {
			t.Fatalf("status of twin %s: %v", tw.Name, err)
		}
	}
	waitCached(t, tw)
}

func rawObject(m map[string]any) *apiextensionsv1.JSON {
	b, _ := json.Marshal(m)
	return &apiextensionsv1.JSON{Raw: b}
}

// queryReq sends one query request: page size size (0: none), token tok.
func queryReq(t *testing.T, text string, size int, tok string) response {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"query": text})
	hdr := map[string]string{}
	if size > 0 {
		hdr["x-ms-max-item-count"] = fmt.Sprint(size)
	}
	if tok != "" {
		hdr["x-ms-continuation"] = tok
	}
	return call(t, http.MethodPost, "/devices/query", hdr, body)
}

// continuationOf returns the reply's continuation token ("" for none),
// failing on a present but empty or repeated header.
func continuationOf(t *testing.T, r response) string {
	t.Helper()
	vals := r.header.Values("x-ms-continuation")
	if len(vals) > 1 || (len(vals) == 1 && vals[0] == "") {
		t.Fatalf("x-ms-continuation %q: want one non-empty token or none", vals)
	}
	if len(vals) == 0 {
		return ""
	}
	return vals[0]
}

// rawItems decodes a reply's items as JSON texts, so that rows compare
// exactly (numbers included).
func rawItems(t *testing.T, r response) []string {
	t.Helper()
	var items []json.RawMessage
	if err := json.Unmarshal(r.body, &items); err != nil {
		t.Fatalf("reply is not a JSON array: %v: %s", err, r.body)
	}
	out := make([]string, len(items))
	for i, it := range items {
		var b bytes.Buffer
		if err := json.Compact(&b, it); err != nil {
			t.Fatal(err)
		}
		out[i] = b.String()
	}
	return out
}

// readPaged reads a query page by page at page size size and returns the
// concatenated items. Every page but the last must be full, and the pages
// must end: more pages than rows+1 is a loop.
func readPaged(t *testing.T, what, text string, size, maxPages int) []string {
	t.Helper()
	return readPages(t, what, text, size, maxPages, false, func(tok string) response { return queryReq(t, text, size, tok) })
}

// readPages reads pages with send(token) until a reply has no token. With
// short, a page may end before size items (a byte limit), but not empty.
func readPages(t *testing.T, what, text string, size, maxPages int, short bool, send func(tok string) response) []string {
	t.Helper()
	var all []string
	tok := ""
	itemType := ""
	for pages := 1; ; pages++ {
		if pages > maxPages {
			t.Fatalf("%s: %q in pages of %d: still a continuation after %d pages (rows so far %d): paging does not end",
				what, text, size, maxPages, len(all))
		}
		r := send(tok).expect(t, http.StatusOK)
		items := rawItems(t, r)
		next := continuationOf(t, r)
		if it := r.header.Get("x-ms-item-type"); pages == 1 {
			itemType = it
		} else if it != itemType {
			t.Fatalf("%s: %q: page %d has x-ms-item-type %q, page 1 %q", what, text, pages, it, itemType)
		}
		full := len(items) == size || (short && len(items) > 0)
		if len(items) > size || (next != "" && !full) {
			t.Fatalf("%s: %q in pages of %d: page %d has %d items, continuation %q", what, text, size, pages, len(items), next)
		}
		all = append(all, items...)
		if next == "" {
			return all
		}
		if next == tok {
			t.Fatalf("%s: %q in pages of %d: page %d returned the token it was sent", what, text, size, pages)
		}
		tok = next
	}
}

// TestPagingEveryShape: for random fleets and random queries of every
// shape (SELECT *, projections, aggregates, GROUP BY, TOP, with and
// without WHERE), reading the query through POST /devices/query at every
// page size from 1 to rows+1 returns exactly the unpaged answer. kubetwin
// documents the rows' order (device id; groups by their first twin), so
// the concatenation must equal it in order, not only as a multiset.
func TestPagingEveryShape(t *testing.T) {
	seed := *pagingSeed
	rng := rand.New(rand.NewPCG(seed, 0x13))
	deadline := time.Now().Add(40 * time.Second)
	// About one twin a page: most pages of SELECT * end at the byte limit.
	const smallBytes = 700
	small, err := newHandler(hubapi.Options{MaxQueryPageBytes: smallBytes})
	if err != nil {
		t.Fatal(err)
	}
	queries := 0
	for _, n := range []int{0, 1, 2, 5, 9, 14, 20} {
		reset(t)
		pagingFleet(t, rng, n)
		// Every twin of the fleet is a device the queries see.
		r := queryReq(t, "SELECT COUNT() AS total FROM devices", 0, "").expect(t, http.StatusOK)
		valueEqual(t, "devices in the fleet", r.array(t), fmt.Sprintf(`[{"total":%d}]`, n))
		for range 40 {
			if time.Now().After(deadline) {
				t.Fatalf("seed %d: over 40 s after %d queries: the test is too slow for CI", seed, queries)
			}
			text, _ := pagingQuery(rng)
			what := fmt.Sprintf("seed %d, fleet of %d", seed, n)
			r := queryReq(t, text, 1000, "").expect(t, http.StatusOK)
			if tok := continuationOf(t, r); tok != "" {
				t.Fatalf("%s: %q: one page of 1000 has a continuation", what, text)
			}
			want := rawItems(t, r)
			for size := 1; size <= len(want)+1; size++ {
				got := readPaged(t, what, text, size, len(want)+1)
				if !slices.Equal(got, want) {
					t.Fatalf("%s: %q in pages of %d (%s):\n got %v\nwant %v", what, text, size, sameRows(got, want), got, want)
				}
			}
			// The same through a handler whose byte limit ends pages early.
			size := 1 + rng.IntN(len(want)+1)
			body, _ := json.Marshal(map[string]string{"query": text})
			got := readPages(t, what+", byte limit", text, size, len(want)+1, true, func(tok string) response {
				hdr := map[string]string{"x-ms-max-item-count": fmt.Sprint(size)}
				if tok != "" {
					hdr["x-ms-continuation"] = tok
				}
				return serve(t, small, http.MethodPost, "/devices/query", hdr, string(body))
			})
			if !slices.Equal(got, want) {
				t.Fatalf("%s: %q in pages of %d and at most %d bytes (%s):\n got %v\nwant %v",
					what, text, size, smallBytes, sameRows(got, want), got, want)
			}
			queries++
		}
	}
	t.Logf("seed %d: %d queries read at every page size", seed, queries)
}

// TestPagingTokens: a continuation token that cannot be honoured gets
// 400 ArgumentInvalid naming the header, never a page: a malformed one,
// one of another query, one of another kind of query, one whose GROUP BY
// groups have changed since it was issued.
func TestPagingTokens(t *testing.T) {
	reset(t)
	rng := rand.New(rand.NewPCG(*pagingSeed, 0x7))
	pagingFleet(t, rng, 6)
	const notOurs = "x-ms-continuation: not a continuation token of this query: send back the token of the previous page's reply with the same query"
	tokenOf := func(text string) string {
		t.Helper()
		tok := continuationOf(t, queryReq(t, text, 1, "").expect(t, http.StatusOK))
		if tok == "" {
			t.Fatalf("%q: no continuation at page size 1", text)
		}
		return tok
	}
	star := tokenOf("SELECT * FROM devices")
	proj := tokenOf("SELECT deviceId FROM devices")
	grouped := tokenOf("SELECT COUNT() AS c FROM devices GROUP BY deviceId")
	for _, tc := range []struct{ query, tok string }{
		{"SELECT * FROM devices", "garbage!"},
		{"SELECT * FROM devices", "eyJ2IjoyfQ"}, // {"v":2}
		{"SELECT * FROM devices", proj},
		{"SELECT deviceId FROM devices", star},
		{"SELECT deviceId FROM devices WHERE tags.n >= 0", proj},
		{"SELECT COUNT() AS c FROM devices GROUP BY tags.n", grouped},
		{"SELECT COUNT() AS total FROM devices", grouped},
		{"SELECT * FROM devices", star + "x"},
		{"SELECT * FROM devices", star[:len(star)-2]},
	} {
		queryReq(t, tc.query, 1, tc.tok).expectError(t, http.StatusBadRequest, "ArgumentInvalid", notOurs)
	}
	// The same query in other words is the same query.
	queryReq(t, "select   deviceid from DEVICES", 1, proj).expect(t, http.StatusOK)
}

// TestPagingWhileFleetChanges: twins created and deleted between pages.
// Where rows are twins, paging goes on from the last twin returned: no
// row comes twice, and every twin that was there throughout comes once.
// Where rows are groups, a token issued before the groups it skips
// changed is refused (400) rather than skip or repeat a group, and one
// whose groups are unchanged goes on.
func TestPagingWhileFleetChanges(t *testing.T) {
	seed := *pagingSeed
	rng := rand.New(rand.NewPCG(seed, 0x5))
	perTwinQueries := []string{
		"SELECT * FROM devices",
		"SELECT deviceId, tags.plant FROM devices",
		"SELECT deviceId FROM devices WHERE tags.n >= 0",
	}
	for round := range 6 {
		reset(t)
		fleet := pagingFleet(t, rng, 10)
		text := perTwinQueries[round%len(perTwinQueries)]
		size := 1 + rng.IntN(3)
		what := fmt.Sprintf("seed %d, round %d: %q in pages of %d", seed, round, text, size)
		present := map[string]bool{} // ids there throughout
		for _, tw := range fleet {
			present[tw.Spec.DeviceID] = true
		}
		seen := map[string]int{}
		tok := ""
		for pages := 1; ; pages++ {
			if pages > 40 {
				t.Fatalf("%s: paging does not end", what)
			}
			r := queryReq(t, text, size, tok).expect(t, http.StatusOK)
			for _, it := range r.array(t) {
				seen[fmt.Sprint(it["deviceId"])]++
			}
			if tok = continuationOf(t, r); tok == "" {
				break
			}
			// Between pages: a new twin anywhere in id order, and one twin
			// of the fleet deleted (returned already or not).
			nt := randomTwin(rng, fmt.Sprintf("pg-new-%d", pages))
			if _, taken := present[nt.Spec.DeviceID]; !taken && seen[nt.Spec.DeviceID] == 0 && !existsID(t, nt.Spec.DeviceID) {
				createRandomTwin(t, rng, nt)
			}
			if len(fleet) > 0 {
				i := rng.IntN(len(fleet))
				deleteTwin(t, fleet[i])
				delete(present, fleet[i].Spec.DeviceID)
				fleet = slices.Delete(fleet, i, i+1)
			}
		}
		for id, n := range seen {
			if n > 1 {
				t.Errorf("%s: %s came %d times", what, id, n)
			}
		}
		for id := range present {
			if seen[id] != 1 {
				t.Errorf("%s: %s, there throughout, came %d times", what, id, seen[id])
			}
		}
	}

	// Rows of groups. Groups come in the order of their first twin.
	reset(t)
	newTwin(t, devNS, "g-b", "b-1", `{"plant":"p1"}`, "")
	newTwin(t, devNS, "g-c", "c-1", `{"plant":"p2"}`, "")
	newTwin(t, devNS, "g-d", "d-1", `{"plant":"p3"}`, "")
	const grouped = "SELECT tags.plant AS plant, COUNT() AS c FROM devices GROUP BY tags.plant"
	r := queryReq(t, grouped, 1, "").expect(t, http.StatusOK)
	valueEqual(t, "first group", r.array(t), `[{"c":1,"plant":"p1"}]`)
	tok := continuationOf(t, r)
	// A twin joining a group, and a new group after the others: the groups
	// before the token are unchanged, so it is honoured.
	newTwin(t, devNS, "g-b2", "b-2", `{"plant":"p1"}`, "")
	newTwin(t, devNS, "g-e", "e-1", `{"plant":"p4"}`, "")
	r = queryReq(t, grouped, 2, tok).expect(t, http.StatusOK)
	valueEqual(t, "next groups", r.array(t), `[{"c":1,"plant":"p2"},{"c":1,"plant":"p3"}]`)
	tok = continuationOf(t, r)
	// A new first group shifts every group: the token is refused.
	newTwin(t, devNS, "g-a", "a-1", `{"plant":"p0"}`, "")
	queryReq(t, grouped, 2, tok).expectError(t, http.StatusBadRequest, "ArgumentInvalid",
		"x-ms-continuation: the groups of this query have changed since the previous page "+
			"(a twin joined, left or changed group): run the query again from the first page")
	// From the first page the query reads every group once.
	if got := readPaged(t, "groups", grouped, 1, 6); len(got) != 5 {
		t.Errorf("groups in pages of 1: %v", got)
	}
}

// sameRows says whether got and want hold the same rows in another order
// (paging broke only the order) or different rows.
func sameRows(got, want []string) string {
	g, w := slices.Clone(got), slices.Clone(want)
	slices.Sort(g)
	slices.Sort(w)
	if slices.Equal(g, w) {
		return "the same rows in another order"
	}
	return "different rows"
}

// existsID reports whether the cache holds a twin with device id id.
func existsID(t *testing.T, id string) bool {
	t.Helper()
	var list v1alpha1.DeviceTwinList
	if err := mgr.GetClient().List(context.Background(), &list); err != nil {
		t.Fatal(err)
	}
	return slices.ContainsFunc(list.Items, func(tw v1alpha1.DeviceTwin) bool { return tw.EffectiveDeviceID() == id })
}

// deleteTwin deletes tw and waits until the cache no longer holds it.
func deleteTwin(t *testing.T, tw *v1alpha1.DeviceTwin) {
	t.Helper()
	ctx := context.Background()
	if err := k8s.Delete(ctx, tw); err != nil && !apierrors.IsNotFound(err) {
		t.Fatalf("deleting twin %s: %v", tw.Name, err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := mgr.GetClient().Get(ctx, client.ObjectKeyFromObject(tw), &v1alpha1.DeviceTwin{})
		if apierrors.IsNotFound(err) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the cache still holds twin %s (%v)", tw.Name, err)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
