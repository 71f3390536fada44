package controllers

import (
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/bridge"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// BenchmarkStatusUnchanged measures a reconcile's status step when nothing
// changed (a restart's usual case): computeStatus, then statusChanged.
func BenchmarkStatusUnchanged(b *testing.B) {
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Name: "d", Namespace: "n", Generation: 4}}
	desired := twin.Doc{"telemetry": twin.Doc{"interval": "12"}, "led": true}
	in := statusInput{twin: tw, now: now, desired: desired, snap: bridge.Snapshot{
		DeviceID: "d", DesiredVersion: 1, Published: desired,
		DesiredMeta: twin.UpdateMetadata(nil, desired, desired, now, 1),
	}}
	in.snap.Persisted = computeStatus(in)
	b.ReportAllocs()
	for b.Loop() {
		if statusChanged(in.snap.Persisted, computeStatus(in)) {
			b.Fatal("status changed")
		}
	}
}
