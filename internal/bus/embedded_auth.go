package bus

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"

	"github.com/kubetwin/kubetwin/internal/ratelog"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// session is what the embedded broker knows about an authenticated
// connection: its grant, and the credentials it connected with, so that
// Recheck can check them again.
type session struct {
	grant    Grant
	username string
	password []byte
	expiry   *time.Timer // disconnects the client when its credential expires
}

// authWindow holds the connections between the start of their
// authentication and their registration as the live connection of their
// client id (online), where Recheck cannot find them in conns. Recheck
// checks them too, so that a device disabled or re-keyed in that window
// is refused or disconnected instead of keeping its access until its
// token expires. Guarded by Embedded.mu.
type authWindow struct {
	pending map[string]map[*mqtt.Client]*pendingAuth // by client id
	// Test hooks, run without the lock: after the Authenticator returned,
	// and before registration.
	afterAuthenticate, beforeRegister func(clientID string)
}

// pendingAuth is one connection in the authWindow.
type pendingAuth struct {
	cl       *mqtt.Client
	username string
	password []byte
	// admin is known once the Authenticator granted it: administrators
	// are not devices, whatever their client id.
	admin bool
	// refused is what Recheck found wrong with the credentials; the
	// CONNECT is refused, or the connection ended at registration.
	refused error
	// registered: online has run, so Recheck ends the connection itself.
	registered bool
}

func (w *authWindow) add(p *pendingAuth) {
	if w.pending == nil {
		w.pending = map[string]map[*mqtt.Client]*pendingAuth{}
	}
	m := w.pending[p.cl.ID]
	if m == nil {
		m = map[*mqtt.Client]*pendingAuth{}
		w.pending[p.cl.ID] = m
	}
	m[p.cl] = p
}

func (w *authWindow) remove(cl *mqtt.Client) *pendingAuth {
	m := w.pending[cl.ID]
	p := m[cl]
	delete(m, cl)
	if len(m) == 0 {
		delete(w.pending, cl.ID)
	}
	return p
}

// of returns the connections of client id deviceID that may turn out to
// be that device.
func (w *authWindow) of(deviceID string) []*pendingAuth {
	var out []*pendingAuth
	for _, p := range w.pending[deviceID] {
		if !p.admin {
			out = append(out, p)
		}
	}
	return out
}

// errRevoked is the stop cause of a connection the broker ended because
// its credential stopped being valid.
var errRevoked = errors.New("credential no longer valid")

// authenticate runs the Authenticator on a CONNECT and records the
// session of an accepted client.
func (e *Embedded) authenticate(cl *mqtt.Client, pk packets.Packet) bool {
	if e.auth == nil {
		return true
	}
	username := string(pk.Connect.Username)
	p := &pendingAuth{cl: cl, username: username, password: append([]byte(nil), pk.Connect.Password...)}
	e.mu.Lock()
	e.authing.add(p)
	e.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), authTimeout)
	defer cancel()
	g, err := e.auth.Authenticate(ctx, cl.ID, username, pk.Connect.Password)
	if h := e.authing.afterAuthenticate; h != nil {
		h(cl.ID)
	}
	e.mu.Lock()
	if err == nil && !g.Admin && p.refused != nil {
		err = p.refused // Recheck ran meanwhile and refused the credentials
	}
	if err != nil {
		e.authing.remove(cl)
		e.mu.Unlock()
		e.refuseConnect(cl, username, err)
		return false
	}
	p.admin = g.Admin
	e.sessions[cl] = &session{grant: g, username: username, password: p.password}
	// A connection whose CONNACK could not be written never reaches
	// OnDisconnect; drop such sessions now and then.
	if len(e.sessions) > 2*len(e.conns)+1024 {
		for c := range e.sessions {
			if c.Closed() {
				e.dropSessionLocked(c)
			}
		}
	}
	e.mu.Unlock()
	e.log.V(1).Info("authenticated client", "clientID", cl.ID, "deviceID", g.DeviceID, "admin", g.Admin, "expires", g.Expires, "remote", cl.Net.Remote)
	return true
}

// refuseConnect logs and counts a refused CONNECT.
func (e *Embedded) refuseConnect(cl *mqtt.Client, username string, err error) {
	reason := refusalReason(err)
	Refused.WithLabelValues(reason).Inc()
	// Rate-limited and truncated: anyone can send CONNECTs with 64 KiB
	// usernames.
	e.rlog.Info("refused device connection", "clientID", cl.ID, "username", username, "remote", cl.Net.Remote,
		"listener", cl.Net.Listener, "reason", reason, "error", err.Error())
}

// truncateID shortens a client id or username an attacker may have chosen
// for a log line that is not rate-limited.
func truncateID(s string) string { return ratelog.Truncate(s) }

// aclCheck is the OnACLCheck hook: write is a publish by the client;
// otherwise topic is a filter the client subscribes to, or the topic of a
// message on its way to the client. The client's own internal IoT Hub
// filters and topics (see embedded_iothub.go) are judged as the "$iothub"
// ones they stand for.
func (e *Embedded) aclCheck(cl *mqtt.Client, topic string, write bool) bool {
	if cl.Net.Inline {
		return true
	}
	if !write && strings.HasPrefix(topic, iothubInternalRoot) {
		external, ok := iothubExternal(cl.ID, topic)
		if !ok {
			return false // another client's; mochi never asks
		}
		topic = external
	}
	if e.auth == nil {
		return true
	}
	e.mu.Lock()
	s := e.sessions[cl]
	e.mu.Unlock()
	if s == nil {
		return false // not authenticated; cannot happen after CONNECT
	}
	g := s.grant
	if g.Admin {
		return true
	}
	ok, reason := protocol.DeviceMayPublish(g.DeviceID, topic), ReasonPublishDenied
	if !write {
		ok, reason = protocol.DeviceMayReceive(g.DeviceID, topic), ReasonSubscribeDenied
	}
	if !ok {
		Refused.WithLabelValues(reason).Inc()
		e.rlog.Info("refused topic outside the device's own", "clientID", cl.ID, "deviceID", g.DeviceID,
			"topic", topic, "publish", write, "reason", reason)
	}
	return ok
}

// startExpiryLocked arms the timer that disconnects cl when its credential
// expires. e.mu is held.
func (e *Embedded) startExpiryLocked(cl *mqtt.Client) {
	s := e.sessions[cl]
	if s == nil || s.grant.Expires.IsZero() || s.expiry != nil {
		return
	}
	s.expiry = time.AfterFunc(time.Until(s.grant.Expires), func() {
		e.revoke(cl, Refuse(ReasonExpired, "the SAS token expired at "+s.grant.Expires.UTC().Format(time.RFC3339)))
	})
}

// endSession forgets cl's session.
func (e *Embedded) endSession(cl *mqtt.Client) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.dropSessionLocked(cl)
}

func (e *Embedded) dropSessionLocked(cl *mqtt.Client) {
	if s := e.sessions[cl]; s != nil && s.expiry != nil {
		s.expiry.Stop()
	}
	delete(e.sessions, cl)
	e.authing.remove(cl)
}

// registerLocked takes cl out of the authWindow as online registers it,
// and returns why Recheck refused its credentials meanwhile, if it did.
// e.mu is held.
func (e *Embedded) registerLocked(cl *mqtt.Client) error {
	p := e.authing.remove(cl)
	if p == nil {
		return nil
	}
	p.registered = true
	if p.admin {
		return nil
	}
	return p.refused
}

// refuseRegistered ends the connection of cl, refused by Recheck between
// its authentication and its registration.
func (e *Embedded) refuseRegistered(cl *mqtt.Client, why error) {
	if deviceRemoved(why) {
		e.endDeviceSession(cl.ID, cl, why)
		return
	}
	e.revoke(cl, why)
}

// recheckPending runs check on a connection of the authWindow and records
// a refusal for authenticate or online to act on, or acts on it itself
// when online has run meanwhile.
func (e *Embedded) recheckPending(deviceID string, p *pendingAuth, check func(username string, password []byte) error) error {
	err := check(p.username, p.password)
	if err == nil {
		return nil
	}
	var r *Refusal
	if !errors.As(err, &r) {
		return fmt.Errorf("checking the credential of device %q again: %w", deviceID, err)
	}
	e.mu.Lock()
	registered, admin := p.registered, p.admin
	if !registered {
		p.refused = err
	}
	e.mu.Unlock()
	if registered && !admin {
		e.refuseRegistered(p.cl, err)
	}
	return nil
}

// revoke disconnects cl, whose credential is no longer valid, unless it
// is gone already.
func (e *Embedded) revoke(cl *mqtt.Client, why error) {
	if cl.Closed() {
		return
	}
	reason := refusalReason(why)
	Refused.WithLabelValues(reason).Inc()
	e.log.Info("disconnecting device: its credential is no longer valid", "clientID", truncateID(cl.ID), "remote", cl.Net.Remote,
		"reason", reason, "error", why.Error())
	e.disconnect(cl, packets.ErrNotAuthorized, fmt.Errorf("%w: %w", errRevoked, why))
}

// Recheck checks the credential of the device connected as deviceID
// again, with check (normally the device's current keys and status), and
// disconnects it when check refuses it (a *Refusal): the device was
// disabled or deleted, or the key it signed its token with was rotated
// out. A device that was disabled or deleted (ReasonDisabled,
// ReasonUnknownDevice) also loses its persistent session at once, and so
// does such a device that is offline (checked with the credentials it last
// connected with). The operator calls it whenever a device's twin or keys
// may have changed. Another error from check leaves the device connected
// and is returned.
//
// A connection of deviceID that is being authenticated, or is
// authenticated but not yet registered, is checked too: a refusal refuses
// its CONNECT, or ends it as it is registered.
func (e *Embedded) Recheck(deviceID string, check func(username string, password []byte) error) error {
	if e.auth == nil {
		return nil
	}
	e.mu.Lock()
	pending := e.authing.of(deviceID)
	e.mu.Unlock()
	for _, p := range pending {
		if err := e.recheckPending(deviceID, p, check); err != nil {
			return err
		}
	}
	e.mu.Lock()
	cl := e.conns[deviceID]
	s := e.sessions[cl]
	var (
		admin    bool
		username string
		password []byte
	)
	switch off := e.sess.offline[deviceID]; {
	case cl != nil && s != nil:
		admin, username, password = s.grant.Admin, s.username, s.password
	case off != nil && off.creds:
		cl, admin, username, password = nil, off.admin, off.username, off.password
	default:
		e.mu.Unlock()
		return nil
	}
	e.mu.Unlock()
	if admin {
		return nil
	}
	err := check(username, password)
	if err == nil {
		return nil
	}
	var r *Refusal
	if !errors.As(err, &r) {
		return fmt.Errorf("checking the credential of device %q again: %w", deviceID, err)
	}
	switch {
	case deviceRemoved(err):
		e.endDeviceSession(deviceID, cl, err)
	case cl != nil:
		e.revoke(cl, err)
	}
	return nil
}
