package main

import (
	"context"
	"strings"
	"testing"

	"github.com/kubetwin/kubetwin/internal/queryapi/queryapitest"
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
			for _, format := range []string{"json", "wide"} {
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
