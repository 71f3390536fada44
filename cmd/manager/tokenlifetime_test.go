package main

import (
	"flag"
	"testing"
	"time"
)

// TestTokenLifetimeFlag: --max-sas-token-lifetime defaults to a year,
// takes a duration, and a negative one is refused naming the flag.
func TestTokenLifetimeFlag(t *testing.T) {
	fs := flag.CommandLine
	flag.CommandLine = flag.NewFlagSet("test", flag.ContinueOnError)
	defer func() { flag.CommandLine = fs }()
	var d time.Duration
	bindTokenLifetimeFlag(&d)
	if d != 8760*time.Hour || checkTokenLifetimeFlag(d) != nil {
		t.Fatalf("default %s (%v), want 8760h", d, checkTokenLifetimeFlag(d))
	}
	if err := flag.CommandLine.Parse([]string{"--max-sas-token-lifetime=24h"}); err != nil || d != 24*time.Hour {
		t.Fatalf("--max-sas-token-lifetime=24h: %s, %v", d, err)
	}
	if err := checkTokenLifetimeFlag(0); err != nil {
		t.Errorf("0 (no bound): %v", err)
	}
	want := "--max-sas-token-lifetime must be 0 (no bound) or more, not -1h0m0s"
	if err := checkTokenLifetimeFlag(-time.Hour); err == nil || err.Error() != want {
		t.Errorf("-1h: %v, want %s", err, want)
	}
}
