package bus

// This file makes the embedded broker speak Azure IoT Hub's device-twin MQTT
// dialect (see pkg/protocol/iothub.go) to devices that use it, while the
// operator goes on speaking only kubetwin's protocol.
//
// Requests. A device's publish on $iothub/twin/GET/?$rid=<rid> or
// $iothub/twin/PATCH/properties/reported/?$rid=<rid> reaches the Handler
// exactly as kubetwin/v1/<device>/get/<rid> or .../reported/<rid> would,
// with the same Ack semantics, and is never forwarded to subscribers. The
// device is its grant's DeviceID (with an Authenticator), else its client
// id. The broker remembers (iothubRequests) which requests came in this
// way. A request without a valid $rid is answered at once with status 400.
//
// Responses and notifications. Embedded.Publish also translates what the
// operator publishes (iothubTranslate): the response to a remembered
// request, and every desired patch of a device that has a connection.
//
// Routing. IoT Hub topics name no device, so every dialect client
// subscribes to the same filters, and a message on $iothub/twin/res/200/...
// published the ordinary way would reach all of them. (mochi v2.7.9 has no
// hook that can narrow the recipients of an ordinary subscription:
// OnSelectSubscribers runs only when a topic has shared subscribers.) So
// the broker keeps each client's dialect subscriptions in a namespace of
// its own: OnSubscribe and OnUnsubscribe rewrite a filter "$iothub/<rest>"
// of client c to "$kubetwin/iothub/<escaped c>/<rest>" before mochi sees
// it, the translated message is published on the internal topic of its
// target client, and OnPacketEncode turns the topic back into
// "$iothub/<rest>" as the packet is written. mochi's own routing then
// finds only that client, and mochi does everything else as for any
// message: QoS (min(subscription QoS, 1)), packet ids, in-flight tracking,
// the client's outbound queue, MQTT 5 topic aliases, and keeping
// subscriptions and in-flight messages of a persistent session across
// reconnects and take-overs. The "$kubetwin" namespace is the broker's:
// clients may neither publish nor subscribe there.
//
// Acknowledgements. An IoT Hub device never tells what desired version it
// has. When a desired patch, or a 200 response with a desired document, is
// written to a dialect client's connection (OnPacketSent; the version
// travels as the packet's origin), the Handler gets a KindAck message with
// that version for the client's device.
//
// Lost sessions. An IoT Hub SDK connects with clean=false and subscribes
// once per process. When the broker did not have such a client's session
// (sessionPresent=false, e.g. the operator restarted), the session gets
// both twin subscriptions back: at once when the client is an Azure IoT
// SDK (its username carries DeviceClientType, as every Azure IoT device
// SDK sends it), so that a device that only waits for desired changes
// still gets them; otherwise on the client's first twin request, unless
// it has subscribed for responses itself since.

import (
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

const (
	// reservedRoot is the first topic level of the broker's own topics.
	reservedRoot = "$kubetwin"
	// iothubInternalRoot prefixes the internal topics of dialect clients:
	// iothubInternalRoot + <escaped client id> + "/" + <rest of the $iothub topic>.
	iothubInternalRoot = reservedRoot + "/iothub/"
	// iothubOrigin is the origin (inline client id) of translated messages
	// that carry no desired version; iothubAckOrigin + n that of those
	// that hand the device desired version n.
	iothubOrigin    = reservedRoot + "/iothub"
	iothubAckOrigin = iothubOrigin + "/desired/"

	// iothubRequestTTL is how long the broker remembers a dialect request
	// the operator has not answered.
	iothubRequestTTL = 5 * time.Minute
	// iothubSweepInterval is how often, at most, expired requests are
	// dropped.
	iothubSweepInterval = time.Minute
	// iothubMaxRequestsPerDevice bounds the unanswered dialect requests
	// remembered per device (the operator's own bound is 2048); beyond it
	// the oldest is forgotten.
	iothubMaxRequestsPerDevice = 4096
)

// isReserved reports whether topic (or filter) lies in the broker's own
// namespace.
func isReserved(topic string) bool {
	rest, ok := strings.CutPrefix(topic, reservedRoot)
	return ok && (rest == "" || rest[0] == '/')
}

// iothubInternalPrefix is the internal topic prefix of a client's dialect
// traffic. The client id is escaped like a device id, so it is one topic
// level without wildcards.
func iothubInternalPrefix(clientID string) string {
	return iothubInternalRoot + protocol.EscapeID(clientID)
}

// iothubInternal maps an IoT Hub topic or filter to clientID's internal one.
func iothubInternal(clientID, topic string) string {
	return iothubInternalPrefix(clientID) + strings.TrimPrefix(topic, protocol.IoTHubRoot)
}

// iothubExternal maps clientID's internal topic or filter back to the IoT
// Hub one; ok is false if topic is not clientID's.
func iothubExternal(clientID, topic string) (string, bool) {
	rest, ok := strings.CutPrefix(topic, iothubInternalPrefix(clientID))
	if !ok || (rest != "" && rest[0] != '/') {
		return "", false
	}
	return protocol.IoTHubRoot + rest, true
}

// iothubRequest is a dialect request the operator has not answered yet.
type iothubRequest struct {
	clientID string
	at       time.Time
}

// iothubRequests remembers which requests arrived in the IoT Hub dialect,
// so that their responses are translated. An entry goes when the response
// comes, after iothubRequestTTL, or when its device has too many.
type iothubRequests struct {
	mu        sync.Mutex
	devices   map[string]map[string]iothubRequest // device id → request id → request
	lastSweep time.Time
}

// add remembers the request rid of deviceID from clientID. A request with
// the same id replaces the earlier one.
func (r *iothubRequests) add(deviceID, rid, clientID string, now time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.devices == nil {
		r.devices = map[string]map[string]iothubRequest{}
	}
	if now.Sub(r.lastSweep) >= iothubSweepInterval {
		r.sweepLocked(now)
	}
	reqs := r.devices[deviceID]
	if reqs == nil {
		reqs = map[string]iothubRequest{}
		r.devices[deviceID] = reqs
	}
	if _, ok := reqs[rid]; !ok && len(reqs) >= iothubMaxRequestsPerDevice {
		oldest := ""
		for id, req := range reqs {
			if oldest == "" || req.at.Before(reqs[oldest].at) {
				oldest = id
			}
		}
		delete(reqs, oldest)
	}
	reqs[rid] = iothubRequest{clientID: clientID, at: now}
}

// take forgets the request rid of deviceID and returns the client that
// sent it, if it arrived in the dialect and has not expired.
func (r *iothubRequests) take(deviceID, rid string, now time.Time) (clientID string, ok bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	reqs := r.devices[deviceID]
	req, ok := reqs[rid]
	if !ok {
		return "", false
	}
	delete(reqs, rid)
	if len(reqs) == 0 {
		delete(r.devices, deviceID)
	}
	if now.Sub(req.at) > iothubRequestTTL {
		return "", false
	}
	return req.clientID, true
}

// sweepLocked drops the expired requests. r.mu is held.
func (r *iothubRequests) sweepLocked(now time.Time) {
	r.lastSweep = now
	for deviceID, reqs := range r.devices {
		for rid, req := range reqs {
			if now.Sub(req.at) > iothubRequestTTL {
				delete(reqs, rid)
			}
		}
		if len(reqs) == 0 {
			delete(r.devices, deviceID)
		}
	}
}

// deviceOf is the device a client is: its grant's DeviceID with an
// Authenticator (none for an administrator or a client without a
// session), else its client id.
func (e *Embedded) deviceOf(cl *mqtt.Client) string {
	if e.auth == nil {
		return cl.ID
	}
	e.mu.Lock()
	s := e.sessions[cl]
	e.mu.Unlock()
	if s == nil || s.grant.Admin {
		return ""
	}
	return s.grant.DeviceID
}

// iothubPublish is OnPublish for a device's message in the "$iothub" or
// the broker's own namespace. It hands a twin request to the Handler (see
// deliver), answers one without a valid request id with status 400, and
// refuses anything else. None of these messages is retained or forwarded.
func (e *Embedded) iothubPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	req, err := protocol.ParseIoTHubRequest(pk.TopicName)
	deviceID := e.deviceOf(cl)
	if req.Kind == "" || deviceID == "" {
		// With an Authenticator the ACL has refused these already, but
		// for an administrator.
		Refused.WithLabelValues(ReasonPublishDenied).Inc()
		e.rlog.Info("refused unsupported IoT Hub topic", "clientID", cl.ID, "deviceID", deviceID,
			"topic", pk.TopicName, "publish", true, "reason", ReasonPublishDenied)
		return pk, packets.CodeSuccessIgnore
	}
	e.iothubRestoreSubscriptions(cl)
	if err != nil {
		e.rlog.Info("refused IoT Hub twin request", "clientID", cl.ID, "deviceID", deviceID, "topic", pk.TopicName,
			"reason", err.Error())
		e.iothubDeliver(cl.ID, protocol.IoTHubError(protocol.StatusBadRequest, req.RequestID, err.Error()))
		return pk, packets.CodeSuccessIgnore
	}
	// Before the Handler, which may answer at once.
	e.iothubRequests.add(deviceID, req.RequestID, cl.ID, time.Now())
	in := protocol.Inbound{DeviceID: deviceID, Kind: req.Kind, RequestID: req.RequestID}
	deferred, err := e.deliver(cl, in, pk)
	switch {
	case err != nil:
		return pk, fmt.Errorf("%w: %w", packets.ErrRejectPacket, err)
	case deferred:
		return pk, packets.ErrRejectPacket
	}
	// PUBACK (PUBREC) as usual, but neither retain nor forward.
	return pk, packets.CodeSuccessIgnore
}

// iothubTranslate sends the IoT Hub translation of a message the operator
// published on topic, if any: the response to a request that arrived in
// the dialect goes to the client that sent it, a desired patch to the
// connection of its device (mochi drops it unless that client subscribed
// to it). Problems are logged: the kubetwin message is out already.
func (e *Embedded) iothubTranslate(topic string, payload []byte) {
	out, err := protocol.ParseOutbound(topic)
	if err != nil {
		return
	}
	switch out.Kind {
	case protocol.OutboundResponse:
		clientID, ok := e.iothubRequests.take(out.DeviceID, out.RequestID, time.Now())
		if !ok {
			return
		}
		m, err := protocol.IoTHubResponse(out.RequestID, payload)
		if err != nil {
			e.log.Error(err, "cannot translate response for IoT Hub device", "deviceID", out.DeviceID, "requestID", out.RequestID)
			m = protocol.IoTHubError(protocol.StatusError, out.RequestID, "the operator sent an invalid response")
		}
		e.iothubDeliver(clientID, m)
	case protocol.OutboundDesiredPatch:
		if _, ok := e.server.Clients.Get(out.DeviceID); !ok {
			return
		}
		m, err := protocol.IoTHubDesiredPatch(payload)
		if err != nil {
			e.log.Error(err, "cannot translate desired patch for IoT Hub device", "deviceID", out.DeviceID)
			return
		}
		e.iothubDeliver(out.DeviceID, m)
	}
}

// iothubDeliver publishes m to clientID alone, through mochi, on the
// client's internal topic; see the top of this file.
func (e *Embedded) iothubDeliver(clientID string, m protocol.IoTHubMessage) {
	fw := e.forwarders.Get().(*mqtt.Client)
	defer e.forwarders.Put(fw)
	fw.ID = iothubOrigin
	if m.DesiredVersion > 0 {
		fw.ID = iothubAckOrigin + strconv.FormatInt(m.DesiredVersion, 10)
	}
	pk := packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish, Qos: 1},
		TopicName:   iothubInternal(clientID, m.Topic),
		Payload:     m.Payload,
		PacketID:    1, // mochi wants one on a QoS 1 PUBLISH; it assigns its own per recipient
	}
	if err := e.server.InjectPacket(fw, pk); err != nil {
		e.log.Error(err, "publishing to IoT Hub device failed", "clientID", clientID, "topic", m.Topic)
	}
}

// iothubSubscribed reports whether cl holds a subscription matching the IoT
// Hub topic.
func (e *Embedded) iothubSubscribed(cl *mqtt.Client, topic string) bool {
	_, ok := e.server.Topics.Subscribers(iothubInternal(cl.ID, topic)).Subscriptions[cl.ID]
	return ok
}

// iothubRestoreSubscriptions gives cl both twin subscriptions (QoS 0) if the
// broker did not have its persistent session when it connected and it has
// not subscribed for responses since. It acts on cl's first twin request
// only.
func (e *Embedded) iothubRestoreSubscriptions(cl *mqtt.Client) {
	e.mu.Lock()
	_, lost := e.lostSessions[cl]
	delete(e.lostSessions, cl)
	e.mu.Unlock()
	if !lost || e.iothubSubscribed(cl, protocol.IoTHubResponseTopic(protocol.StatusOK, "r")) {
		return
	}
	var added []string
	for _, f := range []string{protocol.IoTHubResponseFilter, protocol.IoTHubDesiredFilter} {
		filter := iothubInternal(cl.ID, f)
		if _, ok := cl.State.Subscriptions.Get(filter); ok {
			continue
		}
		// What mochi's processSubscribe does for a granted filter.
		sub := packets.Subscription{Filter: filter, Qos: 0}
		if e.server.Topics.Subscribe(cl.ID, sub) {
			atomic.AddInt64(&e.server.Info.Subscriptions, 1)
		}
		cl.State.Subscriptions.Add(filter, sub)
		added = append(added, f)
	}
	e.rlog.Info("broker had lost the session of an IoT Hub client; subscribed it to its twin topics",
		"clientID", cl.ID, "remote", cl.Net.Remote, "filters", added)
}

// isIoTHubSDK reports whether cl identified itself as an Azure IoT device
// SDK: its username is "<hub>/<device>/?api-version=...&DeviceClientType=...".
func isIoTHubSDK(cl *mqtt.Client) bool {
	_, query, ok := strings.Cut(string(cl.Properties.Username), "?")
	if !ok {
		return false
	}
	v, err := url.ParseQuery(query)
	return err == nil && v.Get("DeviceClientType") != ""
}

// sessionEstablishing notes a client with clean=false (MQTT 5: clean start
// false) whose session the broker does not have. It runs before mochi
// looks for the session, with the same test.
func (e *Embedded) sessionEstablishing(cl *mqtt.Client, pk packets.Packet) {
	if pk.Connect.Clean {
		return
	}
	if old, ok := e.server.Clients.Get(cl.ID); ok && !(old.Properties.Clean && old.Properties.ProtocolVersion < 5) {
		return // mochi resumes it
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.lostSessions[cl] = struct{}{}
	// A connection whose CONNACK could not be written never reaches
	// OnDisconnect; drop such entries now and then.
	if len(e.lostSessions) > 2*len(e.conns)+1024 {
		for c := range e.lostSessions {
			if c.Closed() {
				delete(e.lostSessions, c)
			}
		}
	}
}

// iothubFilters maps the "$iothub" filters of a SUBSCRIBE or UNSUBSCRIBE to
// cl's internal ones, and, with refuse (SUBSCRIBE), turns a filter in the
// broker's own namespace into an invalid one that mochi refuses. The packet
// is copied before it is changed: mochi passes the original to later hooks.
func (e *Embedded) iothubFilters(cl *mqtt.Client, pk packets.Packet, refuse bool) packets.Packet {
	copied := false
	for i, f := range pk.Filters {
		var filter string
		switch {
		case protocol.IsIoTHubTopic(f.Filter):
			filter = iothubInternal(cl.ID, f.Filter)
		case refuse && isReserved(f.Filter):
			Refused.WithLabelValues(ReasonSubscribeDenied).Inc()
			e.rlog.Info("refused topic outside the device's own", "clientID", cl.ID, "topic", f.Filter,
				"publish", false, "reason", ReasonSubscribeDenied)
			filter = "" // invalid: SUBACK failure
		default:
			continue
		}
		if !copied {
			pk.Filters = slices.Clone(pk.Filters)
			copied = true
		}
		pk.Filters[i].Filter = filter
	}
	return pk
}

// iothubSent hands the Handler the acknowledgement of the desired version
// that pk, just written to cl, carries (see the top of this file).
func (e *Embedded) iothubSent(cl *mqtt.Client, pk packets.Packet) {
	v, ok := strings.CutPrefix(pk.Origin, iothubAckOrigin)
	if !ok {
		return
	}
	version, err := strconv.ParseInt(v, 10, 64)
	deviceID := e.deviceOf(cl)
	if err != nil || deviceID == "" {
		return
	}
	e.handler(Message{
		Inbound:  protocol.Inbound{DeviceID: deviceID, Kind: protocol.KindAck},
		Payload:  fmt.Appendf(nil, `{"%s":%d}`, protocol.VersionKey, version),
		Received: time.Now(),
		Ack:      func() {},
	})
}

// OnSessionEstablish notes a persistent session the broker lost.
func (h *embeddedHook) OnSessionEstablish(cl *mqtt.Client, pk packets.Packet) {
	if !cl.Net.Inline {
		h.e.sessionEstablishing(cl, pk)
	}
}

// OnSubscribe keeps a client's "$iothub" subscriptions in its own
// namespace and refuses subscriptions in the broker's.
func (h *embeddedHook) OnSubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if cl.Net.Inline {
		return pk
	}
	return h.e.iothubFilters(cl, pk, true)
}

// OnUnsubscribe removes "$iothub" subscriptions from the client's own
// namespace.
func (h *embeddedHook) OnUnsubscribe(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if cl.Net.Inline {
		return pk
	}
	return h.e.iothubFilters(cl, pk, false)
}

// OnPacketEncode gives a message on a client's internal topic its IoT Hub
// topic.
func (h *embeddedHook) OnPacketEncode(cl *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type != packets.Publish || !strings.HasPrefix(pk.TopicName, iothubInternalRoot) {
		return pk
	}
	if topic, ok := iothubExternal(cl.ID, pk.TopicName); ok {
		pk.TopicName = topic
	}
	return pk
}

// OnPacketSent acknowledges desired versions handed to IoT Hub devices.
func (h *embeddedHook) OnPacketSent(cl *mqtt.Client, pk packets.Packet, _ []byte) {
	if pk.FixedHeader.Type != packets.Publish || cl.Net.Inline || !strings.HasPrefix(pk.Origin, iothubOrigin) {
		return
	}
	h.e.iothubSent(cl, pk)
}
