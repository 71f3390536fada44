package bus

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// iothubFixture is a running Embedded bus whose Handler records every
// message and then answers it as answer says.
type iothubFixture struct {
	bus *Embedded
	rec *recorder
}

// bridgeLike answers as the bridge does: a GET with 200 and documents whose
// numbers a float64 would not keep, a reported patch with 204 and version 5.
// It acknowledges the message after answering.
func bridgeLike(b *Embedded, m Message) {
	var r protocol.Response
	switch m.Kind {
	case protocol.KindGet:
		r = protocol.Response{
			Status:   protocol.StatusOK,
			Desired:  map[string]any{"$version": json.Number("3"), "big": json.Number("12345678901234567890"), "device": m.DeviceID},
			Reported: map[string]any{"$version": json.Number("9"), "t": json.Number("21.50")},
		}
	case protocol.KindReported:
		r = protocol.Response{Status: protocol.StatusNoContent, Version: 5}
	default:
		return
	}
	respond(b, m.DeviceID, m.RequestID, r)
	m.Ack()
}

// bridgeGetPayload is the IoT Hub payload of bridgeLike's GET response.
func bridgeGetPayload(deviceID string) string {
	return `{"desired":{"big":12345678901234567890,"device":"` + deviceID + `","$version":3},"reported":{"t":21.50,"$version":9}}`
}

// respond publishes r on the kubetwin response topic, as the bridge does.
func respond(b *Embedded, deviceID, rid string, r protocol.Response) {
	payload, err := json.Marshal(r)
	if err != nil {
		panic(err)
	}
	if err := b.Publish(context.Background(), protocol.ResponseTopic(deviceID, rid), payload, false); err != nil {
		panic(err)
	}
}

// startIoTHub runs an Embedded bus, with the fake Authenticator if auth.
func startIoTHub(t *testing.T, auth bool, answer func(*Embedded, Message)) *iothubFixture {
	t.Helper()
	f := &iothubFixture{rec: newRecorder()}
	o := EmbeddedOptions{
		Listen: "127.0.0.1:0",
		Handler: func(m Message) {
			f.rec.handle(m)
			if answer != nil {
				answer(f.bus, m)
			}
		},
		Logger: testLogger(t),
	}
	if auth {
		o.Auth = &fakeAuth{}
	}
	b, err := NewEmbedded(o)
	if err != nil {
		t.Fatal(err)
	}
	f.bus = b
	runBus(t, b)
	select {
	case <-b.Ready():
	case <-time.After(waitTimeout):
		t.Fatal("embedded bus not ready")
	}
	return f
}

// observeForwarded returns the topics of the messages the broker publishes
// on "$iothub" topics the ordinary way, through an in-process subscription
// that no filter rewriting affects. The translated messages do not go
// there: they travel on internal topics.
func (f *iothubFixture) observeForwarded(t *testing.T) <-chan string {
	t.Helper()
	ch := make(chan string, 100)
	if err := f.bus.server.Subscribe("$iothub/#", 1, func(_ *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
		ch <- pk.TopicName
	}); err != nil {
		t.Fatal(err)
	}
	return ch
}

// noneForwarded asserts that nothing was published on "$iothub" topics
// the ordinary way.
func noneForwarded(t *testing.T, ch <-chan string) {
	t.Helper()
	select {
	case topic := <-ch:
		t.Fatalf("the broker forwarded %q", topic)
	case <-time.After(100 * time.Millisecond):
	}
}

// publishDesiredPatch publishes a desired patch as the bridge does.
func (f *iothubFixture) publishDesiredPatch(t *testing.T, deviceID, patch string) {
	t.Helper()
	if err := f.bus.Publish(context.Background(), protocol.DesiredPatchTopic(deviceID), []byte(patch), false); err != nil {
		t.Fatal(err)
	}
}

// nextAck waits for the next Handler message and checks that it is a
// synthesized acknowledgement of version for deviceID.
func (f *iothubFixture) nextAck(t *testing.T, deviceID string, version int64) {
	t.Helper()
	m := f.rec.next(t)
	want := protocol.Inbound{DeviceID: deviceID, Kind: protocol.KindAck}
	if m.Inbound != want || string(m.Payload) != fmt.Sprintf(`{"$version":%d}`, version) {
		t.Fatalf("got %+v %s, want %+v {\"$version\":%d}", m.Inbound, m.Payload, want, version)
	}
	m.Ack() // a no-op
}

// iothubDevice is a paho client used the way the IoT Hub SDK uses MQTT.
type iothubDevice struct {
	t      *testing.T
	id     string
	c      paho.Client
	msgs   chan paho.Message
	lost   chan struct{}
	resume bool // CONNACK session present
}

// iothubOpts are the options of an IoT Hub device: clean=false, as the SDK
// connects, and every message to the default handler (the SDK never
// subscribes again after a reconnect).
func iothubOpts(addr, id string) *paho.ClientOptions {
	return deviceOpts(addr, id).SetCleanSession(false)
}

// connectIoTHub connects an IoT Hub device; password "" sends none.
func connectIoTHub(t *testing.T, o *paho.ClientOptions, password string) *iothubDevice {
	t.Helper()
	d := &iothubDevice{t: t, id: o.ClientID, msgs: make(chan paho.Message, 100), lost: make(chan struct{})}
	var once sync.Once
	o.SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { d.msgs <- m }).
		SetConnectionLostHandler(func(paho.Client, error) { once.Do(func() { close(d.lost) }) })
	if password != "" {
		o.SetUsername("myhub.azure-devices.net/" + o.ClientID + "/?api-version=2021-04-12").SetPassword(password)
	}
	d.c = paho.NewClient(o)
	tok := d.c.Connect()
	if !tok.WaitTimeout(waitTimeout) || tok.Error() != nil {
		t.Fatalf("%s: connect: %v", d.id, tok.Error())
	}
	if code := tok.(*paho.ConnectToken).ReturnCode(); code != 0 {
		t.Fatalf("%s: CONNACK %d", d.id, code)
	}
	d.resume = tok.(*paho.ConnectToken).SessionPresent()
	t.Cleanup(func() { d.c.Disconnect(0) })
	return d
}

// subscribe subscribes to filters and returns the SUBACK codes.
func (d *iothubDevice) subscribe(filters map[string]byte) map[string]byte {
	d.t.Helper()
	tok := d.c.SubscribeMultiple(filters, nil)
	waitToken(d.t, d.id+": subscribe", tok)
	return tok.(*paho.SubscribeToken).Result()
}

// subscribeTwin subscribes as the SDK does.
func (d *iothubDevice) subscribeTwin() {
	d.t.Helper()
	for f, code := range d.subscribe(map[string]byte{protocol.IoTHubResponseFilter: 0, protocol.IoTHubDesiredFilter: 0}) {
		if code != 0 {
			d.t.Fatalf("%s: SUBACK for %s = %#x", d.id, f, code)
		}
	}
}

// publish publishes payload on topic with qos and waits until paho sent it.
func (d *iothubDevice) publish(topic string, qos byte, payload string) {
	d.t.Helper()
	waitToken(d.t, d.id+": publish "+topic, d.c.Publish(topic, qos, false, payload))
}

// get sends a twin GET as the SDK does (QoS 0, payload " ").
func (d *iothubDevice) get(rid string) {
	d.t.Helper()
	d.publish("$iothub/twin/GET/?$rid="+rid, 0, " ")
}

// next waits for the next message.
func (d *iothubDevice) next() paho.Message {
	d.t.Helper()
	select {
	case m := <-d.msgs:
		return m
	case <-time.After(waitTimeout):
		d.t.Fatalf("%s: timed out waiting for a message", d.id)
		return nil
	}
}

// expect waits for the next message and checks its topic, payload and QoS.
func (d *iothubDevice) expect(topic, payload string, qos byte) {
	d.t.Helper()
	m := d.next()
	if m.Topic() != topic || string(m.Payload()) != payload || m.Qos() != qos || m.Retained() {
		d.t.Fatalf("%s got %q %q qos=%d retained=%v\nwant %q %q qos=%d", d.id, m.Topic(), m.Payload(), m.Qos(), m.Retained(), topic, payload, qos)
	}
}

// none asserts that no message arrives within dur.
func (d *iothubDevice) none(dur time.Duration) {
	d.t.Helper()
	select {
	case m := <-d.msgs:
		d.t.Fatalf("%s: unexpected message %q %q", d.id, m.Topic(), m.Payload())
	case <-time.After(dur):
	}
}

// expectRequest waits for the next Handler message and checks it.
func expectRequest(t *testing.T, rec *recorder, want protocol.Inbound, payload string) Message {
	t.Helper()
	m := rec.next(t)
	if m.Inbound != want || string(m.Payload) != payload {
		t.Fatalf("Handler got %+v %q, want %+v %q", m.Inbound, m.Payload, want, payload)
	}
	return m
}

func TestIoTHubGetTwin(t *testing.T) {
	for _, auth := range []bool{true, false} {
		t.Run(fmt.Sprintf("auth=%v", auth), func(t *testing.T) {
			f := startIoTHub(t, auth, bridgeLike)
			forwarded := f.observeForwarded(t)
			password := ""
			if auth {
				password = "ok"
			}
			adminPassword := ""
			if auth {
				adminPassword = "admin"
			}
			// Watchers of everything see neither the request nor the response.
			watcher := connectIoTHub(t, deviceOpts(f.bus.Addr(), "watcher"), adminPassword)
			watcher.subscribe(map[string]byte{"$iothub/#": 1, "kubetwin/v1/#": 1})

			dev := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-1"), password)
			dev.subscribeTwin()
			dev.get("0b8a3f2c-6b1e-4d6a-9f1e-2c3d4e5f6a7b")

			expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindGet, RequestID: "0b8a3f2c-6b1e-4d6a-9f1e-2c3d4e5f6a7b"}, " ")
			dev.expect("$iothub/twin/res/200/?$rid=0b8a3f2c-6b1e-4d6a-9f1e-2c3d4e5f6a7b", bridgeGetPayload("dev-1"), 0)
			// The device has been sent desired version 3.
			f.nextAck(t, "dev-1", 3)

			// The kubetwin response went out too, as always.
			m := watcher.next()
			if m.Topic() != protocol.ResponseTopic("dev-1", "0b8a3f2c-6b1e-4d6a-9f1e-2c3d4e5f6a7b") {
				t.Fatalf("watcher got %q", m.Topic())
			}
			watcher.none(300 * time.Millisecond)
			dev.none(100 * time.Millisecond)
			f.rec.none(t, 100*time.Millisecond)
			noneForwarded(t, forwarded)
		})
	}
}

func TestIoTHubReportedPatch(t *testing.T) {
	f := startIoTHub(t, true, bridgeLike)
	dev := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-1"), "ok")
	dev.subscribeTwin()
	// Query parameters in another order, percent-encoded.
	dev.publish("$iothub/twin/PATCH/properties/reported/?$version=1&%24rid=r%2D2", 0, `{"connectivity":{"type":"cellular"}}`)
	expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindReported, RequestID: "r-2"}, `{"connectivity":{"type":"cellular"}}`)
	dev.expect("$iothub/twin/res/204/?$rid=r-2&$version=5", "", 0)
	// No desired version was handed over.
	f.rec.none(t, 300*time.Millisecond)
}

func TestIoTHubQoS1RequestAckedOnlyAfterAck(t *testing.T) {
	f := startIoTHub(t, true, nil)
	forwarded := f.observeForwarded(t)
	dev := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-1"), "ok")
	dev.subscribeTwin()

	tok := dev.c.Publish("$iothub/twin/PATCH/properties/reported/?$rid=q1", 1, false, `{"a":1}`)
	m := expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindReported, RequestID: "q1"}, `{"a":1}`)
	if tok.WaitTimeout(300 * time.Millisecond) {
		t.Fatalf("PUBACK before Ack (err %v)", tok.Error())
	}
	// As the bridge does once the patch is stored: answer, then Ack.
	respond(f.bus, "dev-1", "q1", protocol.Response{Status: protocol.StatusNoContent, Version: 12})
	m.Ack()
	waitToken(t, "publish", tok)
	dev.expect("$iothub/twin/res/204/?$rid=q1&$version=12", "", 0)
	// The acknowledged request is not forwarded.
	noneForwarded(t, forwarded)

	// QoS 2 is handed on too, and completes after Ack.
	tok = dev.c.Publish("$iothub/twin/GET/?$rid=q2", 2, false, "")
	m = expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindGet, RequestID: "q2"}, "")
	m.Ack()
	waitToken(t, "publish", tok)
	noneForwarded(t, forwarded)
}

func TestIoTHubErrorResponses(t *testing.T) {
	f := startIoTHub(t, true, func(b *Embedded, m Message) {
		switch m.RequestID {
		case "bad":
			respond(b, m.DeviceID, m.RequestID, protocol.Response{Status: protocol.StatusBadRequest, Error: `reported: key "a$b" must not contain '$'`})
		case "busy":
			respond(b, m.DeviceID, m.RequestID, protocol.Response{Status: protocol.StatusTooMany, Error: "retry later"})
		case "unknown":
			respond(b, m.DeviceID, m.RequestID, protocol.Response{Status: protocol.StatusNotFound, Error: `no DeviceTwin for device id "dev-1"`})
		case "garbage":
			_ = b.Publish(context.Background(), protocol.ResponseTopic(m.DeviceID, m.RequestID), []byte("not json"), false)
		}
		m.Ack()
	})
	dev := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-1"), "ok")
	dev.subscribeTwin()
	for _, tc := range []struct{ rid, topic, payload string }{
		{"bad", "$iothub/twin/res/400/?$rid=bad", `{"errorCode":400004,"message":"reported: key \"a$b\" must not contain '$'"}`},
		{"busy", "$iothub/twin/res/429/?$rid=busy", `{"errorCode":429001,"message":"retry later"}`},
		{"unknown", "$iothub/twin/res/404/?$rid=unknown", `{"errorCode":404001,"message":"no DeviceTwin for device id \"dev-1\""}`},
		// A response the broker cannot translate still gets the device a JSON error.
		{"garbage", "$iothub/twin/res/500/?$rid=garbage", `{"errorCode":500001,"message":"the operator sent an invalid response"}`},
	} {
		dev.publish("$iothub/twin/PATCH/properties/reported/?$rid="+tc.rid, 0, `{"a$b":1}`)
		expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindReported, RequestID: tc.rid}, `{"a$b":1}`)
		dev.expect(tc.topic, tc.payload, 0)
	}
}

func TestIoTHubInvalidRequestID(t *testing.T) {
	f := startIoTHub(t, true, bridgeLike)
	dev := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-1"), "ok")
	dev.subscribeTwin()
	for _, tc := range []struct{ topic, want, message string }{
		{"$iothub/twin/GET/", "$iothub/twin/res/400/?$rid=",
			`topic \"$iothub/twin/GET/\" has no $rid query parameter`},
		{"$iothub/twin/GET/?rid=1", "$iothub/twin/res/400/?$rid=",
			`topic \"$iothub/twin/GET/?rid=1\" has no $rid query parameter`},
		{"$iothub/twin/PATCH/properties/reported/?$rid=a%2Fb", "$iothub/twin/res/400/?$rid=a%2Fb",
			`topic \"$iothub/twin/PATCH/properties/reported/?$rid=a%2Fb\": request id \"a/b\" must not contain '/', '+', '#' or NUL`},
		{"$iothub/twin/GET/?$rid=1&$rid=2", "$iothub/twin/res/400/?$rid=",
			`topic \"$iothub/twin/GET/?$rid=1&$rid=2\" has 2 $rid query parameters, want one`},
	} {
		dev.publish(tc.topic, 0, "{}")
		dev.expect(tc.want, `{"errorCode":400004,"message":"`+tc.message+`"}`, 0)
	}
	// QoS 1: answered and acknowledged by the broker.
	dev.publish("$iothub/twin/GET/?$rid=", 1, "")
	dev.expect("$iothub/twin/res/400/?$rid=",
		`{"errorCode":400004,"message":"topic \"$iothub/twin/GET/?$rid=\": request id must be 1-64 characters, got 0"}`, 0)
	f.rec.none(t, 300*time.Millisecond)
}

func TestIoTHubDevicesGetOnlyTheirOwn(t *testing.T) {
	f := startIoTHub(t, true, bridgeLike)
	devs := map[string]*iothubDevice{}
	for _, id := range []string{"dev-1", "dev-2"} {
		devs[id] = connectIoTHub(t, iothubOpts(f.bus.Addr(), id), "ok")
		devs[id].subscribeTwin()
	}
	// The same request id from both devices.
	for _, id := range []string{"dev-1", "dev-2"} {
		devs[id].get("same")
		expectRequest(t, f.rec, protocol.Inbound{DeviceID: id, Kind: protocol.KindGet, RequestID: "same"}, " ")
		f.nextAck(t, id, 3)
	}
	for _, id := range []string{"dev-1", "dev-2"} {
		devs[id].expect("$iothub/twin/res/200/?$rid=same", bridgeGetPayload(id), 0)
	}
	// A desired patch goes to its device alone.
	f.publishDesiredPatch(t, "dev-2", `{"fan":"off","$version":4}`)
	devs["dev-2"].expect("$iothub/twin/PATCH/properties/desired/?$version=4", `{"fan":"off","$version":4}`, 0)
	f.nextAck(t, "dev-2", 4)
	// So does a response, even to a request id the other device used too.
	devs["dev-1"].publish("$iothub/twin/PATCH/properties/reported/?$rid=same", 0, `{}`)
	expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindReported, RequestID: "same"}, "{}")
	devs["dev-1"].expect("$iothub/twin/res/204/?$rid=same&$version=5", "", 0)
	// The response to a kubetwin request is not translated.
	devs["dev-1"].publish(protocol.GetTopic("dev-1", "native"), 0, "")
	expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindGet, RequestID: "native"}, "")

	for _, d := range devs {
		d.none(300 * time.Millisecond)
	}
	f.rec.none(t, 100*time.Millisecond)
}

func TestIoTHubDesiredPatch(t *testing.T) {
	f := startIoTHub(t, false, bridgeLike)
	dev := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-1"), "")
	dev.subscribeTwin()
	patch := `{"fan":null,"mode":{"eco":true,"level":12345678901234567890},"$version":7}`
	f.publishDesiredPatch(t, "dev-1", patch)
	dev.expect("$iothub/twin/PATCH/properties/desired/?$version=7", patch, 0)
	f.nextAck(t, "dev-1", 7)

	// The retained whole document is not for IoT Hub devices.
	if err := f.bus.Publish(context.Background(), protocol.DesiredTopic("dev-1"), []byte(`{"$version":7}`), true); err != nil {
		t.Fatal(err)
	}
	dev.none(300 * time.Millisecond)

	// At min(subscription QoS, 1).
	for _, qos := range []byte{1, 2} {
		dev.subscribe(map[string]byte{protocol.IoTHubDesiredFilter: qos})
		v := 10 + int(qos)
		f.publishDesiredPatch(t, "dev-1", fmt.Sprintf(`{"$version":%d}`, v))
		dev.expect(fmt.Sprintf("$iothub/twin/PATCH/properties/desired/?$version=%d", v), fmt.Sprintf(`{"$version":%d}`, v), 1)
		f.nextAck(t, "dev-1", int64(v))
	}

	// Unsubscribed: no more notifications, and nothing to acknowledge.
	waitToken(t, "unsubscribe", dev.c.Unsubscribe(protocol.IoTHubDesiredFilter))
	f.publishDesiredPatch(t, "dev-1", `{"$version":20}`)
	dev.none(300 * time.Millisecond)
	f.rec.none(t, 100*time.Millisecond)
	// The response subscription is still there.
	dev.get("g")
	expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindGet, RequestID: "g"}, " ")
	dev.expect("$iothub/twin/res/200/?$rid=g", bridgeGetPayload("dev-1"), 0)
	f.nextAck(t, "dev-1", 3)

	// A desired patch the broker cannot read is not sent.
	f.publishDesiredPatch(t, "dev-1", `{"fan":"on"}`)
	dev.none(300 * time.Millisecond)
	f.rec.none(t, 100*time.Millisecond)
}

func TestIoTHubSessionResumedWithoutSubscribe(t *testing.T) {
	f := startIoTHub(t, true, func(b *Embedded, m Message) {
		if m.RequestID != "pending" { // answered by the test
			bridgeLike(b, m)
		}
	})
	first := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-1"), "ok")
	if first.resume {
		t.Fatal("first connection: session present")
	}
	first.subscribeTwin()
	first.c.Disconnect(100)

	// The SDK reconnects and never subscribes again.
	dev := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-1"), "ok")
	if !dev.resume {
		t.Fatal("reconnection with clean=false: session not present")
	}
	dev.get("after-reconnect")
	expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindGet, RequestID: "after-reconnect"}, " ")
	dev.expect("$iothub/twin/res/200/?$rid=after-reconnect", bridgeGetPayload("dev-1"), 0)
	f.nextAck(t, "dev-1", 3)
	f.publishDesiredPatch(t, "dev-1", `{"x":1,"$version":4}`)
	dev.expect("$iothub/twin/PATCH/properties/desired/?$version=4", `{"x":1,"$version":4}`, 0)
	f.nextAck(t, "dev-1", 4)

	// A response to a request sent before a reconnect reaches the new
	// connection.
	dev.publish("$iothub/twin/PATCH/properties/reported/?$rid=pending", 0, `{}`)
	m := expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindReported, RequestID: "pending"}, "{}")
	dev.c.Disconnect(100)
	dev = connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-1"), "ok")
	respond(f.bus, "dev-1", m.RequestID, protocol.Response{Status: protocol.StatusNoContent, Version: 6})
	dev.expect("$iothub/twin/res/204/?$rid=pending&$version=6", "", 0)
}

func TestIoTHubLostSessionGetsSubscriptions(t *testing.T) {
	// The operator restarted: the new broker has never seen the device,
	// which resumes with clean=false and does not subscribe.
	old := startIoTHub(t, true, bridgeLike)
	before := connectIoTHub(t, iothubOpts(old.bus.Addr(), "dev-1"), "ok")
	before.subscribeTwin()

	f := startIoTHub(t, true, bridgeLike)
	dev := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-1"), "ok")
	if dev.resume {
		t.Fatal("fresh broker: session present")
	}
	dev.get("r1")
	expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindGet, RequestID: "r1"}, " ")
	dev.expect("$iothub/twin/res/200/?$rid=r1", bridgeGetPayload("dev-1"), 0)
	f.nextAck(t, "dev-1", 3)
	f.publishDesiredPatch(t, "dev-1", `{"$version":4}`)
	dev.expect("$iothub/twin/PATCH/properties/desired/?$version=4", `{"$version":4}`, 0)
	f.nextAck(t, "dev-1", 4)
	// Part of the session from now on.
	dev.c.Disconnect(100)
	dev = connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-1"), "ok")
	if !dev.resume {
		t.Fatal("session not present after reconnect")
	}
	dev.get("r2")
	expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindGet, RequestID: "r2"}, " ")
	dev.expect("$iothub/twin/res/200/?$rid=r2", bridgeGetPayload("dev-1"), 0)
	f.nextAck(t, "dev-1", 3)

	// A clean session that did not subscribe gets nothing: it did not ask.
	clean := connectIoTHub(t, deviceOpts(f.bus.Addr(), "dev-2"), "ok")
	clean.get("r3")
	expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-2", Kind: protocol.KindGet, RequestID: "r3"}, " ")
	clean.none(300 * time.Millisecond)
	// A fresh persistent session that subscribed for responses only keeps
	// to what it chose.
	chose := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-3"), "ok")
	chose.subscribe(map[string]byte{protocol.IoTHubResponseFilter: 0})
	chose.get("r4")
	expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-3", Kind: protocol.KindGet, RequestID: "r4"}, " ")
	chose.expect("$iothub/twin/res/200/?$rid=r4", bridgeGetPayload("dev-3"), 0)
	f.nextAck(t, "dev-3", 3)
	f.publishDesiredPatch(t, "dev-3", `{"$version":4}`)
	chose.none(300 * time.Millisecond)
	f.rec.none(t, 100*time.Millisecond)
}

// TestIoTHubLostSessionOfSDKRestoredAtConnect: an Azure IoT SDK client
// (DeviceClientType in its username) whose session the broker lost gets
// its twin subscriptions back as it connects, so a device that only waits
// for desired changes gets them without sending a request first.
func TestIoTHubLostSessionOfSDKRestoredAtConnect(t *testing.T) {
	f := startIoTHub(t, true, bridgeLike)
	o := iothubOpts(f.bus.Addr(), "dev-1")
	d := &iothubDevice{t: t, id: "dev-1", msgs: make(chan paho.Message, 100), lost: make(chan struct{})}
	o.SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) { d.msgs <- m }).
		SetUsername("myhub.azure-devices.net/dev-1/?api-version=2021-04-12&DeviceClientType=azure-iot-device%2F1.18.4%20(node%20v20)").
		SetPassword("ok")
	d.c = paho.NewClient(o)
	if tok := d.c.Connect(); !tok.WaitTimeout(waitTimeout) || tok.Error() != nil {
		t.Fatalf("connect: %v", tok.Error())
	} else if tok.(*paho.ConnectToken).SessionPresent() {
		t.Fatal("fresh broker: session present")
	}
	t.Cleanup(func() { d.c.Disconnect(0) })
	// The broker subscribes it just after the CONNACK (OnSessionEstablished).
	eventually(t, "the broker has restored the twin subscriptions", func() bool {
		cl, ok := f.bus.server.Clients.Get("dev-1")
		if !ok {
			return false
		}
		_, ok = cl.State.Subscriptions.Get(iothubInternal("dev-1", protocol.IoTHubDesiredFilter))
		return ok
	})
	f.publishDesiredPatch(t, "dev-1", `{"mode":"eco","$version":4}`)
	d.expect("$iothub/twin/PATCH/properties/desired/?$version=4", `{"mode":"eco","$version":4}`, 0)
	f.nextAck(t, "dev-1", 4)

	// A client without DeviceClientType keeps waiting for its first request.
	plain := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-2"), "ok")
	f.publishDesiredPatch(t, "dev-2", `{"$version":4}`)
	plain.none(300 * time.Millisecond)
}

func TestIoTHubTakeOver(t *testing.T) {
	f := startIoTHub(t, true, bridgeLike)
	first := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-1"), "ok")
	first.subscribeTwin()
	// A second connection with the same client id drops the first.
	second := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-1"), "ok")
	if !second.resume {
		t.Error("take-over: session not present")
	}
	select {
	case <-first.lost:
	case <-time.After(waitTimeout):
		t.Fatal("the first connection was not dropped")
	}
	second.get("r1")
	expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindGet, RequestID: "r1"}, " ")
	second.expect("$iothub/twin/res/200/?$rid=r1", bridgeGetPayload("dev-1"), 0)
	f.nextAck(t, "dev-1", 3)
	f.publishDesiredPatch(t, "dev-1", `{"$version":4}`)
	second.expect("$iothub/twin/PATCH/properties/desired/?$version=4", `{"$version":4}`, 0)
	f.nextAck(t, "dev-1", 4)
	first.none(100 * time.Millisecond)
}

func TestIoTHubPingreq(t *testing.T) {
	f := startIoTHub(t, false, bridgeLike)
	c := dialRaw(t, f.bus.Addr(), "dev-1", 4)
	for range 2 {
		if _, err := c.conn.Write([]byte{packets.Pingreq << 4, 0}); err != nil {
			t.Fatal(err)
		}
		if b := c.read(waitTimeout); !bytes.Equal(b, []byte{packets.Pingresp << 4, 0}) {
			t.Fatalf("after PINGREQ: got % x, want PINGRESP", b)
		}
	}
}

func TestIoTHubACL(t *testing.T) {
	f := startIoTHub(t, true, bridgeLike)
	dev := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-1"), "ok")
	other := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-2"), "ok")
	other.subscribeTwin()

	subDenied := testutil.ToFloat64(Refused.WithLabelValues(ReasonSubscribeDenied))
	want := map[string]byte{
		protocol.IoTHubResponseFilter:                            1,
		"$iothub/twin/res/+/#":                                   1,
		"$iothub/twin/#":                                         0x80,
		"$iothub/#":                                              0x80,
		"$iothub/methods/POST/#":                                 0x80,
		"devices/dev-1/messages/devicebound/#":                   0x80,
		protocol.DesiredFilter("dev-2"):                          0x80,
		protocol.ResponseFilter("dev-2"):                         0x80,
		"$kubetwin/#":                                            0x80,
		"$kubetwin/iothub/dev-2/twin/res/#":                      0x80,
		"$kubetwin/iothub/dev-1/twin/PATCH/properties/desired/#": 0x80,
	}
	filters := map[string]byte{}
	for f := range want {
		filters[f] = 1
	}
	got := dev.subscribe(filters)
	for f, code := range want {
		if got[f] != code {
			t.Errorf("SUBACK for %s = %#x, want %#x", f, got[f], code)
		}
	}
	if d := testutil.ToFloat64(Refused.WithLabelValues(ReasonSubscribeDenied)) - subDenied; d != 9 {
		t.Errorf("refused_total{subscribe_denied} went up by %v, want 9", d)
	}

	// Unsupported IoT Hub topics: QoS 0 dropped, counted, not handed on.
	pubDenied := testutil.ToFloat64(Refused.WithLabelValues(ReasonPublishDenied))
	for _, topic := range []string{
		"$iothub/methods/res/200/?$rid=1",
		"$iothub/twin/res/200/?$rid=1",
		"$iothub/twin/PATCH/properties/desired/?$version=9",
		"devices/dev-1/messages/events/",
		"$kubetwin/iothub/dev-2/twin/res/200/?$rid=1",
	} {
		dev.publish(topic, 0, "{}")
	}
	eventually(t, "5 publishes are refused", func() bool {
		return testutil.ToFloat64(Refused.WithLabelValues(ReasonPublishDenied))-pubDenied == 5
	})
	f.rec.none(t, 300*time.Millisecond)
	other.none(100 * time.Millisecond)
	// QoS 1: the MQTT 3.1.1 device is disconnected.
	dev.c.Publish("$iothub/methods/res/200/?$rid=1", 1, false, "{}")
	select {
	case <-dev.lost:
	case <-time.After(waitTimeout):
		t.Fatal("device not disconnected after a QoS 1 publish on an unsupported topic")
	}
}

func TestIoTHubWithoutAuthenticator(t *testing.T) {
	// Without an Authenticator every client may use every topic, but the
	// "$iothub" and "$kubetwin" namespaces stay the broker's.
	f := startIoTHub(t, false, bridgeLike)
	forwarded := f.observeForwarded(t)
	dev := connectIoTHub(t, iothubOpts(f.bus.Addr(), "dev-1"), "")
	dev.subscribeTwin()
	rogue := connectIoTHub(t, deviceOpts(f.bus.Addr(), "rogue"), "")
	got := rogue.subscribe(map[string]byte{"$iothub/#": 0, "$kubetwin/#": 0, "$kubetwin/iothub/dev-1/#": 0})
	if got["$iothub/#"] != 0 || got["$kubetwin/#"] != 0x80 || got["$kubetwin/iothub/dev-1/#"] != 0x80 {
		t.Errorf("SUBACK %v", got)
	}
	// A client id in the broker's namespace would pass for its messages.
	reserved := testutil.ToFloat64(Refused.WithLabelValues(ReasonReservedClientID))
	for _, id := range []string{"$kubetwin/iothub/desired/5", "$kubetwin"} {
		tok := paho.NewClient(deviceOpts(f.bus.Addr(), id)).Connect()
		if !tok.WaitTimeout(waitTimeout) || tok.(*paho.ConnectToken).ReturnCode() != 5 {
			t.Errorf("client id %q: CONNACK %d, want 5", id, tok.(*paho.ConnectToken).ReturnCode())
		}
	}
	if d := testutil.ToFloat64(Refused.WithLabelValues(ReasonReservedClientID)) - reserved; d != 2 {
		t.Errorf("refused_total{reserved_client_id} went up by %v, want 2", d)
	}
	denied := testutil.ToFloat64(Refused.WithLabelValues(ReasonPublishDenied))
	rogue.publish("$iothub/twin/res/200/?$rid=r1", 1, `{"desired":{"evil":true}}`)
	rogue.publish("$iothub/twin/PATCH/properties/desired/?$version=99", 0, `{"evil":true}`)
	rogue.publish("$kubetwin/iothub/dev-1/twin/res/200/?$rid=r1", 0, `{"evil":true}`)
	// (A QoS 0 publish is complete once sent, so the broker may not have
	// read the last ones yet.)
	eventually(t, "3 publishes are refused", func() bool {
		return testutil.ToFloat64(Refused.WithLabelValues(ReasonPublishDenied))-denied == 3
	})
	dev.get("r1")
	expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindGet, RequestID: "r1"}, " ")
	dev.expect("$iothub/twin/res/200/?$rid=r1", bridgeGetPayload("dev-1"), 0)
	f.nextAck(t, "dev-1", 3)
	dev.none(300 * time.Millisecond)
	rogue.none(100 * time.Millisecond)
	f.rec.none(t, 100*time.Millisecond)
	noneForwarded(t, forwarded)
}

func TestIoTHubRequestsBounded(t *testing.T) {
	var r iothubRequests
	t0 := time.Now()
	r.add("d", "a", "c", t0)
	r.add("d", "b", "c", t0)
	if id, ok := r.take("d", "a", t0.Add(time.Second)); !ok || id != "c" {
		t.Fatalf("take a = %q, %v", id, ok)
	}
	if _, ok := r.take("d", "a", t0.Add(time.Second)); ok {
		t.Fatal("taken twice")
	}
	if _, ok := r.take("e", "b", t0); ok {
		t.Fatal("another device's request")
	}
	// Expired: not answered in the dialect, and swept away.
	if _, ok := r.take("d", "b", t0.Add(iothubRequestTTL+time.Second)); ok {
		t.Fatal("expired request taken")
	}
	r.add("d", "old", "c", t0)
	r.add("x", "new", "c", t0.Add(iothubRequestTTL+time.Minute))
	if len(r.devices) != 1 || len(r.devices["x"]) != 1 {
		t.Fatalf("after sweep: %v", r.devices)
	}
	// At most iothubMaxRequestsPerDevice per device; the oldest goes.
	for i := range iothubMaxRequestsPerDevice + 1 {
		r.add("y", fmt.Sprint(i), "c", t0.Add(iothubRequestTTL+time.Minute+time.Duration(i)))
	}
	if n := len(r.devices["y"]); n != iothubMaxRequestsPerDevice {
		t.Fatalf("%d requests remembered", n)
	}
	if _, ok := r.devices["y"]["0"]; ok {
		t.Fatal("the oldest request was kept")
	}
}
