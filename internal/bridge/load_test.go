package bridge

import (
	"testing"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// Loading a twin's working state shares its status rather than copying it
// (the reconciler hands the bridge the cache's own object, and a restart
// loads every twin), so nothing the bridge does may change that status:
// messages, a desired change, a snapshot and a persisted status leave it as
// it was.
func TestLoadSharesTwinStatus(t *testing.T) {
	b, _, tw := newTestBridgeWith(t, Options{})
	at := metav1.NewTime(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	tw.Status.DeviceID = "d1"
	tw.Status.ReportedVersion = 3
	tw.Status.DesiredVersion = 1
	tw.Status.Reported = &apiextensionsv1.JSON{Raw: []byte(`{"a":1}`)}
	tw.Status.PublishedDesired = &apiextensionsv1.JSON{Raw: []byte(`{"b":1}`)}
	tw.Status.LastActivityTime = &at
	tw.Status.ConnectionStateUpdatedTime = &at
	tw.Status.Conditions = []metav1.Condition{{Type: "Ready", Status: metav1.ConditionTrue, Reason: "R", Message: "m", LastTransitionTime: at}}
	want := tw.Status.DeepCopy()

	snap, err := b.Snapshot(tw)
	if err != nil {
		t.Fatal(err)
	}
	if &snap.Persisted.Conditions[0] != &tw.Status.Conditions[0] || snap.Persisted.Reported != tw.Status.Reported {
		t.Error("loading copied the twin's status")
	}
	var acked int
	report(b, "r1", `{"a":2,"c":{"d":true}}`, &acked)
	b.Handle(bus.Message{Inbound: protocol.Inbound{DeviceID: "d1", Kind: protocol.KindPresence}, Payload: []byte(`{"online":true}`), Received: time.Now(), Ack: func() {}})
	b.Handle(bus.Message{Inbound: protocol.Inbound{DeviceID: "d1", Kind: protocol.KindGet, RequestID: "g1"}, Received: time.Now(), Ack: func() {}})
	if _, err := b.PublishDesired(t.Context(), tw, map[string]any{"b": 2}); err != nil {
		t.Fatal(err)
	}
	b.Handle(bus.Message{Inbound: protocol.Inbound{DeviceID: "d1", Kind: protocol.KindAck}, Payload: []byte(`{"$version":2}`), Received: time.Now(), Ack: func() {}})
	snap, err = b.Snapshot(tw)
	if err != nil {
		t.Fatal(err)
	}
	st := *snap.Persisted.DeepCopy()
	st.ReportedVersion = snap.ReportedVersion
	st.DesiredVersion = snap.DesiredVersion
	b.Persisted(t.Context(), tw, snap, st)
	if !equality.Semantic.DeepEqual(&tw.Status, want) {
		t.Errorf("the bridge changed the twin's status:\n got %+v\nwant %+v", tw.Status, *want)
	}
}
