package main

import (
	"testing"

	"github.com/kubetwin/kubetwin/internal/operator"
)

func TestCheckPendingFlags(t *testing.T) {
	tests := map[string]struct {
		p       operator.BridgeOptions
		wantErr string
	}{
		"defaults":      {operator.BridgeOptions{MaxPendingReports: 256, MaxPendingReportBytes: 262144}, ""},
		"no reports":    {operator.BridgeOptions{MaxPendingReports: 0, MaxPendingReportBytes: 262144}, "--max-pending-reports must be at least 1, not 0"},
		"under a patch": {operator.BridgeOptions{MaxPendingReports: 1, MaxPendingReportBytes: 1000}, "--max-pending-report-bytes must be at least 65536 (the largest reported patch), not 1000"},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			err := checkPendingFlags(tt.p)
			if (err == nil) != (tt.wantErr == "") || (err != nil && err.Error() != tt.wantErr) {
				t.Errorf("checkPendingFlags = %v, want %q", err, tt.wantErr)
			}
		})
	}
}
