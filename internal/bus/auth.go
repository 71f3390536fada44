package bus

import (
	"context"
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

// Grant is what an authenticated client of the embedded broker may do.
type Grant struct {
	// Admin clients (the operator's own tools) may use every topic.
	Admin bool
	// DeviceID is the device the client is, which must be its client id
	// (Embedded.Recheck finds a device's connection by client id). A
	// device may publish and subscribe only on its own topics
	// (protocol.DeviceMayPublish, protocol.DeviceMayReceive).
	DeviceID string
	// Expires is when the client's credential expires; the broker
	// disconnects the client then. Zero means never.
	Expires time.Time
}

// Authenticator decides who may connect to the embedded broker. It is
// called for every CONNECT (on the connection's goroutine, so it may take
// a moment but must not block for long) and again by Embedded.Recheck.
type Authenticator interface {
	// Authenticate checks a client's id, username and password. It
	// returns a *Refusal when the client must be refused; any other error
	// refuses it too, as an internal failure.
	Authenticate(ctx context.Context, clientID, username string, password []byte) (Grant, error)
}

// Reasons of refusals, the values of kubetwin_broker_refused_total's
// reason label.
const (
	// ReasonBadUsername: the username is neither "<deviceId>" nor
	// "<hub>/<deviceId>/...", or names another device than the client id.
	ReasonBadUsername = "bad_username"
	// ReasonBadToken: the password is not a SAS token for a device.
	ReasonBadToken = "bad_token"
	// ReasonWrongHub: the token is for another hub host name.
	ReasonWrongHub = "wrong_hub"
	// ReasonWrongDevice: the token is for another device than the client id.
	ReasonWrongDevice = "wrong_device"
	// ReasonUnknownDevice: no DeviceTwin has the device id.
	ReasonUnknownDevice = "unknown_device"
	// ReasonDisabled: the DeviceTwin's spec.status is disabled.
	ReasonDisabled = "disabled"
	// ReasonNoKeys: the device has no usable key yet.
	ReasonNoKeys = "no_keys"
	// ReasonBadSignature: the token was not signed with the device's
	// primary or secondary key (a wrong key, or one rotated out).
	ReasonBadSignature = "bad_signature"
	// ReasonExpired: the token has expired (at CONNECT, or while connected).
	ReasonExpired = "expired_token"
	// ReasonTokenLifetime: the token expires further ahead than the
	// operator allows (--max-sas-token-lifetime).
	ReasonTokenLifetime = "token_lifetime_too_long"
	// ReasonBadAdminPassword: the admin username with a wrong password.
	ReasonBadAdminPassword = "bad_admin_password"
	// ReasonReservedClientID: the client id of mochi's in-process client,
	// or one in the broker's own "$kubetwin" namespace.
	ReasonReservedClientID = "reserved_client_id"
	// ReasonPublishDenied: a publish on a topic the device may not use.
	ReasonPublishDenied = "publish_denied"
	// ReasonSubscribeDenied: a subscription to a filter the device may
	// not use.
	ReasonSubscribeDenied = "subscribe_denied"
	// ReasonError: the Authenticator failed (e.g. the cache was not ready).
	ReasonError = "error"
)

// Refusal is an Authenticator's reason to refuse a client.
type Refusal struct {
	// Reason is one of the Reason constants: the metric label.
	Reason string
	// Message says what was wrong, for the log (never a secret).
	Message string
}

// Error returns the reason and the message.
func (r *Refusal) Error() string { return r.Reason + ": " + r.Message }

// Refuse returns a *Refusal.
func Refuse(reason, message string) *Refusal { return &Refusal{Reason: reason, Message: message} }

// refusalReason is the metric label of err.
func refusalReason(err error) string {
	var r *Refusal
	if errors.As(err, &r) {
		return r.Reason
	}
	return ReasonError
}

// Refused counts what the embedded broker refused: connections,
// connections it ended because their credential stopped being valid,
// publishes and subscriptions, by reason.
var Refused = prometheus.NewCounterVec(prometheus.CounterOpts{
	Namespace: "kubetwin", Subsystem: "broker", Name: "refused_total",
	Help: "Connections, publishes and subscriptions the embedded broker refused, and connections it ended because their credential stopped being valid, by reason.",
}, []string{"reason"})

func init() {
	metrics.Registry.MustRegister(Refused)
}
