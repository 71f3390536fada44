// Package sas signs and verifies shared access signature (SAS) tokens the
// way Azure IoT Hub does, and reads and writes IoT Hub connection strings.
//
// A device token is
//
//	SharedAccessSignature sr=<url-encoded resource>&sig=<url-encoded signature>&se=<expiry>
//
// where the resource is "<hub host>/devices/<device id>", the expiry is in
// seconds since the Unix epoch, and the signature is
// base64(HMAC-SHA256(key, sr + "\n" + se)) with the base64-decoded device
// key and sr exactly as it appears in the token (still URL-encoded). A
// service token adds skn=<policy name> before se and is signed with the
// policy's key. kubetwin devices send a device token as their MQTT
// password; see docs/security.md.
package sas

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Prefix starts every SAS token.
const Prefix = "SharedAccessSignature "

// Key lengths IoT Hub accepts for symmetric keys (decoded bytes), and the
// length of the keys NewKey makes.
const (
	MinKeyBytes = 16
	MaxKeyBytes = 64
	KeyBytes    = 32
)

// Token is a parsed SAS token.
type Token struct {
	// Resource is the resource the token grants access to (sr, decoded),
	// e.g. "myhub.azure-devices.net/devices/myDeviceId".
	Resource string
	// Expiry is when the token stops being valid (se).
	Expiry time.Time
	// KeyName is the shared access policy (skn) of a service token; empty
	// for a device token.
	KeyName string

	// The fields as they appear in the token: the signature covers them.
	rawResource, rawExpiry string
	signature              []byte // decoded from base64
}

// Sign returns the SAS token for resource, valid until expiry, signed with
// key (the decoded key bytes). keyName is the policy name of a service
// token; leave it empty for a device token.
func Sign(resource string, key []byte, expiry time.Time, keyName string) string {
	sr := url.QueryEscape(resource)
	se := strconv.FormatInt(expiry.Unix(), 10)
	var b strings.Builder
	b.WriteString(Prefix)
	b.WriteString("sr=")
	b.WriteString(sr)
	b.WriteString("&sig=")
	b.WriteString(url.QueryEscape(base64.StdEncoding.EncodeToString(signature(key, sr, se))))
	if keyName != "" {
		b.WriteString("&skn=")
		b.WriteString(url.QueryEscape(keyName))
	}
	b.WriteString("&se=")
	b.WriteString(se)
	return b.String()
}

// SignDevice returns the device token of deviceID on the hub hubHost, signed
// with the device key (base64, as in a connection string).
func SignDevice(hubHost, deviceID, key string, expiry time.Time) (string, error) {
	k, err := DecodeKey(key)
	if err != nil {
		return "", err
	}
	return Sign(DeviceResource(hubHost, deviceID), k, expiry, ""), nil
}

// DeviceResource is the resource of a device token: "<hubHost>/devices/<deviceID>".
func DeviceResource(hubHost, deviceID string) string {
	return hubHost + "/devices/" + deviceID
}

func signature(key []byte, rawResource, rawExpiry string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(rawResource + "\n" + rawExpiry))
	return m.Sum(nil)
}

// Parse reads a SAS token. It checks the form only (sr, sig and se present,
// se a number); Verify checks the signature and Expired the expiry.
func Parse(s string) (Token, error) {
	rest, ok := strings.CutPrefix(s, Prefix)
	if !ok {
		return Token{}, errors.New("SAS token: does not start with \"SharedAccessSignature \"")
	}
	var t Token
	var sig string
	seen := map[string]bool{}
	for _, field := range strings.Split(rest, "&") {
		k, v, ok := strings.Cut(field, "=")
		if !ok || v == "" {
			return Token{}, fmt.Errorf("SAS token: field %q is not name=value", clip(field))
		}
		if seen[k] {
			return Token{}, fmt.Errorf("SAS token: field %s appears twice", k)
		}
		seen[k] = true
		dec, err := url.QueryUnescape(v)
		if err != nil {
			return Token{}, fmt.Errorf("SAS token: field %s is not URL-encoded: %w", k, err)
		}
		switch k {
		case "sr":
			t.rawResource, t.Resource = v, dec
		case "sig":
			sig = dec
		case "se":
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 0 {
				return Token{}, fmt.Errorf("SAS token: se %q is not a time in seconds since 1970", clip(v))
			}
			t.rawExpiry, t.Expiry = v, time.Unix(n, 0)
		case "skn":
			t.KeyName = dec
		default:
			return Token{}, fmt.Errorf("SAS token: unknown field %q", clip(k))
		}
	}
	for _, k := range []string{"sr", "sig", "se"} {
		if !seen[k] {
			return Token{}, fmt.Errorf("SAS token: field %s is missing", k)
		}
	}
	var err error
	if t.signature, err = base64.StdEncoding.DecodeString(sig); err != nil {
		return Token{}, fmt.Errorf("SAS token: sig is not base64: %w", err)
	}
	return t, nil
}

// Verify reports whether the token was signed with key (the decoded key
// bytes). It compares in constant time.
func (t Token) Verify(key []byte) bool {
	return len(key) > 0 && hmac.Equal(t.signature, signature(key, t.rawResource, t.rawExpiry))
}

// Expired reports whether the token has expired at now.
func (t Token) Expired(now time.Time) bool { return !now.Before(t.Expiry) }

// DeviceOf splits a device token's resource "<host>/devices/<id>" into the
// host and the device id as the resource names it: sr decoded once, as it
// is signed the documented way (the URL-encoded "<host>/devices/<id>").
// Some SDKs URL-encode the id once more before that; ForDevice accepts
// both forms for a known device id, which DeviceOf alone cannot tell apart
// (the id "a%2Bb" is also "a+b" encoded once more).
func (t Token) DeviceOf() (host, deviceID string, err error) {
	host, id, ok := strings.Cut(t.Resource, "/devices/")
	if !ok || host == "" || id == "" || strings.Contains(id, "/") {
		return "", "", fmt.Errorf("SAS token: resource %q is not <host>/devices/<device id>", clip(t.Resource))
	}
	return host, id, nil
}

// ForDevice reports whether the token's resource names the device
// deviceID: the id as DeviceOf returns it, or that id URL-encoded once
// more. An escape of a character that no encoder escapes (a letter, a
// digit, "-", ".", "_", "~") is not an encoding, so a token for the device
// "a%41" never counts as one for "aA".
func (t Token) ForDevice(deviceID string) bool {
	_, id, err := t.DeviceOf()
	switch {
	case err != nil:
		return false
	case id == deviceID:
		return true
	case !strings.Contains(id, "%") || !escapesOnlyReserved(id):
		return false
	}
	dec, err := url.PathUnescape(id)
	return err == nil && dec == deviceID
}

// escapesOnlyReserved reports whether every %XX escape in s stands for a
// character outside RFC 3986's unreserved set.
func escapesOnlyReserved(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			continue
		}
		if i+2 >= len(s) {
			return false
		}
		b, err := strconv.ParseUint(s[i+1:i+3], 16, 8)
		if err != nil || unreserved(byte(b)) {
			return false
		}
		i += 2
	}
	return true
}

func unreserved(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~'
}

// DefaultMaxLifetime is the default bound on how far in the future a
// token's expiry may be (kubetwin's --max-sas-token-lifetime).
const DefaultMaxLifetime = 365 * 24 * time.Hour

// ErrLifetimeTooLong is the error of CheckLifetime.
var ErrLifetimeTooLong = errors.New("SAS token lifetime too long")

// CheckLifetime returns an error wrapping ErrLifetimeTooLong when the
// token expires more than max after now; max <= 0 sets no bound. A token
// that long-lived is as good as the key for years: whoever holds a copy
// keeps access after a rotation would have been due.
func (t Token) CheckLifetime(now time.Time, max time.Duration) error {
	if max <= 0 || !t.Expiry.After(now.Add(max)) {
		return nil
	}
	return fmt.Errorf("%w: it expires at %s, %s from now, more than the %s allowed",
		ErrLifetimeTooLong, t.Expiry.UTC().Format(time.RFC3339), t.Expiry.Sub(now).Round(time.Second), max)
}

// NewKey returns a new random symmetric key of KeyBytes bytes, base64-encoded.
func NewKey() string {
	b := make([]byte, KeyBytes)
	_, _ = rand.Read(b) // crypto/rand does not fail
	return base64.StdEncoding.EncodeToString(b)
}

// DecodeKey decodes a base64 symmetric key and checks its length
// (MinKeyBytes to MaxKeyBytes bytes, as IoT Hub requires).
func DecodeKey(key string) ([]byte, error) {
	b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(key))
	if err != nil {
		return nil, fmt.Errorf("key is not base64: %w", err)
	}
	if len(b) < MinKeyBytes || len(b) > MaxKeyBytes {
		return nil, fmt.Errorf("key is %d bytes long, want %d to %d", len(b), MinKeyBytes, MaxKeyBytes)
	}
	return b, nil
}

// ConnectionString is an IoT Hub device connection string:
// HostName=<hub host>;DeviceId=<id>;SharedAccessKey=<base64 key>.
type ConnectionString struct {
	HostName        string
	DeviceID        string
	SharedAccessKey string
}

// String formats the connection string.
func (c ConnectionString) String() string {
	return "HostName=" + c.HostName + ";DeviceId=" + c.DeviceID + ";SharedAccessKey=" + c.SharedAccessKey
}

// ParseConnectionString reads a device connection string. HostName,
// DeviceId and SharedAccessKey are required; other fields (e.g.
// GatewayHostName) are ignored.
func ParseConnectionString(s string) (ConnectionString, error) {
	var c ConnectionString
	for _, field := range strings.Split(strings.TrimSpace(s), ";") {
		if field == "" {
			continue
		}
		k, v, ok := strings.Cut(field, "=")
		if !ok {
			return ConnectionString{}, fmt.Errorf("connection string: field %q is not Name=value", clip(field))
		}
		switch k {
		case "HostName":
			c.HostName = v
		case "DeviceId":
			c.DeviceID = v
		case "SharedAccessKey":
			c.SharedAccessKey = v
		}
	}
	switch {
	case c.HostName == "":
		return ConnectionString{}, errors.New("connection string: HostName is missing")
	case c.DeviceID == "":
		return ConnectionString{}, errors.New("connection string: DeviceId is missing")
	case c.SharedAccessKey == "":
		return ConnectionString{}, errors.New("connection string: SharedAccessKey is missing")
	}
	if _, err := DecodeKey(c.SharedAccessKey); err != nil {
		return ConnectionString{}, fmt.Errorf("connection string: SharedAccessKey: %w", err)
	}
	return c, nil
}

// clip shortens what goes into an error message (it may hold a secret).
func clip(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}
