// Package deviceauth decides which MQTT clients are which devices: it
// authenticates devices on the embedded broker with SAS tokens signed with
// their keys, exactly as Azure IoT Hub does (package sas), and it passes
// device credentials on to the broker that enforces them (Provisioner).
//
// A device connects with
//
//	client id: its device id
//	username:  "<hub host>/<device id>/?api-version=..." (what IoT Hub SDKs
//	           send; anything may follow the device id) or just "<device id>"
//	password:  SharedAccessSignature sr=<hub host>%2Fdevices%2F<device id>&sig=...&se=...
//
// and is accepted when the token is signed with its primary or secondary
// key, has not expired, does not expire further ahead than
// MaxTokenLifetime, names this hub and this device (sas.Token.ForDevice),
// and the device's twin exists and is enabled. See docs/security.md.
package deviceauth

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// Device is what decides whether a device may connect.
type Device struct {
	// ID is the device id.
	ID string
	// Disabled devices may not connect.
	Disabled bool
	// PrimaryKey and SecondaryKey are the device's symmetric keys (base64);
	// empty or invalid ones accept nothing.
	PrimaryKey, SecondaryKey string
}

// Fingerprint identifies the device's credentials and status, so that a
// change can be noticed without keeping the keys around.
func (d Device) Fingerprint() string {
	h := sha256.Sum256([]byte(fmt.Sprintf("%s\x00%t\x00%s\x00%s", d.ID, d.Disabled, d.PrimaryKey, d.SecondaryKey)))
	return hex.EncodeToString(h[:16])
}

// keys returns the device's valid keys, decoded.
func (d Device) keys() [][]byte {
	var out [][]byte
	for _, k := range []string{d.PrimaryKey, d.SecondaryKey} {
		if k == "" {
			continue
		}
		if b, err := sas.DecodeKey(k); err == nil {
			out = append(out, b)
		}
	}
	return out
}

// Lookup returns the device with an id, or an error matching
// deviceid.ErrNotFound.
type Lookup func(ctx context.Context, deviceID string) (Device, error)

// AdminUsername is the username of the operator's administrative MQTT
// credential (Authenticator.AdminPassword).
const AdminUsername = "kubetwin-admin"

// Authenticator is the embedded broker's bus.Authenticator for devices.
type Authenticator struct {
	// HubHostname is the hub host name devices sign their tokens for
	// (the HostName of their connection strings). A port on either side
	// is ignored, and case does not matter.
	HubHostname string
	// Lookup finds devices (normally in the manager's cache).
	Lookup Lookup
	// AdminPassword, when set, lets a client with username AdminUsername
	// and this password connect with any client id and use every topic.
	AdminPassword string
	// MaxTokenLifetime refuses a token whose expiry is further than this
	// from now (--max-sas-token-lifetime); zero sets no bound.
	MaxTokenLifetime time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
}

var _ bus.Authenticator = (*Authenticator)(nil)

// Authenticate checks a CONNECT (see the package documentation): the
// credentials, then the device they name (Lookup), then Verify.
func (a *Authenticator) Authenticate(ctx context.Context, clientID, username string, password []byte) (bus.Grant, error) {
	if a.AdminPassword != "" && username == AdminUsername {
		if subtle.ConstantTimeCompare(password, []byte(a.AdminPassword)) != 1 {
			return bus.Grant{}, bus.Refuse(bus.ReasonBadAdminPassword, "wrong password for "+AdminUsername)
		}
		return bus.Grant{Admin: true}, nil
	}
	tok, err := a.parse(clientID, username, password)
	if err != nil {
		return bus.Grant{}, err
	}
	d, err := a.Lookup(ctx, clientID)
	if errors.Is(err, deviceid.ErrNotFound) {
		return bus.Grant{}, bus.Refuse(bus.ReasonUnknownDevice, fmt.Sprintf("no DeviceTwin has device id %q", clientID))
	}
	if err != nil {
		return bus.Grant{}, fmt.Errorf("looking up device %q: %w", clientID, err)
	}
	return a.check(d, tok)
}

// Verify checks the credentials a client presented against device d: what
// Authenticate does once it has looked d up.
func (a *Authenticator) Verify(d Device, username string, password []byte) (bus.Grant, error) {
	tok, err := a.parse(d.ID, username, password)
	if err != nil {
		return bus.Grant{}, err
	}
	return a.check(d, tok)
}

// parse checks the username and the token's form and scope: this hub, and
// the device of the client id.
func (a *Authenticator) parse(clientID, username string, password []byte) (sas.Token, error) {
	if err := checkUsername(clientID, username); err != nil {
		return sas.Token{}, err
	}
	tok, err := sas.Parse(string(password))
	if err != nil {
		return sas.Token{}, bus.Refuse(bus.ReasonBadToken, "the password is not a SAS token: "+err.Error())
	}
	host, id, err := tok.DeviceOf()
	if err != nil {
		return sas.Token{}, bus.Refuse(bus.ReasonBadToken, err.Error())
	}
	if !tok.ForDevice(clientID) {
		return sas.Token{}, bus.Refuse(bus.ReasonWrongDevice, fmt.Sprintf("the token is for device %q, the client id is %q", id, clientID))
	}
	if !sameHost(host, a.HubHostname) {
		return sas.Token{}, bus.Refuse(bus.ReasonWrongHub, fmt.Sprintf("the token is for hub %q, this hub is %q", host, a.HubHostname))
	}
	return tok, nil
}

// check checks a parsed token against the device: enabled, signed with
// one of its keys, not expired.
func (a *Authenticator) check(d Device, tok sas.Token) (bus.Grant, error) {
	if d.Disabled {
		return bus.Grant{}, bus.Refuse(bus.ReasonDisabled, fmt.Sprintf("device %q is disabled", d.ID))
	}
	keys := d.keys()
	if len(keys) == 0 {
		return bus.Grant{}, bus.Refuse(bus.ReasonNoKeys, fmt.Sprintf("device %q has no valid key yet", d.ID))
	}
	signed := false
	for _, k := range keys {
		signed = tok.Verify(k) || signed // try every key: no timing hint about which
	}
	if !signed {
		return bus.Grant{}, bus.Refuse(bus.ReasonBadSignature, fmt.Sprintf("the token is not signed with a current key of device %q", d.ID))
	}
	now := time.Now
	if a.Now != nil {
		now = a.Now
	}
	if tok.Expired(now()) {
		return bus.Grant{}, bus.Refuse(bus.ReasonExpired, "the SAS token expired at "+tok.Expiry.UTC().Format(time.RFC3339))
	}
	if err := tok.CheckLifetime(now(), a.MaxTokenLifetime); err != nil {
		return bus.Grant{}, bus.Refuse(bus.ReasonTokenLifetime, err.Error()+" (--max-sas-token-lifetime)")
	}
	return bus.Grant{DeviceID: d.ID, Expires: tok.Expiry}, nil
}

// checkUsername accepts "<deviceId>" and "<host>/<deviceId>/<anything>"
// when the device id is the client id.
func checkUsername(clientID, username string) error {
	id := username
	if strings.Contains(username, "/") {
		parts := strings.SplitN(username, "/", 3)
		id = parts[1]
	}
	switch {
	case username == "":
		return bus.Refuse(bus.ReasonBadUsername, "no username; use <hub host>/<device id>/?api-version=... or the device id")
	case id != clientID:
		return bus.Refuse(bus.ReasonBadUsername, fmt.Sprintf("the username names device %q, the client id is %q", id, clientID))
	}
	return nil
}

// sameHost compares host names without ports, ignoring case.
func sameHost(a, b string) bool {
	return strings.EqualFold(stripPort(a), stripPort(b))
}

func stripPort(h string) string {
	if host, _, err := net.SplitHostPort(h); err == nil {
		return host
	}
	return h
}
