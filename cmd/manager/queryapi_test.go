package main

import (
	"flag"
	"strings"
	"testing"
)

// TestQueryAPIFlags: the query API is off unless its address is set, and
// its bounds must be positive.
func TestQueryAPIFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		err  string
	}{
		{nil, ""},
		{[]string{"--query-api-max-concurrent-queries=0"}, ""}, // off: not checked
		{[]string{"--query-api-bind-address=:8444"}, ""},
		{[]string{"--query-api-bind-address=:8444", "--query-api-max-concurrent-queries=0"}, "--query-api-max-concurrent-queries must be at least 1, got 0"},
		{[]string{"--query-api-bind-address=:8444", "--query-api-max-response-bytes=-1"}, "--query-api-max-response-bytes must be at least 1, got -1"},
	} {
		fs := flag.NewFlagSet("manager", flag.ContinueOnError)
		var q queryAPIOptions
		bindQueryAPIFlags(fs, &q)
		if err := fs.Parse(c.args); err != nil {
			t.Fatal(err)
		}
		err := checkQueryAPIFlags(q)
		if (err == nil) != (c.err == "") || err != nil && !strings.Contains(err.Error(), c.err) {
			t.Errorf("%v: error %v, want %q", c.args, err, c.err)
		}
	}
}
