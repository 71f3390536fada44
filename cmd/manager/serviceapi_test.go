package main

import (
	"testing"
	"time"
)

// TestServiceTokenLifetime: --max-sas-token-lifetime=0 means no bound,
// which hubapi spells as a negative lifetime (its zero is the default).
func TestServiceTokenLifetime(t *testing.T) {
	for flag, want := range map[time.Duration]time.Duration{0: -1, time.Hour: time.Hour, 8760 * time.Hour: 8760 * time.Hour} {
		if got := serviceTokenLifetime(flag); got != want {
			t.Errorf("serviceTokenLifetime(%v) = %v, want %v", flag, got, want)
		}
	}
}
