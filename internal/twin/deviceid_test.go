package twin

import (
	"errors"
	"strings"
	"testing"
)

func TestValidateDeviceID(t *testing.T) {
	const allowed = "(allowed: ASCII letters, digits and - : . + % _ # * ? ! ( ) , = @ ; $ ')"
	tests := map[string]struct {
		id      string
		wantErr string
	}{
		"simple":              {"myDeviceId", ""},
		"every special":       {"a-:.+%_#*?!(),=@;$'z", ""},
		"only specials":       {DeviceIDSpecials, ""},
		"digits":              {"0123456789", ""},
		"128 characters":      {strings.Repeat("d", 128), ""},
		"empty":               {"", "spec.deviceId: device id must not be empty"},
		"129 characters":      {strings.Repeat("d", 129), "spec.deviceId: device id is 129 characters, more than the 128 allowed"},
		"slash":               {"bay/3", "spec.deviceId: device id must not contain '/' " + allowed},
		"space":               {"my device", "spec.deviceId: device id must not contain ' ' " + allowed},
		"control":             {"a\x01", `spec.deviceId: device id must not contain '\x01' ` + allowed},
		"non-ASCII letter":    {"café", "spec.deviceId: device id must not contain 'é' " + allowed},
		"invalid UTF-8":       {"a\xffb", "spec.deviceId: device id must not contain byte 0xff (invalid UTF-8) " + allowed},
		"quote":               {`a"b`, `spec.deviceId: device id must not contain '"' ` + allowed},
		"backslash":           {`a\b`, `spec.deviceId: device id must not contain '\\' ` + allowed},
		"first bad reported":  {"a&b/c", "spec.deviceId: device id must not contain '&' " + allowed},
		"length before chars": {strings.Repeat("/", 129), "spec.deviceId: device id is 129 characters, more than the 128 allowed"},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			err := ValidateDeviceID("spec.deviceId", tt.id)
			assertErr(t, err, tt.wantErr)
		})
	}
}

// The character set is the one of the CRD's pattern for spec.deviceId.
func TestDeviceIDCharset(t *testing.T) {
	for c := 0; c < 256; c++ {
		b := byte(c)
		want := b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' || strings.IndexByte(DeviceIDSpecials, b) >= 0
		if got := ValidateDeviceID("x", "a"+string(rune(b))) == nil; c < 0x80 && got != want {
			t.Errorf("character %q allowed = %v, want %v", b, got, want)
		}
	}
}

func TestParseSection(t *testing.T) {
	tests := map[string]struct {
		raw     string
		want    string
		wantErr string
	}{
		"absent":        {"", "{}", ""},
		"null":          {"null", "{}", ""},
		"valid":         {`{"a":{"b":1}}`, `{"a":{"b":1}}`, ""},
		"array":         {`{"telemetry":{"intervals":[1]}}`, "", "spec.desired.telemetry.intervals: arrays are not allowed in device twins"},
		"not an object": {`[1]`, "", "spec.desired: twin document must be a JSON object, got an array"},
		"malformed":     {`{"a":`, "", "spec.desired: invalid JSON: unexpected EOF"},
		"size":          {string(Encode(sized(9, 32769))), "", "spec.desired: desired is 32769 bytes, more than the 32768 allowed"},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			var raw []byte
			if tt.raw != "" {
				raw = []byte(tt.raw)
			}
			got, err := ParseSection(Desired, "spec.desired", raw)
			assertErr(t, err, tt.wantErr)
			if err != nil {
				var e *Error
				if !errors.As(err, &e) || !strings.HasPrefix(e.Path, "spec.desired") {
					t.Errorf("error %#v is not an *Error at spec.desired", err)
				}
				return
			}
			assertJSON(t, got, tt.want)
		})
	}
}
