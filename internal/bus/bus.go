// Package bus carries device traffic between MQTT and the operator. Two
// implementations share one interface: Paho, a paho.mqtt.golang client of an
// external broker, and Embedded, a mochi-mqtt broker inside the operator.
//
// Both deliver each message a device publishes on a kubetwin topic to a
// Handler together with an Ack function. The operator calls Ack only once
// the message's effect is durable in the Kubernetes API: Paho then sends the
// PUBACK to the broker (which keeps the message in the operator's persistent
// session until then); Embedded then sends the device its PUBACK (and only
// then has the broker retain and forward the message). So a message is never
// acknowledged before it is stored. Embedded goes on reading a device's
// later QoS 1 messages while earlier ones wait for Ack, so the operator may
// store several of them together.
//
// # Azure IoT Hub devices
//
// Embedded also serves devices that speak Azure IoT Hub's device-twin MQTT
// dialect (unmodified IoT Hub device SDKs; see pkg/protocol/iothub.go), and
// translates at the broker, so the operator sees only kubetwin messages:
//
//   - A twin GET or reported patch on $iothub/twin/... reaches the Handler
//     as the kubetwin get or reported message of the device (the client's
//     grant's DeviceID, or its client id without an Authenticator), with the
//     request id from "$rid" and the usual Ack semantics. One without a
//     valid "$rid" is answered with status 400 and not handed on.
//   - The operator's response on kubetwin/v1/<id>/res/<rid> to such a
//     request, and every desired patch on kubetwin/v1/<id>/desired/patch,
//     also go, translated, to that device's connection alone (if it
//     subscribed to them), however many other IoT Hub devices subscribed to
//     the same "$iothub" filters. The kubetwin messages are published too.
//   - An IoT Hub device never acknowledges desired versions. Whenever a
//     desired patch, or a GET response, carrying desired "$version" n has
//     been written to an IoT Hub device's connection, the Handler gets a
//     synthesized KindAck message {"$version": n} for that device (QoS 0
//     semantics: its Ack does nothing). For these devices "the device has
//     applied desired version n" therefore means "the device has been sent
//     desired version n".
//   - A client that connects with clean=false (as the SDKs do) but whose
//     session the broker no longer has gets both twin subscriptions with
//     its first twin request, since the SDKs subscribe only once.
package bus

import (
	"context"
	"time"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// Message is one message a device published on a kubetwin topic.
type Message struct {
	protocol.Inbound
	// Payload is the message body.
	Payload []byte
	// Received is when the bus received the message.
	Received time.Time
	// Ack acknowledges the message. Call it exactly once, from any
	// goroutine, after the message's effect is durable (or it was refused).
	Ack func()
}

// Handler receives device messages. It must not block: record the message
// and return.
type Handler func(Message)

// PresenceHandler receives the broker's own knowledge of a client that
// connected or disconnected (Embedded only; with an external broker presence
// comes from birth and last-will messages). clientID is the MQTT client id,
// which by convention is the device id.
type PresenceHandler func(clientID string, online bool, at time.Time)

// Bus is a connection to the devices.
type Bus interface {
	// Start connects (or listens), subscribes and delivers messages to the
	// Handler until ctx ends. It implements manager.Runnable.
	Start(ctx context.Context) error
	// Publish sends payload on topic with QoS 1 and returns once the broker
	// has taken it, or with an error.
	Publish(ctx context.Context, topic string, payload []byte, retained bool) error
	// Connected reports whether the bus can currently publish.
	Connected() bool
}
