package bus

import (
	"strings"
	"sync/atomic"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// This file works around a mochi-mqtt v2.7.9 bug. A filter "a/b/#" also
// matches the topic "a/b" (MQTT 3.1.1 4.7.1.2). mochi honours that for live
// messages (topics.go scanSubscribers, "also match any subs where filter/#
// is filter as per 4.7.1.2") but not for retained ones: TopicsIndex.Messages
// ("a/b/#") returns only the retained messages below a/b (topics.go
// scanMessages), so a new subscription never gets the one on a/b itself.
// kubetwin needs it: a device subscribes to kubetwin/v1/<id>/desired/# and
// must get the retained document on kubetwin/v1/<id>/desired.
//
// After a SUBSCRIBE is processed (SUBACK and mochi's own retained messages
// are out), sendParentRetained sends the retained messages mochi missed,
// the way mochi's publishToClient would.

// sendParentRetained sends cl, for each "<parent>/#" filter of the
// SUBSCRIBE pk that cl now holds, the retained messages on topics matching
// <parent>.
func (e *Embedded) sendParentRetained(cl *mqtt.Client, pk packets.Packet) {
	for _, f := range pk.Filters {
		parent, ok := strings.CutSuffix(f.Filter, "/#")
		if !ok || parent == "" || mqtt.IsSharedFilter(f.Filter) {
			continue
		}
		if f.RetainHandling == 2 { // MQTT 5: send no retained messages
			continue
		}
		sub, ok := cl.State.Subscriptions.Get(f.Filter)
		if !ok { // refused
			continue
		}
		for _, rpk := range e.server.Topics.Messages(parent) {
			e.sendRetained(cl, sub, rpk)
		}
	}
}

// sendRetained writes one retained message to cl, as mochi's
// publishToClient does for a new subscription.
func (e *Embedded) sendRetained(cl *mqtt.Client, sub packets.Subscription, pk packets.Packet) {
	out := pk.Copy(false)
	out.FixedHeader.Retain = true // [MQTT-3.3.1-8]: a new subscription sees the flag
	out.FixedHeader.Qos = min(out.FixedHeader.Qos, sub.Qos)
	if out.FixedHeader.Qos > 0 {
		id, err := cl.NextPacketID()
		if err != nil {
			e.rlog.Error(err, "no packet id for retained message", "clientID", cl.ID, "topic", pk.TopicName)
			return
		}
		out.PacketID = uint16(id)
		// Tracked like mochi's own QoS 1 sends, so the PUBACK is matched
		// and the message is resent if the session resumes.
		if cl.State.Inflight.Set(out) {
			atomic.AddInt64(&e.server.Info.Inflight, 1)
			cl.State.Inflight.DecreaseSendQuota()
		}
	}
	if err := cl.WritePacket(out); err != nil {
		e.log.V(1).Info("sending retained message failed", "clientID", cl.ID, "topic", pk.TopicName, "reason", err.Error())
	}
}

// A device may leave a retained message only on its presence topic (its
// birth and last will, see docs/protocol.md). Anywhere else a retained
// message would be kept by the broker with no bound (one per request id)
// and replayed to every new subscriber, e.g. a stale reported patch. So
// the retain flag of every other publish by a client is stripped: the
// message is still handled and forwarded, just not kept. The operator's
// own (inline) publishes, e.g. the retained desired document, keep it.

// mayRetain reports whether a client may retain a message on topic.
func mayRetain(topic string) bool {
	in, err := protocol.ParseInbound(topic)
	return err == nil && in.Kind == protocol.KindPresence
}

// stripRetain clears the retain flag of a client's publish pk unless it
// may retain it.
func (e *Embedded) stripRetain(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if cl.Net.Inline || !pk.FixedHeader.Retain || mayRetain(pk.TopicName) {
		return pk
	}
	pk.FixedHeader.Retain = false
	retainStripped.Inc()
	e.log.V(1).Info("ignoring the retain flag of a device message", "clientID", truncateID(cl.ID), "topic", truncateID(pk.TopicName))
	return pk
}

// stripWillRetain does the same for a last will.
func (e *Embedded) stripWillRetain(cl *mqtt.Client, will mqtt.Will) mqtt.Will {
	if cl.Net.Inline || !will.Retain || mayRetain(will.TopicName) {
		return will
	}
	will.Retain = false
	retainStripped.Inc()
	return will
}

var retainStripped = prometheus.NewCounter(prometheus.CounterOpts{
	Namespace: "kubetwin", Subsystem: "broker", Name: "retain_stripped_total",
	Help: "Device messages (and last wills) whose retain flag the embedded broker ignored: only a device's presence topic may retain.",
})

func init() {
	metrics.Registry.MustRegister(retainStripped)
}
