package controllers

import (
	"context"
	"encoding/json"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/bridge"
	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/twin"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// nopBus takes every publish.
type nopBus struct{}

func (nopBus) Start(context.Context) error                         { return nil }
func (nopBus) Connected() bool                                     { return true }
func (nopBus) Publish(context.Context, string, []byte, bool) error { return nil }

// The status the operator writes for the largest documents the twin rules
// accept stays far below etcd's 1.5 MiB request limit.
//
// Worst case, with L = twin.Reported.MaxStoredSize() = Desired's = 256 KiB:
// status.reported + status.metadata.reported <= L; status.publishedDesired
// + status.metadata.desired <= L; status.delta is part of the desired
// document, whose JSON is at most 8 strings of 4,094 characters that
// encoding/json escapes to 6 bytes each (32 KB by the size rule), about
// 197 KB (192 KiB); conditions and the rest are under 4 KB. So at most 256 + 256 +
// 192 + 4 = 708 KiB. The documents below come close: the desired one is
// that 197 KB of escaped strings, the reported one is empty objects up to
// the stored limit (the many-empty-objects case of the hardening issue,
// which used to make 1.65 MB of metadata).
func TestLargestStatusUnderEtcdLimit(t *testing.T) {
	const worstCase = 708 * 1024
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "big", Generation: 1}}
	b := bridge.New(bridge.Options{Resolve: func(context.Context, string) (*v1alpha1.DeviceTwin, error) { return tw, nil }})
	b.SetBus(nopBus{})
	ctx := context.Background()

	desired := twin.Doc{}
	for i := range 8 {
		desired["a"+strconv.Itoa(i)] = strings.Repeat("<", 4094)
	}
	// Objects of 60 empty objects while they fit, then single ones.
	reported := twin.Doc{}
	limit := twin.Reported.MaxStoredSize()
	for i := 0; ; i++ {
		o := twin.Doc{}
		for j := range 60 {
			o[strconv.Itoa(j)] = twin.Doc{}
		}
		reported[strconv.Itoa(i)] = o
		if twin.StoredSize(twin.Reported, reported) > limit {
			delete(reported, strconv.Itoa(i))
			break
		}
	}
	for i := 0; ; i++ {
		k := "x" + strconv.Itoa(i)
		reported[k] = twin.Doc{}
		if twin.StoredSize(twin.Reported, reported) > limit {
			delete(reported, k)
			break
		}
	}
	for s, d := range map[twin.Section]twin.Doc{twin.Desired: desired, twin.Reported: reported} {
		if err := twin.ValidateDocument(s, s.String(), d); err != nil {
			t.Fatalf("the test's %s document is refused: %v", s, err)
		}
	}

	if _, err := b.PublishDesired(ctx, tw, desired); err != nil {
		t.Fatal(err)
	}
	b.Handle(bus.Message{
		Inbound: protocol.Inbound{DeviceID: "big", Kind: protocol.KindReported, RequestID: "r1"},
		Payload: twin.Encode(reported), Received: time.Now(), Ack: func() {},
	})
	snap, err := b.Snapshot(tw)
	if err != nil {
		t.Fatal(err)
	}
	if snap.ReportedVersion != 1 || snap.DesiredVersion != 1 {
		t.Fatalf("versions %d/%d: the report or the desired document was not taken", snap.ReportedVersion, snap.DesiredVersion)
	}
	st := computeStatus(statusInput{twin: tw, snap: snap, desired: desired, now: time.Now()})
	if st.DeltaCount != 8 {
		t.Fatalf("delta holds %d properties, want all 8", st.DeltaCount)
	}
	// encoding/json, as the API server encodes it (HTML characters escaped).
	raw, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("status: %d bytes (reported metadata %d)", len(raw), len(st.Metadata.Reported.Raw))
	if len(raw) > worstCase {
		t.Fatalf("status is %d bytes, more than the computed worst case %d", len(raw), worstCase)
	}
	if len(raw) < 600*1024 {
		t.Fatalf("status is only %d bytes: the test no longer builds a worst case", len(raw))
	}
}
