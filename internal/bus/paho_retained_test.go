package bus

import (
	"slices"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// expectNext waits for the next message and checks its kind and request
// id, skipping redeliveries: the live reports of earlier rounds (request
// ids "live0" up to before round) and, when a report is wanted, another
// copy of the presence. The operator acknowledges each, but when it stops
// before its PUBACK reaches Mosquitto, the broker resends the message to
// the resumed session first thing, besides the retained presence the new
// subscription gets. A redelivery is not a retained request.
func expectNext(t *testing.T, rec *recorder, kind, rid string, round int) {
	t.Helper()
	m := rec.next(t)
	for m.Kind == protocol.KindReported && slices.Contains(liveIDs[:round], m.RequestID) ||
		kind != protocol.KindPresence && m.Kind == protocol.KindPresence {
		m.Ack()
		m = rec.next(t)
	}
	if m.Kind != kind || m.RequestID != rid {
		t.Fatalf("got %+v %q, want %s %q (a retained request was handled?)", m.Inbound, m.Payload, kind, rid)
	}
	m.Ack()
}

// liveIDs are the request ids of TestPahoIgnoresRetainedRequests's live
// reports, one a round.
var liveIDs = []string{"live0", "live1"}

func TestPahoIgnoresRetainedRequests(t *testing.T) {
	addr := startMosquitto(t)
	ignored := testutil.ToFloat64(retainedIgnored)

	// A device leaves retained requests (and a retained presence) before
	// the operator ever connects.
	dev := connectDevice(t, deviceOpts(addr, "dev-r"))
	waitToken(t, "publish", dev.Publish(protocol.ReportedTopic("dev-r", "old"), 1, true, `{"temp":-40}`))
	waitToken(t, "publish", dev.Publish(protocol.GetTopic("dev-r", "g"), 1, true, `{}`))
	waitToken(t, "publish", dev.Publish(protocol.AckTopic("dev-r"), 1, true, `{"$version":1}`))
	waitToken(t, "publish", dev.Publish(protocol.PresenceTopic("dev-r"), 1, true, `{"online":true}`))

	for round := range 2 { // the first connect, then a reconnect
		rec := newRecorder()
		_, stop := startOperator(t, addr, rec)
		// One device's messages arrive in order: the retained presence
		// (sent at subscribe), then a live report. Anything retained in
		// between fails the test.
		expectNext(t, rec, protocol.KindPresence, "", round)
		waitToken(t, "publish", dev.Publish(protocol.ReportedTopic("dev-r", liveIDs[round]), 1, false, `{"temp":21}`))
		expectNext(t, rec, protocol.KindReported, liveIDs[round], round)
		stop()
		if got := testutil.ToFloat64(retainedIgnored) - ignored; got != float64(3*(round+1)) {
			t.Errorf("round %d: %v retained requests counted as ignored, want %d", round, got, 3*(round+1))
		}
	}
}
