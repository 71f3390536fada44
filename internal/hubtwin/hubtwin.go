// Package hubtwin renders a DeviceTwin as the twin JSON document of Azure IoT
// Hub (GET /twins/{id}), the shape its service SDKs parse and the query
// language runs over:
//
//	{
//	  "deviceId": "myDeviceId",
//	  "etag": "MTIzNA==",
//	  "version": 7,
//	  "status": "enabled",
//	  "statusUpdateTime": "0001-01-01T00:00:00Z",
//	  "connectionState": "Disconnected",
//	  "connectionStateUpdatedTime": "0001-01-01T00:00:00Z",
//	  "lastActivityTime": "0001-01-01T00:00:00Z",
//	  "cloudToDeviceMessageCount": 0,
//	  "authenticationType": "sas",
//	  "capabilities": {"iotEdge": false},
//	  "tags": {...},
//	  "properties": {
//	    "desired":  {..., "$version": 3, "$metadata": {"$lastUpdated": "...", "$lastUpdatedVersion": 3, ...}},
//	    "reported": {..., "$version": 5, "$metadata": {"$lastUpdated": "...", ...}}
//	  }
//	}
//
// Documents are in twin.Doc form: numbers are json.Number, objects are
// map[string]any.
package hubtwin

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"time"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// Fixed values of the twin document.
const (
	// StatusEnabled is the device status of a twin whose spec.status is
	// unset or enabled; otherwise the document carries spec.status.
	StatusEnabled = "enabled"
	// AuthenticationTypeSAS is the authentication type: shared access keys.
	AuthenticationTypeSAS = "sas"
	// ZeroTime is how IoT Hub writes a time that never happened.
	ZeroTime = "0001-01-01T00:00:00Z"
)

// FromDeviceTwin returns the IoT Hub twin document of t. The members are:
//
//   - deviceId: status.deviceId, else t.EffectiveDeviceID().
//   - etag: [ETag] of metadata.resourceVersion, which changes with every
//     write to the object.
//   - version: [Version]: metadata.generation (at least 1) plus
//     status.reportedVersion, so it grows with every change of tags,
//     desired or reported properties and never decreases.
//   - status: spec.status ("enabled" when unset), and statusUpdateTime
//     (always [ZeroTime]).
//   - connectionState: status.connectionState, "Disconnected" when unset;
//     connectionStateUpdatedTime and lastActivityTime in RFC 3339 (UTC), or
//     [ZeroTime] when unknown, as IoT Hub writes them.
//   - cloudToDeviceMessageCount 0, authenticationType "sas",
//     capabilities {"iotEdge": false}.
//   - tags: spec.tags.
//   - properties.desired: spec.desired plus "$version" (status.desiredVersion)
//     and "$metadata" (status.metadata.desired, or a root node stamped with
//     the creation time when the operator has written none yet).
//   - properties.reported: status.reported plus "$version"
//     (status.reportedVersion) and "$metadata" (status.metadata.reported, or
//     a root node likewise).
//   - configurations: {"<name>": {"status": "Targeted" | "Applied"}} from the
//     twin's labels configurations.kubetwin.io/<name> (IoT Hub's
//     configurations.[[id]].status); left out when the twin has none.
//
// A section that does not hold a JSON object (which the CRD schema and the
// operator's validation prevent) is rendered as an empty object. The result
// shares nothing with t.
func FromDeviceTwin(t *v1alpha1.DeviceTwin) map[string]any {
	deviceID := DeviceID(t)
	connectionState, created, metaDesired, metaReported := derived(t)

	desired := section(t.Spec.Desired)
	desired["$version"] = number(t.Status.DesiredVersion)
	dm := section(metaDesired)
	if len(dm) == 0 {
		dm = twin.Doc{twin.LastUpdatedKey: created}
		if t.Status.DesiredVersion > 0 {
			dm[twin.LastUpdatedVersionKey] = number(t.Status.DesiredVersion)
		}
	}
	desired["$metadata"] = dm

	reported := section(t.Status.Reported)
	reported["$version"] = number(t.Status.ReportedVersion)
	rm := section(metaReported)
	if len(rm) == 0 {
		rm = twin.Doc{twin.LastUpdatedKey: created}
	}
	reported["$metadata"] = rm

	doc := map[string]any{
		"deviceId":                   deviceID,
		"etag":                       ETag(t.ResourceVersion),
		"version":                    number(Version(t)),
		"status":                     deviceStatus(t),
		"statusUpdateTime":           ZeroTime,
		"connectionState":            connectionState,
		"connectionStateUpdatedTime": timeOrZero(t.Status.ConnectionStateUpdatedTime),
		"lastActivityTime":           timeOrZero(t.Status.LastActivityTime),
		"cloudToDeviceMessageCount":  json.Number("0"),
		"authenticationType":         AuthenticationTypeSAS,
		"capabilities":               map[string]any{"iotEdge": false},
		"tags":                       section(t.Spec.Tags),
		"properties": map[string]any{
			"desired":  desired,
			"reported": reported,
		},
	}
	if c := Configurations(t.Labels); c != nil {
		doc["configurations"] = c
	}
	return doc
}

// derived returns what t's document takes from its fields with defaults:
// the connection state ("Disconnected" when unset), the creation time
// (the metadata's default $lastUpdated) and the metadata sections.
func derived(t *v1alpha1.DeviceTwin) (connectionState, created string, metaDesired, metaReported *apiextensionsv1.JSON) {
	connectionState = t.Status.ConnectionState
	if connectionState == "" {
		connectionState = v1alpha1.ConnectionStateDisconnected
	}
	created = ZeroTime
	if !t.CreationTimestamp.IsZero() {
		created = t.CreationTimestamp.UTC().Format(twin.TimeFormat)
	}
	if m := t.Status.Metadata; m != nil {
		metaDesired, metaReported = m.Desired, m.Reported
	}
	return connectionState, created, metaDesired, metaReported
}

// Configurations returns the configurations member of a twin's document
// from its labels (those the configurations targeting it set), nil when
// there are none.
func Configurations(labels map[string]string) map[string]any {
	var c map[string]any
	for k, v := range labels {
		name, ok := strings.CutPrefix(k, v1alpha1.ConfigurationsLabelPrefix)
		if !ok || name == "" {
			continue
		}
		if c == nil {
			c = map[string]any{}
		}
		c[name] = map[string]any{"status": v}
	}
	return c
}

// DeviceID is the deviceId member of t's document: status.deviceId, else
// t.EffectiveDeviceID().
func DeviceID(t *v1alpha1.DeviceTwin) string {
	if t.Status.DeviceID != "" {
		return t.Status.DeviceID
	}
	return t.EffectiveDeviceID()
}

// Version returns the twin's version: metadata.generation (taken as 1 for an
// object not yet stored) plus status.reportedVersion. The generation grows
// with every change of spec (tags and desired properties) and the reported
// version with every accepted reported patch, and neither ever decreases, so
// neither does the sum.
func Version(t *v1alpha1.DeviceTwin) int64 {
	return max(t.Generation, 1) + t.Status.ReportedVersion
}

// ETag returns the etag of an object with the given resourceVersion: the
// standard base64 encoding of the resourceVersion (of "0" when it is empty),
// without quotes. It is opaque to clients; [ResourceVersion] inverts it so
// an If-Match precondition can become a resourceVersion precondition.
func ETag(resourceVersion string) string {
	if resourceVersion == "" {
		resourceVersion = "0"
	}
	return base64.StdEncoding.EncodeToString([]byte(resourceVersion))
}

// ResourceVersion returns the resourceVersion an etag was made from. The
// etag may be quoted, as it is in an If-Match header. It is an error if the
// etag is not one [ETag] could have returned.
func ResourceVersion(etag string) (string, error) {
	etag = strings.TrimSpace(etag)
	if len(etag) >= 2 && etag[0] == '"' && etag[len(etag)-1] == '"' {
		etag = etag[1 : len(etag)-1]
	}
	b, err := base64.StdEncoding.DecodeString(etag)
	if err != nil || len(b) == 0 {
		return "", errors.New("malformed etag " + strconv.Quote(etag))
	}
	return string(b), nil
}

// section decodes an optional JSON section, or returns an empty Doc when it
// is absent or not a JSON object.
func section(raw *apiextensionsv1.JSON) twin.Doc {
	if raw == nil {
		return twin.Doc{}
	}
	d, err := twin.DecodeRaw(raw.Raw)
	if err != nil {
		return twin.Doc{}
	}
	return d
}

func number(n int64) json.Number { return json.Number(strconv.FormatInt(n, 10)) }

func timeOrZero(t *metav1.Time) string {
	if t == nil || t.IsZero() {
		return ZeroTime
	}
	return t.UTC().Format(time.RFC3339)
}

// deviceStatus is spec.status, "enabled" when unset.
func deviceStatus(t *v1alpha1.DeviceTwin) string {
	if t.Spec.Status == "" {
		return StatusEnabled
	}
	return string(t.Spec.Status)
}
