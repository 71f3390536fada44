package main

import (
	"testing"
	"time"

	"github.com/kubetwin/kubetwin/internal/operator"
)

func TestCheckPendingFlags(t *testing.T) {
	tests := map[string]struct {
		p       operator.BridgeOptions
		wantErr string
	}{
		"defaults":        {operator.BridgeOptions{MaxPendingReports: 256, MaxPendingReportBytes: 262144}, ""},
		"no reports":      {operator.BridgeOptions{MaxPendingReports: 0, MaxPendingReportBytes: 262144}, "--max-pending-reports must be at least 1, not 0"},
		"under a patch":   {operator.BridgeOptions{MaxPendingReports: 1, MaxPendingReportBytes: 1000}, "--max-pending-report-bytes must be at least 65536 (the largest reported patch), not 1000"},
		"keep idle state": {operator.BridgeOptions{MaxPendingReports: 1, MaxPendingReportBytes: 65536, IdleStateTTL: 0}, ""},
		"negative idle ttl": {operator.BridgeOptions{MaxPendingReports: 1, MaxPendingReportBytes: 65536, IdleStateTTL: -time.Second},
			"--bridge-idle-state-ttl must be 0 (keep idle state) or positive, not -1s"},
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
