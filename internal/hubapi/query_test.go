package hubapi_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// queryPages runs a query page by page and returns every page's items and
// the continuation header of every reply.
func queryPages(t *testing.T, q string, size int) (pages [][]map[string]any, tokens []string) {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"query": q})
	tok := ""
	for range 20 {
		hdr := map[string]string{"x-ms-max-item-count": fmt.Sprint(size)}
		if tok != "" {
			hdr["x-ms-continuation"] = tok
		}
		r := call(t, http.MethodPost, "/devices/query", hdr, body).expect(t, http.StatusOK)
		pages = append(pages, r.array(t))
		vals := r.header.Values("x-ms-continuation")
		if len(vals) == 0 {
			tokens = append(tokens, "")
			return pages, tokens
		}
		if len(vals) != 1 || vals[0] == "" {
			t.Fatalf("x-ms-continuation %q", vals)
		}
		tok = vals[0]
		tokens = append(tokens, tok)
	}
	t.Fatal("more than 20 pages")
	return nil, nil
}

func TestQueryPaging(t *testing.T) {
	reset(t)
	ctx := context.Background()
	// Created out of order; one more in a namespace the API does not serve.
	for _, i := range []int{4, 0, 6, 2, 5, 1, 3} {
		newTwin(t, devNS, fmt.Sprintf("paging-%d", i), fmt.Sprintf("paging-%d", i), `{"fleet":"paging","n":`+fmt.Sprint(i)+`}`, "")
	}
	newTwin(t, otherNS, "paging-far", "paging-far", `{"fleet":"paging","n":7}`, "")
	// One twin the operator has reconciled: it carries the mirrored label,
	// so the label selector finds it; another one reconciled without a
	// matching label (its tags say otherwise) is skipped.
	tw := getTwinObject(t, devNS, "paging-2")
	tw.Labels = map[string]string{"fleet": "paging", "n": "2"}
	if err := k8s.Update(ctx, tw); err != nil {
		t.Fatal(err)
	}
	tw.Status.ObservedGeneration = tw.Generation
	if err := k8s.Status().Update(ctx, tw); err != nil {
		t.Fatal(err)
	}
	waitCached(t, tw)
	other := newTwin(t, devNS, "paging-other", "paging-other", `{"fleet":"other"}`, "")
	other.Status.ObservedGeneration = other.Generation
	if err := k8s.Status().Update(ctx, other); err != nil {
		t.Fatal(err)
	}
	waitCached(t, other)

	// A second twin claiming paging-3 is not a device of its own: the
	// query shows the twin that owns the id, as GET /twins does.
	newTwin(t, devNS, "paging-dup", "paging-3", `{"fleet":"paging","n":99}`, "")

	q := "SELECT * FROM devices WHERE tags.fleet = 'paging'"
	pages, tokens := queryPages(t, q, 3)
	if len(pages) != 3 || len(pages[0]) != 3 || len(pages[1]) != 3 || len(pages[2]) != 1 {
		t.Fatalf("page sizes: %d pages %v", len(pages), pages)
	}
	if tokens[0] == "" || tokens[1] == "" || tokens[2] != "" {
		t.Errorf("continuation tokens %q: want one on every page but the last", tokens)
	}
	var ids []string
	for _, p := range pages {
		for _, it := range p {
			ids = append(ids, it["deviceId"].(string))
			if _, ok := it["properties"]; !ok {
				t.Errorf("item is not a twin: %v", it)
			}
		}
	}
	if got := strings.Join(ids, ","); got != "paging-0,paging-1,paging-2,paging-3,paging-4,paging-5,paging-6" {
		t.Errorf("devices %s", got)
	}
	owner := call(t, http.MethodGet, "/twins/paging-3", nil, nil).expect(t, http.StatusOK).object(t)
	valueEqual(t, "tags of paging-3 in the query", pages[1][0]["tags"], mustJSON(owner["tags"]))

	// Item types.
	body := func(q string) string { b, _ := json.Marshal(map[string]string{"query": q}); return string(b) }
	r := call(t, http.MethodPost, "/devices/query", nil, body(q)).expect(t, http.StatusOK)
	if r.header.Get("x-ms-item-type") != "twin" || len(r.array(t)) != 7 || len(r.header.Values("x-ms-continuation")) != 0 {
		t.Errorf("one page of 7: item type %q, %d items, continuation %q", r.header.Get("x-ms-item-type"), len(r.array(t)), r.header.Values("x-ms-continuation"))
	}
	rawQ := "SELECT deviceId, tags.n AS n FROM devices WHERE tags.fleet = 'paging'"
	pages, tokens = queryPages(t, rawQ, 5)
	if len(pages) != 2 || len(pages[0]) != 5 || len(pages[1]) != 2 || tokens[1] != "" {
		t.Fatalf("raw pages %v, tokens %q", pages, tokens)
	}
	valueEqual(t, "last row", pages[1][1], `{"deviceId":"paging-6","n":6}`)
	r = call(t, http.MethodPost, "/devices/query", nil, body(rawQ)).expect(t, http.StatusOK)
	if r.header.Get("x-ms-item-type") != "raw" {
		t.Errorf("x-ms-item-type %q, want raw", r.header.Get("x-ms-item-type"))
	}
	r = call(t, http.MethodPost, "/devices/query", nil, body("SELECT COUNT() AS total FROM devices WHERE tags.fleet = 'paging'")).expect(t, http.StatusOK)
	valueEqual(t, "count", r.array(t), `[{"total":7}]`)
	r = call(t, http.MethodPost, "/devices/query", nil, body("SELECT TOP 4 * FROM devices WHERE tags.fleet = 'paging'")).expect(t, http.StatusOK)
	if len(r.array(t)) != 4 {
		t.Errorf("TOP 4 returned %d", len(r.array(t)))
	}
	pages, _ = queryPages(t, "SELECT TOP 5 * FROM devices WHERE tags.fleet = 'paging'", 3)
	if len(pages) != 2 || len(pages[0])+len(pages[1]) != 5 {
		t.Errorf("TOP 5 in pages of 3: %v", pages)
	}

	// Errors.
	call(t, http.MethodPost, "/devices/query", nil, body("SELECT * FROM devices WHERE")).
		expectError(t, http.StatusBadRequest, "ArgumentInvalid", "the query is invalid: line 1, column 28: expected a value after 'WHERE'")
	call(t, http.MethodPost, "/devices/query", nil, `{"sql":"SELECT * FROM devices"}`).
		expectError(t, http.StatusBadRequest, "ArgumentInvalid", `the request body must be {"query": "SELECT ..."}: the query is missing`)
	call(t, http.MethodPost, "/devices/query", map[string]string{"x-ms-max-item-count": "lots"}, body(q)).
		expectError(t, http.StatusBadRequest, "ArgumentInvalid", `x-ms-max-item-count: "lots" is not a page size (a whole number from 1, at most 1000 are returned)`)
	for _, tok := range []string{"garbage!", tokens[0], "eyJ2IjoxfQ"} {
		call(t, http.MethodPost, "/devices/query", map[string]string{"x-ms-continuation": tok}, body(q)).
			expectError(t, http.StatusBadRequest, "ArgumentInvalid",
				"x-ms-continuation: not a continuation token of this query: send back the token of the previous page's reply with the same query")
	}
}

// TestQueryLanguageConformance pins, through POST /devices/query, where
// kubetwin's query language departs from what IoT Hub documents for twin
// queries (docs/iothub.md, "Conformance"): the lenient parts it keeps on
// purpose, and what it refuses with the reason.
func TestQueryLanguageConformance(t *testing.T) {
	reset(t)
	newTwin(t, devNS, "conf-a", "conf-a1", `{"group":{"name":"g1"},"floor":2}`, "")
	newTwin(t, devNS, "conf-b", "conf-b2", `{"group":{"name":"g2"},"floor":3}`, "")
	body := func(q string) string { b, _ := json.Marshal(map[string]string{"query": q}); return string(b) }
	rows := func(q string) string {
		t.Helper()
		b, _ := json.Marshal(call(t, http.MethodPost, "/devices/query", nil, body(q)).expect(t, http.StatusOK).array(t))
		return string(b)
	}
	// Kept: STARTSWITH (and STARTS_WITH), ENDSWITH, which IoT Hub documents
	// for routing conditions; expressions as projections.
	for q, want := range map[string]string{
		"SELECT deviceId FROM devices WHERE STARTSWITH(deviceId, 'conf-a')":    `[{"deviceId":"conf-a1"}]`,
		"SELECT deviceId FROM devices WHERE STARTS_WITH(deviceId, 'conf-b')":   `[{"deviceId":"conf-b2"}]`,
		"SELECT deviceId FROM devices WHERE ENDSWITH(deviceId, 'b2')":          `[{"deviceId":"conf-b2"}]`,
		"SELECT tags.floor + 1 AS next FROM devices":                           `[{"next":3},{"next":4}]`,
		"SELECT deviceId FROM devices WHERE tags.[[group]].name = 'g2'":        `[{"deviceId":"conf-b2"}]`,
		"SELECT deviceId FROM devices WHERE NOT IS_DEFINED(tags.nothing.here)": `[{"deviceId":"conf-a1"},{"deviceId":"conf-b2"}]`,
	} {
		if got := rows(q); got != want {
			t.Errorf("%s: %s, want %s", q, got, want)
		}
	}
	// Refused, saying why.
	for q, msg := range map[string]string{
		"SELECT * FROM devices WHERE CONTAINS(deviceId, 'a')": "line 1, column 29: unknown function 'CONTAINS'",
		"SELECT * FROM devices WHERE tags.x = undefined": "line 1, column 38: unknown property 'undefined': a path starts with " +
			"deviceId, status, connectionState, lastActivityTime, version, etag, tags, properties, capabilities or configurations",
		"SELECT * FROM devices.modules":                      "line 1, column 15: unknown collection 'devices.modules': only FROM devices can be queried",
		"SELECT * FROM devices.jobs":                         "line 1, column 15: unknown collection 'devices.jobs': only FROM devices can be queried",
		"SELECT * FROM devices ORDER BY deviceId":            "line 1, column 23: ORDER BY is not supported: results come in deviceId order",
		"SELECT * FROM devices WHERE tags.group.name = 'g1'": "line 1, column 34: 'group' is a reserved word: write it as [[group]]",
	} {
		call(t, http.MethodPost, "/devices/query", nil, body(q)).
			expectError(t, http.StatusBadRequest, "ArgumentInvalid", "the query is invalid: "+msg)
	}
}

// TestQueryOrderFollowsCache: the Order that pages of SELECT * and of
// projections are read from (twinscan.CacheOrder, as the operator wires
// it) follows the cache: a twin created, one deleted and one whose device
// id changes are where they belong in the next query's pages.
func TestQueryOrderFollowsCache(t *testing.T) {
	reset(t)
	ctx := context.Background()
	tags := `{"fleet":"order"}`
	var twins []*v1alpha1.DeviceTwin
	for i := 1; i <= 3; i++ {
		twins = append(twins, newTwin(t, devNS, fmt.Sprintf("order-%d", i), fmt.Sprintf("order-%d", i), tags, ""))
	}
	q := "SELECT deviceId FROM devices WHERE tags.fleet = 'order'"
	ids := func() string {
		pages, _ := queryPages(t, q, 2)
		var out []string
		for _, p := range pages {
			for _, it := range p {
				out = append(out, it["deviceId"].(string))
			}
		}
		return strings.Join(out, ",")
	}
	eventually := func(want string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			got := ids()
			if got == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("devices %s, want %s", got, want)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	eventually("order-1,order-2,order-3")

	deleteTwin(t, twins[1])
	newTwin(t, devNS, "order-0", "order-0", tags, "")
	newTwin(t, devNS, "order-4", "order-4", tags, "")
	tw := getTwinObject(t, devNS, "order-3")
	tw.Status.DeviceID = "order-9" // a document's deviceId is the status's when set
	if err := k8s.Status().Update(ctx, tw); err != nil {
		t.Fatal(err)
	}
	eventually("order-0,order-1,order-4,order-9")
}
