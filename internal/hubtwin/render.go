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
	connectionState, created, metaDesired, metaReported := derived(t)

	b = append(b, `{"authenticationType":"sas","capabilities":{"iotEdge":false},"cloudToDeviceMessageCount":0,`...)
	if c := Configurations(t.Labels); c != nil {
		b = append(b, `"configurations":`...)
		b = append(b, twin.Encode(c)...)
		b = append(b, ',')
	}
	b = append(b, `"connectionState":`...)
	b = twin.AppendString(b, connectionState)
	b = append(b, `,"connectionStateUpdatedTime":`...)
	b = twin.AppendString(b, timeOrZero(t.Status.ConnectionStateUpdatedTime))
	b = append(b, `,"deviceId":`...)
	b = twin.AppendString(b, DeviceID(t))
	b = append(b, `,"etag":`...)
	b = twin.AppendString(b, ETag(t.ResourceVersion))
	b = append(b, `,"lastActivityTime":`...)
	b = twin.AppendString(b, timeOrZero(t.Status.LastActivityTime))
	b = append(b, `,"properties":{"desired":`...)
	b = appendSection(b, t.Spec.Desired, metaDesired, t.Status.DesiredVersion, created, true)
	b = append(b, `,"reported":`...)
	b = appendSection(b, t.Status.Reported, metaReported, t.Status.ReportedVersion, created, false)
	b = append(b, `},"status":`...)
	b = twin.AppendString(b, deviceStatus(t))
	b = append(b, `,"statusUpdateTime":"`+ZeroTime+`","tags":`...)
	if body, ok := objectBody(t.Spec.Tags); ok {
		b = append(append(append(b, '{'), body...), '}')
	} else {
		b = append(b, twin.Encode(section(t.Spec.Tags))...)
	}
	b = append(b, `,"version":`...)
	b = strconv.AppendInt(b, Version(t), 10)
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
