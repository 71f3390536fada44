package bus

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// startHookedEmbedded runs an Embedded bus with the fake Authenticator and
// the authWindow's test hooks, set before any connection exists.
func startHookedEmbedded(t *testing.T, afterAuth, beforeRegister func(b *Embedded, clientID string)) (*Embedded, *recorder) {
	t.Helper()
	rec := newRecorder()
	b, err := NewEmbedded(EmbeddedOptions{Listen: "127.0.0.1:0", Auth: &fakeAuth{}, Handler: rec.handle, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if afterAuth != nil {
		b.authing.afterAuthenticate = func(id string) { afterAuth(b, id) }
	}
	if beforeRegister != nil {
		b.authing.beforeRegister = func(id string) { beforeRegister(b, id) }
	}
	runBus(t, b)
	select {
	case <-b.Ready():
	case <-time.After(waitTimeout):
		t.Fatal("embedded bus not ready")
	}
	return b, rec
}

// recheck runs Recheck for the device "dev-1" with a check that refuses
// every credential (the device was disabled, or re-keyed, meanwhile).
func recheck(t *testing.T, reason string) func(b *Embedded, clientID string) {
	return func(b *Embedded, clientID string) {
		if clientID != "dev-1" {
			return
		}
		if err := b.Recheck(clientID, func(string, []byte) error { return Refuse(reason, "changed during CONNECT") }); err != nil {
			t.Errorf("Recheck: %v", err)
		}
	}
}

// TestEmbeddedRecheckDuringConnect: a device disabled or re-keyed between
// its authentication and the registration of its connection (Recheck runs
// in that window, from a hook) is refused or disconnected at once, instead
// of keeping its access until its token expires.
func TestEmbeddedRecheckDuringConnect(t *testing.T) {
	t.Run("after the Authenticator, before CONNACK", func(t *testing.T) {
		b, _ := startHookedEmbedded(t, recheck(t, ReasonDisabled), nil)
		before := testutil.ToFloat64(Refused.WithLabelValues(ReasonDisabled))
		if _, code, _ := authDevice(t, deviceOpts(b.Addr(), "dev-1"), "ok-1h"); code != 5 {
			t.Fatalf("CONNACK %d, want 5 (not authorized)", code)
		}
		if got := testutil.ToFloat64(Refused.WithLabelValues(ReasonDisabled)); got != before+1 {
			t.Errorf("refused_total{disabled} went from %v to %v, want +1", before, got)
		}
		assertForgotten(t, b)
	})
	t.Run("after CONNACK, before registration", func(t *testing.T) {
		b, _ := startHookedEmbedded(t, nil, recheck(t, ReasonBadSignature))
		before := testutil.ToFloat64(Refused.WithLabelValues(ReasonBadSignature))
		_, code, lost := authDevice(t, deviceOpts(b.Addr(), "dev-1"), "ok-1h")
		if code != 0 {
			t.Fatalf("CONNACK %d", code)
		}
		select {
		case <-lost:
		case <-time.After(waitTimeout):
			t.Fatal("the device re-keyed before its connection was registered stayed connected")
		}
		if got := testutil.ToFloat64(Refused.WithLabelValues(ReasonBadSignature)); got != before+1 {
			t.Errorf("refused_total{bad_signature} went from %v to %v, want +1", before, got)
		}
		assertForgotten(t, b)
	})
	t.Run("a passing check, or one for another device, changes nothing", func(t *testing.T) {
		checked := 0
		b, rec := startHookedEmbedded(t, nil, func(b *Embedded, id string) {
			if err := b.Recheck(id, func(string, []byte) error { checked++; return nil }); err != nil {
				t.Errorf("Recheck: %v", err)
			}
			if err := b.Recheck("other", func(string, []byte) error { return Refuse(ReasonDisabled, "not this one") }); err != nil {
				t.Errorf("Recheck: %v", err)
			}
		})
		dev, code, lost := authDevice(t, deviceOpts(b.Addr(), "dev-1"), "ok-1h")
		if code != 0 {
			t.Fatalf("CONNACK %d", code)
		}
		pub := dev.Publish(protocol.ReportedTopic("dev-1", "r1"), 1, false, `{}`)
		rec.next(t).Ack()
		waitToken(t, "publish", pub)
		if checked != 1 {
			t.Errorf("the check ran %d times, want once", checked)
		}
		select {
		case <-lost:
			t.Fatal("dev-1 lost its connection")
		default:
		}
	})
	t.Run("an administrator with a device's client id is not refused", func(t *testing.T) {
		b, _ := startHookedEmbedded(t, recheck(t, ReasonDisabled), recheck(t, ReasonDisabled))
		admin, code, lost := authDevice(t, deviceOpts(b.Addr(), "dev-1"), "admin")
		if code != 0 {
			t.Fatalf("CONNACK %d", code)
		}
		waitToken(t, "admin subscribe", admin.Subscribe("kubetwin/v1/#", 1, nil))
		select {
		case <-lost:
			t.Fatal("the administrator was disconnected")
		default:
		}
	})
}

// assertForgotten waits until the broker holds nothing of the refused
// connection: no session, nothing in the authWindow, no live connection.
func assertForgotten(t *testing.T, b *Embedded) {
	t.Helper()
	eventually(t, "the connection forgotten", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return len(b.sessions) == 0 && len(b.authing.pending) == 0 && b.conns["dev-1"] == nil
	})
}
