package main

import (
	"context"
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/kubetwin/kubetwin/internal/queryapi/queryapitest"
	"github.com/kubetwin/kubetwin/internal/queryapi/wire"
)

// TestQueryAPI: without the query API the plugin lists (and says why with
// --verbose); with its APIService installed it asks the API, and every
// example answers exactly as listing does, in one namespace and in all;
// once the APIService is gone it lists again.
func TestQueryAPI(t *testing.T) {
	ctx := context.Background()
	const hot = "SELECT * FROM devices WHERE properties.reported.telemetryConfig.status = 'Success'"

	r := ok(t, "query", "--verbose", "-o", "json", hot)
	if !strings.Contains(r.stderr, "answered by listing") || !strings.Contains(r.stderr, "query.kubetwin.io/v1alpha1 is not served") {
		t.Fatalf("without the query API, --verbose says:\n%s", r.stderr)
	}
	if r := twinctl(t, "query", "--via", "api", hot); r.code == 0 || !strings.Contains(r.stderr, "--via api: query.kubetwin.io/v1alpha1 is not served") {
		t.Fatalf("--via api without the query API: exit %d, stderr:\n%s", r.code, r.stderr)
	}

	api, err := queryapitest.Serve(ctx, testEnv.Config, queryapitest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			_ = api.Stop(ctx, testEnv.Config)
		}
	})

	compared := 0
	for _, scope := range [][]string{nil, {"-A"}} {
		for _, ex := range examples {
			for _, format := range []string{"json", "wide", "yaml"} {
				args := append(append([]string{"-o", format}, scope...), ex.Query)
				want := ok(t, append([]string{"query", "--via", "list"}, args...)...)
				got := ok(t, append([]string{"query", "--verbose"}, args...)...)
				if !strings.Contains(got.stderr, "answered by the query API") {
					t.Fatalf("%q with the query API installed: --verbose says\n%s", args, got.stderr)
				}
				if format == "wide" {
					want.stdout, got.stdout = ageless(want.stdout), ageless(got.stdout)
				}
				if got.stdout != want.stdout {
					t.Errorf("%q: the query API gives\n%s\nlisting gives\n%s", args, got.stdout, want.stdout)
				}
				compared++
			}
		}
	}
	if compared == 0 {
		t.Fatal("no example compared")
	}

	if err := api.Stop(ctx, testEnv.Config); err != nil {
		t.Fatal(err)
	}
	stopped = true
	r = ok(t, "query", "--verbose", "-o", "json", hot)
	if !strings.Contains(r.stderr, "answered by listing") {
		t.Fatalf("after the APIService is deleted, --verbose says:\n%s", r.stderr)
	}
}

// ageless drops the LAST ACTIVITY column's relative ages, which move
// between two runs.
func ageless(table string) string {
	var out []string
	for _, l := range strings.Split(table, "\n") {
		f := strings.Fields(l)
		for i, w := range f {
			if strings.HasSuffix(w, "s") || strings.HasSuffix(w, "m") || strings.HasSuffix(w, "h") || strings.HasSuffix(w, "d") {
				if len(w) > 1 && w[0] >= '0' && w[0] <= '9' {
					f[i] = "<age>"
				}
			}
		}
		out = append(out, strings.Join(f, " "))
	}
	return strings.Join(out, "\n")
}

// TestQueryAPIShards: two shards' operators, each watching one namespace,
// register their own groups (wire.ShardGroup) side by side, with no
// query API for the whole cluster: the plugin asks each namespace's own
// shard, whose answer is the listing's; over every namespace (-A) it
// merges the twins the shards match with a listing of the other
// namespaces and runs the query over them: SELECT * (with and without
// TOP), projections, aggregates and GROUP BY answer as the listing does,
// the shards' matches coming in parts (a bound of about one twin); a
// namespace whose shard is gone is listed.
func TestQueryAPIShards(t *testing.T) {
	ctx := context.Background()
	shards := map[string]*queryapitest.Running{}
	for i, ns := range []string{"shard-a", "shard-b"} {
		if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
			t.Fatal(err)
		}
		// Different twins in each: an answer from the wrong shard shows.
		for _, d := range fleet[i*2 : i*2+3] {
			if err := createTwinNamed(ctx, withNamespace(d, ns), name(d.id)); err != nil {
				t.Fatal(err)
			}
		}
		// A bound of about one twin: every shard's matches come in parts.
		api, err := queryapitest.Serve(ctx, testEnv.Config, queryapitest.Options{Namespace: ns, Group: wire.ShardGroup(ns), MaxResponseBytes: 1500})
		if err != nil {
			t.Fatal(err)
		}
		shards[ns] = api
		t.Cleanup(func() { _ = api.Stop(ctx, testEnv.Config) })
	}

	const q = "SELECT * FROM devices"
	for ns := range shards {
		want := ok(t, "query", "-n", ns, "-o", "json", "--via", "list", q)
		if len(deviceIDs(t, want.stdout)) != 3 {
			t.Fatalf("listing %s finds %v, want its 3 twins", ns, deviceIDs(t, want.stdout))
		}
		got := ok(t, "query", "-n", ns, "-o", "json", "--verbose", q)
		if !strings.Contains(got.stderr, "answered by the query API ("+wire.ShardGroup(ns)+"/v1alpha1") || !strings.Contains(got.stderr, " parts ") {
			t.Fatalf("-n %s: --verbose says %s", ns, got.stderr)
		}
		if canon(t, got.stdout) != canon(t, want.stdout) {
			t.Errorf("-n %s: the shard answers\n%s\nlisting gives\n%s", ns, got.stdout, want.stdout)
		}
	}
	allNamespaces := func(shards string) {
		t.Helper()
		for _, q := range []string{q, "SELECT TOP 4 * FROM devices WHERE IS_DEFINED(tags)", "SELECT * FROM devices WHERE deviceId != 'nothing'",
			"SELECT deviceId FROM devices",
			"SELECT TOP 3 deviceId, tags.location.plant AS plant FROM devices WHERE IS_DEFINED(tags.location)",
			"SELECT COUNT() AS n FROM devices",
			"SELECT tags.location.region AS region, COUNT() AS n FROM devices GROUP BY tags.location.region",
		} {
			want := ok(t, "query", "-A", "-o", "json", "--via", "list", q)
			got := ok(t, "query", "-A", "-o", "json", "--verbose", q)
			if !strings.Contains(got.stderr, "answered by the shards' query APIs ("+shards+":") {
				t.Fatalf("-A %q: --verbose says %s", q, got.stderr)
			}
			if canon(t, got.stdout) != canon(t, want.stdout) {
				t.Errorf("-A %q: merged\n%s\nlisting gives\n%s", q, got.stdout, want.stdout)
			}
		}
	}
	allNamespaces("shard-a, shard-b")

	// One shard's API gone: its namespace is listed, the other shard
	// still answers.
	if err := shards["shard-a"].Stop(ctx, testEnv.Config); err != nil {
		t.Fatal(err)
	}
	allNamespaces("shard-b")
	r := ok(t, "query", "-n", "shard-a", "-o", "json", "--verbose", q)
	if !strings.Contains(r.stderr, "answered by listing") || len(deviceIDs(t, r.stdout)) != 3 {
		t.Fatalf("-n shard-a without its shard's API: --verbose says %s, items %v", r.stderr, deviceIDs(t, r.stdout))
	}
	r = ok(t, "query", "-n", "shard-b", "-o", "json", "--verbose", q)
	if !strings.Contains(r.stderr, "answered by the query API ("+wire.ShardGroup("shard-b")+"/v1alpha1") {
		t.Fatalf("-n shard-b: --verbose says %s", r.stderr)
	}
}

// TestQueryAPIParts: an answer larger than the operator sends at once
// (--query-api-max-response-bytes) comes in parts for SELECT * and for a
// projection without groups (the plugin asks for them, and prints what
// listing prints); rows of groups over the bound are refused by the
// operator and the plugin lists.
func TestQueryAPIParts(t *testing.T) {
	ctx := context.Background()
	const star = "SELECT * FROM devices"
	const projection = "SELECT deviceId, tags, properties.desired, properties.reported FROM devices"
	// sizes: the largest item of q's answer and all of them, as the
	// operator counts them (compact JSON, a byte between items).
	sizes := func(out string) (largest, total int) {
		for _, it := range items(t, out) {
			b, err := json.Marshal(it)
			if err != nil {
				t.Fatal(err)
			}
			largest, total = max(largest, len(b)), total+len(b)+1
		}
		return largest, total
	}
	largest, total := sizes(ok(t, "query", "-A", "-o", "json", "--via", "list", star).stdout)
	// Room for the largest twin, under half the whole answer.
	limit := largest * 3 / 2
	wantProjection := ok(t, "query", "-A", "-o", "json", "--via", "list", projection)
	_, projTotal := sizes(wantProjection.stdout)
	if total <= 2*limit || projTotal <= limit {
		t.Fatalf("the fixture is too small for this test: answer %d and projection %d bytes, bound %d", total, projTotal, limit)
	}
	api, err := queryapitest.Serve(ctx, testEnv.Config, queryapitest.Options{MaxResponseBytes: limit})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = api.Stop(ctx, testEnv.Config) })

	for _, c := range []struct{ q, output string }{
		{star, "json"}, {"SELECT TOP 5 * FROM devices WHERE IS_DEFINED(tags)", "json"}, {star, "yaml"}, {projection, "yaml"},
	} {
		q := c.q
		want := ok(t, "query", "-A", "-o", c.output, "--via", "list", q)
		got := ok(t, "query", "-A", "-o", c.output, "--verbose", q)
		if !strings.Contains(got.stderr, "answered by the query API") || !strings.Contains(got.stderr, " parts (the answer is larger than the operator sends at once)") {
			t.Fatalf("%q over a bound of %d bytes: --verbose says %s", q, limit, got.stderr)
		}
		if got.stdout != want.stdout {
			t.Errorf("%q: the parts give\n%s\nlisting gives\n%s", q, got.stdout, want.stdout)
		}
		if c.output == "yaml" {
			// The same items as -o json (both ways give the same YAML).
			asJSON, err := yaml.YAMLToJSON([]byte(got.stdout))
			var fromYAML, fromJSON any
			if err == nil {
				err = json.Unmarshal(asJSON, &fromYAML)
			}
			if err != nil || json.Unmarshal([]byte(ok(t, "query", "-A", "-o", "json", q).stdout), &fromJSON) != nil || !reflect.DeepEqual(fromYAML, fromJSON) {
				t.Errorf("%q: -o yaml (%v) does not hold the items of -o json:\n%.500s", q, err, got.stdout)
			}
		}
	}
	// A projection without groups comes in parts as well; rows of groups
	// over the bound are listed.
	got := ok(t, "query", "-A", "-o", "json", "--verbose", projection)
	if !strings.Contains(got.stderr, "answered by the query API") || !strings.Contains(got.stderr, " parts (") {
		t.Fatalf("a projection over the bound: --verbose says %s", got.stderr)
	}
	if got.stdout != wantProjection.stdout {
		t.Errorf("projection: got\n%s\nlisting gives\n%s", got.stdout, wantProjection.stdout)
	}
	// Its table too: the cells are made from each part as it comes.
	for _, args := range [][]string{{"-A"}, {"-A", "--no-headers"}} {
		wantTable := ok(t, append(append([]string{"query"}, args...), "--via", "list", projection)...)
		got = ok(t, append(append([]string{"query"}, args...), "--verbose", projection)...)
		if !strings.Contains(got.stderr, " parts (") {
			t.Fatalf("the table of a projection over the bound: --verbose says %s", got.stderr)
		}
		if got.stdout != wantTable.stdout || strings.Count(got.stdout, "\n") < 3 {
			t.Errorf("projection %q: got\n%s\nlisting gives\n%s", args, got.stdout, wantTable.stdout)
		}
	}
	const grouped = "SELECT properties AS p, COUNT() AS n FROM devices GROUP BY properties"
	wantGrouped := ok(t, "query", "-A", "-o", "json", "--via", "list", grouped)
	if _, n := sizes(wantGrouped.stdout); n <= limit {
		t.Fatalf("the fixture is too small for this test: GROUP BY answer %d bytes, bound %d", n, limit)
	}
	got = ok(t, "query", "-A", "-o", "json", "--verbose", grouped)
	if !strings.Contains(got.stderr, "answered by listing") || !strings.Contains(got.stderr, "--query-api-max-response-bytes") {
		t.Fatalf("GROUP BY over the bound: --verbose says %s", got.stderr)
	}
	if got.stdout != wantGrouped.stdout {
		t.Errorf("GROUP BY: got\n%s\nlisting gives\n%s", got.stdout, wantGrouped.stdout)
	}
}
