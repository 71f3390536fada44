package hubapi

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// maxPlainName is the longest device id used as a DeviceTwin name as is.
// It keeps names short enough for a label value and for the key Secret's
// name (<twin name>-device-key).
const maxPlainName = 63

// maxNamePrefix is the longest readable prefix of a derived name.
const maxNamePrefix = 40

// TwinName returns the name of the DeviceTwin that the API creates for a
// device id (spec.deviceId always holds the id itself, so lookups go by
// id, never by name):
//
//   - an id that is a valid object name (a lower-case DNS-1123 subdomain:
//     a-z, 0-9, '-' and '.', starting and ending with a letter or digit)
//     of at most 63 characters is the name;
//   - any other id gets a readable prefix (the id in lower case, every run
//     of other characters turned into one '-', at most 40 characters,
//     "device" when nothing is left) plus '-' and the first 10 hex digits
//     of the SHA-256 of the id, so ids that differ only in case or in
//     special characters ("MyDevice", "my:device") get different names.
//
// A derived name could in theory equal the name of another device whose
// id is exactly that name; creating the second device then fails with a
// conflict that names the first, and nothing is overwritten.
func TwinName(deviceID string) string {
	if len(deviceID) <= maxPlainName && len(validation.IsDNS1123Subdomain(deviceID)) == 0 {
		return deviceID
	}
	var b strings.Builder
	dash := false
	for _, r := range strings.ToLower(deviceID) {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			b.WriteRune(r)
			dash = false
		} else if !dash && b.Len() > 0 {
			b.WriteByte('-')
			dash = true
		}
		if b.Len() >= maxNamePrefix {
			break
		}
	}
	prefix := strings.TrimRight(b.String(), "-")
	if prefix == "" {
		prefix = "device"
	}
	sum := sha256.Sum256([]byte(deviceID))
	return prefix + "-" + hex.EncodeToString(sum[:5])
}
