// Package protocol defines kubetwin's MQTT topic protocol between a device and
// the operator. It works on any MQTT 3.1.1 broker, and every topic a device
// uses lies under its own prefix, so a broker ACL can confine a device with
// two patterns: publish and subscribe on "kubetwin/v1/<id>/#".
//
// Topics, with <id> the escaped device id (see EscapeID) and <rid> a request
// id chosen by the device (1-64 characters, no '/', '+' or '#'):
//
//	device publishes                         payload
//	kubetwin/v1/<id>/get/<rid>               empty: get the whole twin
//	kubetwin/v1/<id>/reported/<rid>          JSON merge patch of reported properties
//	kubetwin/v1/<id>/ack                     {"$version": n}: desired version applied
//	kubetwin/v1/<id>/presence  (retained)    {"online": true} birth; {"online": false} as last will
//
//	device subscribes                        payload
//	kubetwin/v1/<id>/res/+                   Response for the request <rid>
//	kubetwin/v1/<id>/desired   (retained)    the whole desired document plus "$version"
//	kubetwin/v1/<id>/desired/patch           the change: a merge patch (null deletes) plus "$version"
//
// All of it is QoS 1. The operator answers a reported patch only after the
// patch is stored in the Kubernetes API, so a response with status 204 means
// the report is durable.
//
// The package also describes Azure IoT Hub's device-twin dialect, which
// kubetwin's embedded broker translates to and from these topics (see
// ParseIoTHubRequest, IoTHubResponse and IoTHubDesiredPatch). Its topics
// name no device, so only a broker that knows each connection's device can
// serve it.
package protocol

import (
	"encoding/json"
	"fmt"
	"strings"
)

// Root is the first topic level of every kubetwin topic.
const Root = "kubetwin/v1"

// Message kinds a device publishes.
const (
	KindGet      = "get"
	KindReported = "reported"
	KindAck      = "ack"
	KindPresence = "presence"
)

// Operator-published topic suffixes.
const (
	suffixResponse     = "res"
	suffixDesired      = "desired"
	suffixDesiredPatch = "desired/patch"
)

// MaxRequestIDLength bounds a request id.
const MaxRequestIDLength = 64

// VersionKey is the member that carries a $version in desired documents,
// patches and acknowledgements.
const VersionKey = "$version"

// Response statuses.
const (
	StatusOK         = 200 // a twin GET succeeded
	StatusNoContent  = 204 // a reported patch was stored
	StatusBadRequest = 400 // the request broke the twin rules; nothing changed
	StatusNotFound   = 404 // no DeviceTwin has this device id
	StatusTooMany    = 429 // the operator is overloaded; retry later
	StatusError      = 500 // the operator could not store the patch; retry later
)

// Response is the payload of kubetwin/v1/<id>/res/<rid>.
type Response struct {
	// Status is an HTTP-like status code.
	Status int `json:"status"`
	// Version is the new reported $version (reported patch responses).
	Version int64 `json:"version,omitempty"`
	// Desired is the whole desired document with "$version" (GET responses).
	Desired map[string]any `json:"desired,omitempty"`
	// Reported is the whole reported document with "$version" (GET responses).
	Reported map[string]any `json:"reported,omitempty"`
	// Error says what was wrong (status >= 400).
	Error string `json:"error,omitempty"`
}

// Presence is the payload of kubetwin/v1/<id>/presence.
type Presence struct {
	// Online is true in the birth message and false in the last will.
	Online bool `json:"online"`
}

// Ack is the payload of kubetwin/v1/<id>/ack.
type Ack struct {
	// Version is the desired $version the device has applied.
	Version int64 `json:"$version"`
}

// idSafe reports whether b may appear unescaped in a topic level: the IoT
// Hub device id characters except the MQTT wildcards '+' and '#' and the
// escape character '%'.
func idSafe(b byte) bool {
	switch {
	case b >= 'a' && b <= 'z', b >= 'A' && b <= 'Z', b >= '0' && b <= '9':
		return true
	}
	return strings.IndexByte("-:._*?!(),=@;$'", b) >= 0
}

// EscapeID turns a device id into one topic level: every byte other than
// letters, digits and - : . _ * ? ! ( ) , = @ ; $ ' becomes %XX (upper-case
// hex), so '+' is %2B, '#' is %23 and '%' is %25.
func EscapeID(id string) string {
	var sb strings.Builder
	for i := 0; i < len(id); i++ {
		c := id[i]
		if idSafe(c) {
			sb.WriteByte(c)
			continue
		}
		fmt.Fprintf(&sb, "%%%02X", c)
	}
	return sb.String()
}

// UnescapeID reverses EscapeID. It accepts only EscapeID's own output, so
// every device id has exactly one topic level: an escape must be upper-case
// %XX of a byte EscapeID escapes, and such a byte must not appear raw.
// Anything else is an error, since a broker ACL that matches topic levels
// literally (Mosquitto's "kubetwin/v1/%c/#") would otherwise let a client
// whose id is another spelling of a device id (say "%64ev1" for "dev1")
// publish as that device.
func UnescapeID(level string) (string, error) {
	var sb strings.Builder
	for i := 0; i < len(level); i++ {
		c := level[i]
		if c != '%' {
			if !idSafe(c) {
				return "", fmt.Errorf("topic level %q: byte %d (%q) must be escaped as %%%02X", level, i, c, c)
			}
			sb.WriteByte(c)
			continue
		}
		if i+2 >= len(level) {
			return "", fmt.Errorf("topic level %q: truncated %%-escape at byte %d", level, i)
		}
		hi, lo := unhex(level[i+1]), unhex(level[i+2])
		if hi < 0 || lo < 0 {
			return "", fmt.Errorf("topic level %q: bad %%-escape %q at byte %d (want %%XX, X an upper-case hex digit)", level, level[i:i+3], i)
		}
		v := byte(hi<<4 | lo)
		if idSafe(v) {
			return "", fmt.Errorf("topic level %q: %%-escape %q at byte %d stands for %q, which must not be escaped", level, level[i:i+3], i, v)
		}
		sb.WriteByte(v)
		i += 2
	}
	return sb.String(), nil
}

// unhex is the value of an upper-case hex digit, or -1.
func unhex(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

// DevicePrefix is the topic prefix of one device: kubetwin/v1/<id>.
func DevicePrefix(deviceID string) string { return Root + "/" + EscapeID(deviceID) }

// GetTopic is the topic a device publishes a twin GET on.
func GetTopic(deviceID, rid string) string { return DevicePrefix(deviceID) + "/" + KindGet + "/" + rid }

// ReportedTopic is the topic a device publishes a reported patch on.
func ReportedTopic(deviceID, rid string) string {
	return DevicePrefix(deviceID) + "/" + KindReported + "/" + rid
}

// AckTopic is the topic a device acknowledges a desired version on.
func AckTopic(deviceID string) string { return DevicePrefix(deviceID) + "/" + KindAck }

// PresenceTopic is the topic of a device's birth message and last will.
func PresenceTopic(deviceID string) string { return DevicePrefix(deviceID) + "/" + KindPresence }

// ResponseTopic is the topic the operator answers request rid on.
func ResponseTopic(deviceID, rid string) string {
	return DevicePrefix(deviceID) + "/" + suffixResponse + "/" + rid
}

// ResponseFilter is the filter a device subscribes to for its responses.
func ResponseFilter(deviceID string) string {
	return DevicePrefix(deviceID) + "/" + suffixResponse + "/+"
}

// DesiredTopic is the retained topic holding the whole desired document.
func DesiredTopic(deviceID string) string { return DevicePrefix(deviceID) + "/" + suffixDesired }

// DesiredPatchTopic is the topic of desired-change notifications.
func DesiredPatchTopic(deviceID string) string {
	return DevicePrefix(deviceID) + "/" + suffixDesiredPatch
}

// DesiredFilter is the filter a device subscribes to for its desired
// document and notifications (it matches both DesiredTopic and DesiredPatchTopic).
func DesiredFilter(deviceID string) string {
	return DevicePrefix(deviceID) + "/" + suffixDesired + "/#"
}

// OperatorFilters are the filters the operator subscribes to.
func OperatorFilters() []string {
	return []string{
		Root + "/+/" + KindGet + "/+",
		Root + "/+/" + KindReported + "/+",
		Root + "/+/" + KindAck,
		Root + "/+/" + KindPresence,
	}
}

// Inbound is a device-published topic, parsed.
type Inbound struct {
	DeviceID  string
	Kind      string // KindGet, KindReported, KindAck or KindPresence
	RequestID string // for KindGet and KindReported
}

// ParseInbound parses a topic a device publishes on. It returns an error
// that names the problem for topics outside the protocol.
func ParseInbound(topic string) (Inbound, error) {
	rest, ok := strings.CutPrefix(topic, Root+"/")
	if !ok {
		return Inbound{}, fmt.Errorf("topic %q is not under %s/", topic, Root)
	}
	parts := strings.Split(rest, "/")
	id, err := UnescapeID(parts[0])
	if err != nil {
		return Inbound{}, err
	}
	if id == "" {
		return Inbound{}, fmt.Errorf("topic %q has an empty device id", topic)
	}
	in := Inbound{DeviceID: id}
	switch {
	case len(parts) == 3 && (parts[1] == KindGet || parts[1] == KindReported):
		in.Kind, in.RequestID = parts[1], parts[2]
		if err := ValidateRequestID(in.RequestID); err != nil {
			return Inbound{}, fmt.Errorf("topic %q: %w", topic, err)
		}
	case len(parts) == 2 && (parts[1] == KindAck || parts[1] == KindPresence):
		in.Kind = parts[1]
	default:
		return Inbound{}, fmt.Errorf("topic %q is not a device request (want %s/<id>/{get,reported}/<rid>, ack or presence)", topic, Root)
	}
	return in, nil
}

// ValidateRequestID checks a request id.
func ValidateRequestID(rid string) error {
	if rid == "" || len(rid) > MaxRequestIDLength {
		return fmt.Errorf("request id must be 1-%d characters, got %d", MaxRequestIDLength, len(rid))
	}
	if strings.ContainsAny(rid, "/+#\x00") {
		return fmt.Errorf("request id %q must not contain '/', '+', '#' or NUL", rid)
	}
	return nil
}

// WithVersion returns a copy of doc with "$version" set to v.
func WithVersion(doc map[string]any, v int64) map[string]any {
	out := make(map[string]any, len(doc)+1)
	for k, val := range doc {
		out[k] = val
	}
	out[VersionKey] = v
	return out
}

// SplitVersion reads "$version" out of a desired document or patch and
// returns the rest. A missing or non-integer $version is an error.
func SplitVersion(payload []byte) (map[string]any, int64, error) {
	var doc map[string]any
	dec := json.NewDecoder(strings.NewReader(string(payload)))
	dec.UseNumber()
	if err := dec.Decode(&doc); err != nil {
		return nil, 0, fmt.Errorf("payload is not a JSON object: %w", err)
	}
	raw, ok := doc[VersionKey]
	if !ok {
		return nil, 0, fmt.Errorf("payload has no %q", VersionKey)
	}
	n, ok := raw.(json.Number)
	if !ok {
		return nil, 0, fmt.Errorf("%q is not a number", VersionKey)
	}
	v, err := n.Int64()
	if err != nil {
		return nil, 0, fmt.Errorf("%q is not an integer: %w", VersionKey, err)
	}
	delete(doc, VersionKey)
	return doc, v, nil
}

// DevicePublishFilters are the topics a device may publish on, as MQTT
// filters: its twin GETs and reported patches, its acknowledgements and its
// presence. A broker ACL built from them (and DeviceSubscribeFilters)
// confines a device to its own twin.
func DevicePublishFilters(deviceID string) []string {
	p := DevicePrefix(deviceID)
	return []string{p + "/" + KindGet + "/+", p + "/" + KindReported + "/+", p + "/" + KindAck, p + "/" + KindPresence}
}

// DeviceSubscribeFilters are the filters a device may subscribe to (or to
// narrower ones): its responses, its desired document and notifications,
// and its own presence (see docs/protocol.md#presence).
func DeviceSubscribeFilters(deviceID string) []string {
	return []string{ResponseFilter(deviceID), DesiredFilter(deviceID), PresenceTopic(deviceID)}
}

// DeviceMayPublish reports whether a device may publish on topic: on one
// of DevicePublishFilters, or on one of the two IoT Hub twin request topics
// (see ParseIoTHubRequest), which carry no device id because a broker that
// speaks the IoT Hub dialect knows the device from its connection.
// DevicePublishFilters does not list those: only such a broker may allow
// them.
func DeviceMayPublish(deviceID, topic string) bool {
	if strings.ContainsAny(topic, "+#") {
		return false
	}
	if iothubRequestKind(topic) != "" {
		return true
	}
	for _, f := range DevicePublishFilters(deviceID) {
		if FilterCovers(f, topic) {
			return true
		}
	}
	return false
}

// DeviceMayReceive reports whether a device may subscribe to filter (or
// receive a message on the topic filter): whether every topic it matches is
// one the operator or the device itself sends to the device. That includes
// the IoT Hub twin topics (IoTHubResponseFilter, IoTHubDesiredFilter),
// which a broker that speaks the IoT Hub dialect sends a device only the
// messages meant for it on; DeviceSubscribeFilters does not list those.
func DeviceMayReceive(deviceID, filter string) bool {
	for _, f := range DeviceSubscribeFilters(deviceID) {
		if FilterCovers(f, filter) {
			return true
		}
	}
	return FilterCovers(IoTHubResponseFilter, filter) || FilterCovers(IoTHubDesiredFilter, filter)
}

// FilterCovers reports whether every topic that matches filter (an MQTT
// topic filter, or a topic name) also matches acl (a filter).
func FilterCovers(acl, filter string) bool {
	a, f := strings.Split(acl, "/"), strings.Split(filter, "/")
	for i, al := range a {
		switch {
		case al == "#":
			return true // the rest, including nothing: "x/#" matches "x"
		case i >= len(f):
			return false
		case f[i] == "#":
			return false // filter reaches levels acl does not allow
		case al == "+":
			// any one level, a '+' of the filter included
		case f[i] != al:
			return false // another literal, or a '+' where acl has a literal
		}
	}
	return len(f) == len(a)
}
