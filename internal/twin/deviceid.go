package twin

import (
	"fmt"
	"strconv"
	"unicode/utf8"
)

// MaxDeviceIDLength is the longest device id, in characters.
const MaxDeviceIDLength = 128

// DeviceIDSpecials are the characters a device id may hold besides ASCII
// letters and digits: the Azure IoT Hub device id character set.
const DeviceIDSpecials = "-:.+%_#*?!(),=@;$'"

// ValidateDeviceID checks a device id against the IoT Hub rules: 1 to
// MaxDeviceIDLength characters, each an ASCII letter or digit or one of
// - : . + % _ # * ? ! ( ) , = @ ; $ ' (case-sensitive). path says where the
// id comes from, e.g. "spec.deviceId". It returns nil or an [*Error] at
// path whose rule is one of
//
//   - "device id must not be empty";
//   - "device id is 129 characters, more than the 128 allowed";
//   - "device id must not contain '/' (allowed: ASCII letters, digits and
//   - : . + % _ # * ? ! ( ) , = @ ; $ ')", naming the first bad character.
//
// The DeviceTwin CRD states the same rule as a schema pattern; this is the
// check for code paths the schema does not cover (metadata.name used as
// the id, the webhook, device-facing front ends).
func ValidateDeviceID(path, id string) error {
	fail := func(format string, args ...any) error {
		return &Error{Path: path, Rule: fmt.Sprintf(format, args...)}
	}
	if id == "" {
		return fail("device id must not be empty")
	}
	if n := utf8.RuneCountInString(id); n > MaxDeviceIDLength {
		return fail("device id is %d characters, more than the %d allowed", n, MaxDeviceIDLength)
	}
	for i, r := range id {
		if r < utf8.RuneSelf && deviceIDByte(byte(r)) {
			continue
		}
		what := strconv.QuoteRune(r)
		if r == utf8.RuneError {
			if _, size := utf8.DecodeRuneInString(id[i:]); size == 1 {
				what = fmt.Sprintf("byte 0x%02x (invalid UTF-8)", id[i])
			}
		}
		return fail("device id must not contain %s (allowed: ASCII letters, digits and %s)", what, spaced(DeviceIDSpecials))
	}
	return nil
}

// deviceIDByte reports whether c may appear in a device id.
func deviceIDByte(c byte) bool {
	if isAlnum(c) {
		return true
	}
	for i := 0; i < len(DeviceIDSpecials); i++ {
		if DeviceIDSpecials[i] == c {
			return true
		}
	}
	return false
}

// spaced returns the characters of s separated by spaces.
func spaced(s string) string {
	b := make([]byte, 0, 2*len(s))
	for i := 0; i < len(s); i++ {
		if i > 0 {
			b = append(b, ' ')
		}
		b = append(b, s[i])
	}
	return string(b)
}
