package protocol

// This file describes Azure IoT Hub's device-twin MQTT dialect, which
// unmodified IoT Hub device SDKs speak, and translates between it and
// kubetwin's own topics. IoT Hub topics carry no device id: the device is
// the MQTT connection that sends or receives them, and a request id travels
// as the query parameter "$rid".
//
//	device publishes                                          payload
//	$iothub/twin/GET/?$rid=<rid>                              anything (ignored): get the whole twin
//	$iothub/twin/PATCH/properties/reported/?$rid=<rid>        JSON merge patch of reported properties
//
//	device subscribes                                         payload
//	$iothub/twin/res/#                                        responses (below)
//	$iothub/twin/PATCH/properties/desired/#                   desired changes (below)
//
//	the device receives                                       payload
//	$iothub/twin/res/200/?$rid=<rid>                          {"desired":{...,"$version":n},"reported":{...,"$version":m}}
//	$iothub/twin/res/204/?$rid=<rid>&$version=<m>             empty: the reported patch is stored as version m
//	$iothub/twin/res/<status>/?$rid=<rid>                     {"errorCode":<code>,"message":"..."} (status >= 400)
//	$iothub/twin/PATCH/properties/desired/?$version=<n>       the change: a merge patch (null deletes) plus "$version"

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"
)

// IoTHubRoot is the first topic level of every IoT Hub topic.
const IoTHubRoot = "$iothub"

// The filters an IoT Hub device subscribes to for twin traffic. A device
// may subscribe to them, or to narrower filters under them.
const (
	// IoTHubResponseFilter matches the responses to a device's requests.
	IoTHubResponseFilter = "$iothub/twin/res/#"
	// IoTHubDesiredFilter matches the desired-change notifications.
	IoTHubDesiredFilter = "$iothub/twin/PATCH/properties/desired/#"
)

// Topic paths of the dialect: everything before the query ('?').
const (
	iothubGetPath          = "$iothub/twin/GET/"
	iothubReportedPath     = "$iothub/twin/PATCH/properties/reported/"
	iothubResponsePrefix   = "$iothub/twin/res/"
	iothubDesiredPatchPath = "$iothub/twin/PATCH/properties/desired/"
)

// Query parameters of the dialect.
const (
	iothubRequestIDParam = "$rid"
	iothubVersionParam   = "$version"
)

// IoT Hub error codes ("errorCode" in an error response) of the statuses the
// operator answers with. Any other status s has the code s*1000+1.
const (
	IoTHubErrorArgumentInvalid = 400004 // StatusBadRequest
	IoTHubErrorDeviceNotFound  = 404001 // StatusNotFound
	IoTHubErrorThrottling      = 429001 // StatusTooMany
	IoTHubErrorServerError     = 500001 // StatusError
)

// ErrNotIoTHubRequest is returned (wrapped) by ParseIoTHubRequest for a
// topic that is not one of the two IoT Hub twin request topics.
var ErrNotIoTHubRequest = errors.New("not an IoT Hub twin request topic")

// IsIoTHubTopic reports whether topic (or filter) lies in the IoT Hub
// dialect's namespace, "$iothub" or below it.
func IsIoTHubTopic(topic string) bool {
	rest, ok := strings.CutPrefix(topic, IoTHubRoot)
	return ok && (rest == "" || rest[0] == '/')
}

// iothubRequestKind is the Kind of the twin request topic (KindGet or
// KindReported), judged by its path alone, or "" for any other topic.
func iothubRequestKind(topic string) string {
	path, _, _ := strings.Cut(topic, "?")
	switch path {
	case iothubGetPath:
		return KindGet
	case iothubReportedPath:
		return KindReported
	}
	return ""
}

// IoTHubRequest is an IoT Hub twin request topic, parsed.
type IoTHubRequest struct {
	// Kind is KindGet or KindReported.
	Kind string
	// RequestID is the "$rid" query parameter, percent-decoded.
	RequestID string
}

// ParseIoTHubRequest parses a topic an IoT Hub device publishes a twin
// request on: "$iothub/twin/GET/?$rid=<rid>" or
// "$iothub/twin/PATCH/properties/reported/?$rid=<rid>". The query may
// hold other parameters, in any order, and may be percent-encoded.
//
// For any other topic it returns an error wrapping ErrNotIoTHubRequest and
// a zero IoTHubRequest. For a request topic whose query is malformed or
// whose $rid is missing, repeated or not a valid request id (see
// ValidateRequestID; it must also be UTF-8), it returns an error together
// with the request's Kind and, if there was exactly one, its RequestID as
// sent, so that the caller can answer it with status 400.
func ParseIoTHubRequest(topic string) (IoTHubRequest, error) {
	kind := iothubRequestKind(topic)
	if kind == "" {
		return IoTHubRequest{}, fmt.Errorf("%w: %q", ErrNotIoTHubRequest, topic)
	}
	req := IoTHubRequest{Kind: kind}
	_, query, _ := strings.Cut(topic, "?")
	values, err := url.ParseQuery(query)
	if err != nil {
		return req, fmt.Errorf("topic %q: malformed query: %w", topic, err)
	}
	switch rids := values[iothubRequestIDParam]; len(rids) {
	case 0:
		return req, fmt.Errorf("topic %q has no %s query parameter", topic, iothubRequestIDParam)
	case 1:
		req.RequestID = rids[0]
	default:
		return req, fmt.Errorf("topic %q has %d %s query parameters, want one", topic, len(rids), iothubRequestIDParam)
	}
	if !utf8.ValidString(req.RequestID) {
		return req, fmt.Errorf("topic %q: request id is not UTF-8", topic)
	}
	if err := ValidateRequestID(req.RequestID); err != nil {
		return req, fmt.Errorf("topic %q: %w", topic, err)
	}
	return req, nil
}

// escapeQueryValue percent-encodes every byte of s but the URL unreserved
// characters (letters, digits, - . _ ~), so that the result is one query
// value for any query parser and holds neither '+' nor '#', which an MQTT
// topic name must not contain. (url.QueryEscape turns ' ' into '+'.)
func escapeQueryValue(s string) string {
	const hex = "0123456789ABCDEF"
	var sb strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '.', c == '_', c == '~':
			sb.WriteByte(c)
		default:
			sb.WriteByte('%')
			sb.WriteByte(hex[c>>4])
			sb.WriteByte(hex[c&0xF])
		}
	}
	return sb.String()
}

// IoTHubResponseTopic is the topic of the response with status to the
// request rid: "$iothub/twin/res/<status>/?$rid=<rid>", with the request
// id percent-encoded.
func IoTHubResponseTopic(status int, rid string) string {
	return iothubResponsePrefix + strconv.Itoa(status) + "/?" + iothubRequestIDParam + "=" + escapeQueryValue(rid)
}

// IoTHubDesiredPatchTopic is the topic of the desired-change notification
// with version: "$iothub/twin/PATCH/properties/desired/?$version=<n>".
func IoTHubDesiredPatchTopic(version int64) string {
	return iothubDesiredPatchPath + "?" + iothubVersionParam + "=" + strconv.FormatInt(version, 10)
}

// IoTHubMessage is a message for an IoT Hub device: the translation of a
// message the operator publishes on a kubetwin topic.
type IoTHubMessage struct {
	// Topic is the IoT Hub topic.
	Topic string
	// Payload is the message body; empty for a 204 response.
	Payload []byte
	// DesiredVersion is the desired "$version" the message hands the
	// device: that of a desired patch, or of the desired document in a GET
	// response. Zero if none.
	DesiredVersion int64
}

// IoTHubErrorCode is the IoT Hub error code of a response status:
// IoTHubErrorArgumentInvalid for StatusBadRequest, IoTHubErrorDeviceNotFound
// for StatusNotFound, IoTHubErrorThrottling for StatusTooMany,
// IoTHubErrorServerError for StatusError, and status*1000+1 for any other.
func IoTHubErrorCode(status int) int {
	switch status {
	case StatusBadRequest:
		return IoTHubErrorArgumentInvalid
	case StatusNotFound:
		return IoTHubErrorDeviceNotFound
	case StatusTooMany:
		return IoTHubErrorThrottling
	case StatusError:
		return IoTHubErrorServerError
	}
	return status*1000 + 1
}

// iothubErrorBody is the payload of an IoT Hub error response.
type iothubErrorBody struct {
	ErrorCode int    `json:"errorCode"`
	Message   string `json:"message"`
}

// IoTHubError is the error response with status to the request rid: topic
// "$iothub/twin/res/<status>/?$rid=<rid>" and payload
// {"errorCode":<IoTHubErrorCode(status)>,"message":<message>}. IoT Hub SDKs
// fail on a response payload that is not JSON, so it always is; an empty
// message is replaced by a generic one.
func IoTHubError(status int, rid, message string) IoTHubMessage {
	if message == "" {
		message = fmt.Sprintf("request failed with status %d", status)
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	// Encoding a struct of an int and a string cannot fail.
	_ = enc.Encode(iothubErrorBody{ErrorCode: IoTHubErrorCode(status), Message: message})
	return IoTHubMessage{
		Topic:   IoTHubResponseTopic(status, rid),
		Payload: bytes.TrimSuffix(buf.Bytes(), []byte("\n")),
	}
}

// rawResponse is a Response as it is decoded for translation: the
// documents stay raw JSON, so that no number passes through a float64.
type rawResponse struct {
	Status   int             `json:"status"`
	Version  json.Number     `json:"version"`
	Desired  json.RawMessage `json:"desired"`
	Reported json.RawMessage `json:"reported"`
	Error    string          `json:"error"`
}

// IoTHubResponse translates the payload of kubetwin/v1/<id>/res/<rid> (a
// JSON Response) into the IoT Hub response to the request rid:
//
//   - StatusOK: status 200 with {"desired":<Desired>,"reported":<Reported>},
//     both documents byte for byte as in the Response (compacted), "{}"
//     if absent; DesiredVersion is the desired "$version".
//   - StatusNoContent: status 204 with "&$version=<Version>" added to the
//     topic and an empty payload.
//   - any other status: IoTHubError(status, rid, Error).
//
// It returns an error if response is not a Response (not JSON, a status
// outside 100-999, a document that is not a JSON object, a $version or
// version that is not an integer).
func IoTHubResponse(rid string, response []byte) (IoTHubMessage, error) {
	var r rawResponse
	if err := json.Unmarshal(response, &r); err != nil {
		return IoTHubMessage{}, fmt.Errorf("response is not a JSON Response: %w", err)
	}
	if r.Status < 100 || r.Status > 999 {
		return IoTHubMessage{}, fmt.Errorf("response has status %d, want 100-999", r.Status)
	}
	switch r.Status {
	case StatusOK:
		var buf bytes.Buffer
		buf.WriteString(`{"desired":`)
		desiredVersion, err := appendTwinDocument(&buf, "desired", r.Desired)
		if err != nil {
			return IoTHubMessage{}, err
		}
		buf.WriteString(`,"reported":`)
		if _, err := appendTwinDocument(&buf, "reported", r.Reported); err != nil {
			return IoTHubMessage{}, err
		}
		buf.WriteByte('}')
		return IoTHubMessage{Topic: IoTHubResponseTopic(StatusOK, rid), Payload: buf.Bytes(), DesiredVersion: desiredVersion}, nil
	case StatusNoContent:
		var version int64
		if r.Version != "" {
			v, err := strconv.ParseInt(r.Version.String(), 10, 64)
			if err != nil {
				return IoTHubMessage{}, fmt.Errorf("response version %s is not an integer", r.Version)
			}
			version = v
		}
		topic := IoTHubResponseTopic(StatusNoContent, rid) + "&" + iothubVersionParam + "=" + strconv.FormatInt(version, 10)
		return IoTHubMessage{Topic: topic}, nil
	}
	return IoTHubError(r.Status, rid, r.Error), nil
}

// appendTwinDocument appends doc, a JSON object, compacted ("{}" if doc is
// absent or null) and returns its "$version" (0 if it has none). name
// names the document in errors.
func appendTwinDocument(buf *bytes.Buffer, name string, doc json.RawMessage) (int64, error) {
	if len(doc) == 0 || string(doc) == "null" {
		buf.WriteString("{}")
		return 0, nil
	}
	var members map[string]json.RawMessage
	if err := json.Unmarshal(doc, &members); err != nil {
		return 0, fmt.Errorf("response %s document is not a JSON object: %w", name, err)
	}
	var version int64
	if raw, ok := members[VersionKey]; ok {
		v, err := strconv.ParseInt(string(raw), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("response %s %q is %s, not an integer", name, VersionKey, raw)
		}
		version = v
	}
	if err := writeVersionLast(buf, members); err != nil {
		return 0, fmt.Errorf("response %s document: %w", name, err)
	}
	return version, nil
}

// writeVersionLast writes a JSON object's members compacted, in key order
// but with "$version" last, where IoT Hub puts it (so what SDK programs
// print matches what they print against IoT Hub).
func writeVersionLast(buf *bytes.Buffer, members map[string]json.RawMessage) error {
	keys := make([]string, 0, len(members))
	for k := range members {
		if k != VersionKey {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	if _, ok := members[VersionKey]; ok {
		keys = append(keys, VersionKey)
	}
	buf.WriteByte('{')
	for i, k := range keys {
		if i > 0 {
			buf.WriteByte(',')
		}
		name, err := json.Marshal(k)
		if err != nil {
			return err
		}
		buf.Write(name)
		buf.WriteByte(':')
		if err := json.Compact(buf, members[k]); err != nil {
			return err
		}
	}
	buf.WriteByte('}')
	return nil
}

// IoTHubDesiredPatch translates the payload of kubetwin/v1/<id>/desired/patch
// (a merge patch plus "$version") into the IoT Hub notification: topic
// IoTHubDesiredPatchTopic(n) and the payload unchanged, nulls included.
// It returns an error if patch is not a JSON object with an integer
// "$version".
func IoTHubDesiredPatch(patch []byte) (IoTHubMessage, error) {
	var members map[string]json.RawMessage
	if err := json.Unmarshal(patch, &members); err != nil {
		return IoTHubMessage{}, fmt.Errorf("desired patch is not a JSON object: %w", err)
	}
	raw, ok := members[VersionKey]
	if !ok {
		return IoTHubMessage{}, fmt.Errorf("desired patch has no %q", VersionKey)
	}
	version, err := strconv.ParseInt(string(raw), 10, 64)
	if err != nil {
		return IoTHubMessage{}, fmt.Errorf("desired patch %q is %s, not an integer", VersionKey, raw)
	}
	var buf bytes.Buffer
	if err := writeVersionLast(&buf, members); err != nil {
		return IoTHubMessage{}, fmt.Errorf("desired patch: %w", err)
	}
	return IoTHubMessage{Topic: IoTHubDesiredPatchTopic(version), Payload: buf.Bytes(), DesiredVersion: version}, nil
}

// Operator-published topic kinds (Outbound.Kind).
const (
	// OutboundResponse is kubetwin/v1/<id>/res/<rid>.
	OutboundResponse = "response"
	// OutboundDesired is kubetwin/v1/<id>/desired.
	OutboundDesired = "desired"
	// OutboundDesiredPatch is kubetwin/v1/<id>/desired/patch.
	OutboundDesiredPatch = "desiredPatch"
)

// Outbound is an operator-published topic, parsed.
type Outbound struct {
	DeviceID  string
	Kind      string // OutboundResponse, OutboundDesired or OutboundDesiredPatch
	RequestID string // for OutboundResponse
}

// ParseOutbound parses a topic the operator publishes on (ResponseTopic,
// DesiredTopic, DesiredPatchTopic). It returns an error for any other
// topic.
func ParseOutbound(topic string) (Outbound, error) {
	rest, ok := strings.CutPrefix(topic, Root+"/")
	if !ok {
		return Outbound{}, fmt.Errorf("topic %q is not under %s/", topic, Root)
	}
	level, rest, _ := strings.Cut(rest, "/")
	id, err := UnescapeID(level)
	if err != nil {
		return Outbound{}, err
	}
	if id == "" {
		return Outbound{}, fmt.Errorf("topic %q has an empty device id", topic)
	}
	out := Outbound{DeviceID: id}
	switch {
	case rest == suffixDesired:
		out.Kind = OutboundDesired
	case rest == suffixDesiredPatch:
		out.Kind = OutboundDesiredPatch
	case strings.HasPrefix(rest, suffixResponse+"/"):
		out.Kind, out.RequestID = OutboundResponse, strings.TrimPrefix(rest, suffixResponse+"/")
		if err := ValidateRequestID(out.RequestID); err != nil {
			return Outbound{}, fmt.Errorf("topic %q: %w", topic, err)
		}
	default:
		return Outbound{}, fmt.Errorf("topic %q is not an operator topic (want %s/<id>/{res/<rid>,desired,desired/patch})", topic, Root)
	}
	return out, nil
}
