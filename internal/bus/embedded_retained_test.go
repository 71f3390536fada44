package bus

import (
	"net"
	"net/url"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

func TestEmbeddedDeviceMayRetainOnlyPresence(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	before := len(f.bus.server.Topics.Retained.GetAll())
	dev := connectDevice(t, deviceOpts(f.bus.Addr(), "dev-1"))

	// A retained reported patch (QoS 1) and GET (QoS 0): handled once each,
	// but not kept.
	reported := protocol.ReportedTopic("dev-1", "r1")
	tok := dev.Publish(reported, 1, true, `{"temp":1}`)
	m := f.rec.next(t)
	if m.Kind != protocol.KindReported || string(m.Payload) != `{"temp":1}` {
		t.Fatalf("handler got %+v %q", m.Inbound, m.Payload)
	}
	m.Ack()
	waitToken(t, "publish", tok)
	waitToken(t, "publish", dev.Publish(protocol.GetTopic("dev-1", "g1"), 0, true, ""))
	if m := f.rec.next(t); m.Kind != protocol.KindGet {
		t.Fatalf("handler got %+v", m.Inbound)
	}
	f.rec.none(t, 50*time.Millisecond) // once each

	for _, topic := range []string{reported, protocol.GetTopic("dev-1", "g1")} {
		if n := len(f.bus.server.Topics.Messages(topic)); n != 0 {
			t.Errorf("%d retained messages on %s", n, topic)
		}
	}

	// A fresh subscriber's first message is a live one, not a retained
	// patch.
	got := make(chan paho.Message, 10)
	sub := connectDevice(t, deviceOpts(f.bus.Addr(), "watcher"))
	waitToken(t, "subscribe", sub.Subscribe(protocol.DevicePrefix("dev-1")+"/reported/+", 1, func(_ paho.Client, m paho.Message) { got <- m }))
	tok = dev.Publish(protocol.ReportedTopic("dev-1", "r2"), 1, false, `{"temp":2}`)
	f.rec.next(t).Ack()
	waitToken(t, "publish", tok)
	select {
	case m := <-got:
		if m.Retained() || string(m.Payload()) != `{"temp":2}` {
			t.Fatalf("fresh subscriber got %q retained=%v first", m.Payload(), m.Retained())
		}
	case <-time.After(waitTimeout):
		t.Fatal("live message not forwarded")
	}

	// Presence still retains.
	tok = dev.Publish(protocol.PresenceTopic("dev-1"), 1, true, `{"online":true}`)
	f.rec.next(t).Ack()
	waitToken(t, "publish", tok)
	if n := len(f.bus.server.Topics.Messages(protocol.PresenceTopic("dev-1"))); n != 1 {
		t.Errorf("%d retained presence messages, want 1", n)
	}
	if n := len(f.bus.server.Topics.Retained.GetAll()) - before; n != 1 {
		t.Errorf("%d retained messages were added, want 1 (presence)", n)
	}
}

func TestEmbeddedWillRetainsOnlyOnPresence(t *testing.T) {
	f := startEmbedded(t, time.Minute)
	for _, d := range []struct {
		id, topic string
		retained  bool
	}{
		{"will-a", protocol.ReportedTopic("will-a", "w"), false},
		{"will-b", protocol.PresenceTopic("will-b"), true},
	} {
		var conn net.Conn
		o := deviceOpts(f.bus.Addr(), d.id).SetWill(d.topic, `{"online":false}`, 1, true).
			SetCustomOpenConnectionFn(func(u *url.URL, _ paho.ClientOptions) (net.Conn, error) {
				c, err := net.Dial("tcp", u.Host)
				conn = c
				return c, err
			})
		connectDevice(t, o)
		_ = conn.Close() // abrupt: the will goes out before OnDisconnect
		eventually(t, d.id+" is offline", func() bool {
			online, ok := f.presence.last(d.id)
			return ok && !online
		})
		if d.retained {
			eventually(t, "the presence will is retained", func() bool { return len(f.bus.server.Topics.Messages(d.topic)) == 1 })
		} else if n := len(f.bus.server.Topics.Messages(d.topic)); n != 0 {
			t.Errorf("will on %s retained", d.topic)
		}
	}
}
