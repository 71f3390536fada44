package hubtwin

import (
	"bytes"
	"strconv"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// AppendJSON appends the document [FromDeviceTwin] returns, as compact
// JSON, to b: the same document, written without building it. The
// members of the document are in name order, as encoding/json writes a
// map; the sections (tags, desired and reported properties, their
// metadata) are copied as the object holds them, and "$metadata" and
// "$version" are put first in desired and reported, where name order puts
// them.
//
// A query's answer of a whole fleet is mostly these documents: rendering
// them this way instead of as maps to encode takes a small part of the
// time and memory.
//
// The sections are taken to be valid JSON, as they are in an object
// decoded from the API server (the operator's cache). A section that is
// not a JSON object, or whose properties would collide with "$metadata"
// or "$version", is rendered as FromDeviceTwin renders it (through a
// Doc).
func AppendJSON(b []byte, t *v1alpha1.DeviceTwin) []byte {
	return AppendMembers(b, t, nil)
}

// AppendMembers appends what AppendJSON does with only the document's
// root members that keep allows (nil: all of them). A projection of a few
// paths of many twins renders only what its paths start with.
func AppendMembers(b []byte, t *v1alpha1.DeviceTwin, keep func(member string) bool) []byte {
	connectionState, created, metaDesired, metaReported := derived(t)
	// Each member is written after a comma; the first comma becomes the
	// opening brace.
	start := len(b)
	if keep == nil || keep("authenticationType") {
		b = append(b, `,"authenticationType":"sas"`...)
	}
	if keep == nil || keep("capabilities") {
		b = append(b, `,"capabilities":{"iotEdge":false}`...)
	}
	if keep == nil || keep("cloudToDeviceMessageCount") {
		b = append(b, `,"cloudToDeviceMessageCount":0`...)
	}
	if c := Configurations(t.Labels); c != nil && (keep == nil || keep("configurations")) {
		b = append(b, `,"configurations":`...)
		b = append(b, twin.Encode(c)...)
	}
	if keep == nil || keep("connectionState") {
		b = twin.AppendString(append(b, `,"connectionState":`...), connectionState)
	}
	if keep == nil || keep("connectionStateUpdatedTime") {
		b = twin.AppendString(append(b, `,"connectionStateUpdatedTime":`...), timeOrZero(t.Status.ConnectionStateUpdatedTime))
	}
	if keep == nil || keep("deviceId") {
		b = twin.AppendString(append(b, `,"deviceId":`...), DeviceID(t))
	}
	if keep == nil || keep("etag") {
		b = twin.AppendString(append(b, `,"etag":`...), ETag(t.ResourceVersion))
	}
	if keep == nil || keep("lastActivityTime") {
		b = twin.AppendString(append(b, `,"lastActivityTime":`...), timeOrZero(t.Status.LastActivityTime))
	}
	if keep == nil || keep("properties") {
		b = append(b, `,"properties":{"desired":`...)
		b = appendSection(b, t.Spec.Desired, metaDesired, t.Status.DesiredVersion, created, true)
		b = append(b, `,"reported":`...)
		b = appendSection(b, t.Status.Reported, metaReported, t.Status.ReportedVersion, created, false)
		b = append(b, '}')
	}
	if keep == nil || keep("status") {
		b = twin.AppendString(append(b, `,"status":`...), deviceStatus(t))
	}
	if keep == nil || keep("statusUpdateTime") {
		b = append(b, `,"statusUpdateTime":"`+ZeroTime+`"`...)
	}
	if keep == nil || keep("tags") {
		b = append(b, `,"tags":`...)
		if body, ok := objectBody(t.Spec.Tags); ok {
			b = append(append(append(b, '{'), body...), '}')
		} else {
			b = append(b, twin.Encode(section(t.Spec.Tags))...)
		}
	}
	if keep == nil || keep("version") {
		b = strconv.AppendInt(append(b, `,"version":`...), Version(t), 10)
	}
	if len(b) == start {
		return append(b, "{}"...)
	}
	b[start] = '{'
	return append(b, '}')
}

// appendSection appends a desired (versioned) or reported section with
// its "$metadata" and "$version", as FromDeviceTwin makes it.
func appendSection(b []byte, raw, meta *apiextensionsv1.JSON, version int64, created string, versioned bool) []byte {
	body, ok := objectBody(raw)
	if ok && (bytes.Contains(body, []byte(`"$metadata"`)) || bytes.Contains(body, []byte(`"$version"`))) {
		ok = false // FromDeviceTwin's keys replace them
	}
	b = append(b, `{"$metadata":`...)
	switch m, mok := objectBody(meta); {
	case mok && len(m) > 0:
		b = append(append(append(b, '{'), m...), '}')
	case mok || len(section(meta)) == 0:
		b = append(b, `{"$lastUpdated":`...)
		b = twin.AppendString(b, created)
		if versioned && version > 0 {
			b = append(b, `,"$lastUpdatedVersion":`...)
			b = strconv.AppendInt(b, version, 10)
		}
		b = append(b, '}')
	default:
		b = append(b, twin.Encode(section(meta))...)
	}
	b = append(b, `,"$version":`...)
	b = strconv.AppendInt(b, version, 10)
	if !ok {
		d := section(raw)
		delete(d, "$metadata")
		delete(d, "$version")
		if len(d) == 0 {
			return append(b, '}')
		}
		body = twin.Encode(d)
		body = body[1 : len(body)-1]
	}
	if len(body) > 0 {
		b = append(append(b, ','), body...)
	}
	return append(b, '}')
}

// objectBody returns what is between the braces of raw when raw is a JSON
// object (absent or null: an empty one), without the spaces around it.
// It is not ok for anything else.
func objectBody(raw *apiextensionsv1.JSON) ([]byte, bool) {
	if raw == nil {
		return nil, true
	}
	t := bytes.TrimSpace(raw.Raw)
	switch {
	case len(t) == 0 || string(t) == "null":
		return nil, true
	case len(t) < 2 || t[0] != '{' || t[len(t)-1] != '}':
		return nil, false
	}
	return bytes.TrimSpace(t[1 : len(t)-1]), true
}
