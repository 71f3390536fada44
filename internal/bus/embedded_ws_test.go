package bus

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// TestWebSocketMQTT: a device speaking MQTT over WebSockets through
// WebSocketHandler is a client like any other: authenticated, confined,
// answered in the IoT Hub dialect, present.
func TestWebSocketMQTT(t *testing.T) {
	f := startIoTHub(t, true, bridgeLike)
	mux := http.NewServeMux()
	mux.Handle(WebSocketPath, f.bus.WebSocketHandler())
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	url := "ws://" + strings.TrimPrefix(srv.URL, "http://") + WebSocketPath

	o := iothubOpts(f.bus.Addr(), "dev-1")
	o.Servers = nil
	o.AddBroker(url)
	dev := connectIoTHub(t, o, "ok")
	dev.subscribeTwin()
	dev.get("w1")
	expectRequest(t, f.rec, protocol.Inbound{DeviceID: "dev-1", Kind: protocol.KindGet, RequestID: "w1"}, " ")
	dev.expect("$iothub/twin/res/200/?$rid=w1", bridgeGetPayload("dev-1"), 0)
	f.nextAck(t, "dev-1", 3)
	f.publishDesiredPatch(t, "dev-1", `{"fan":null,"$version":4}`)
	dev.expect("$iothub/twin/PATCH/properties/desired/?$version=4", `{"fan":null,"$version":4}`, 0)

	// The same authentication: a wrong credential is refused.
	bad := iothubOpts(f.bus.Addr(), "dev-2")
	bad.Servers = nil
	bad.AddBroker(url)
	bad.SetUsername("myhub.azure-devices.net/dev-2/?api-version=2021-04-12").SetPassword("wrong")
	c := paho.NewClient(bad)
	if tok := c.Connect(); tok.WaitTimeout(waitTimeout) && tok.Error() == nil {
		c.Disconnect(0)
		t.Fatal("a wrong password was accepted over WebSockets")
	}

	// Not a WebSocket upgrade: 400 with what to do.
	resp, err := http.Get(srv.URL + WebSocketPath)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("plain GET: %d, want 400", resp.StatusCode)
	}
}

// TestWebSocketWhileStopped: a replica whose broker does not run answers 503.
func TestWebSocketWhileStopped(t *testing.T) {
	e, err := NewEmbedded(EmbeddedOptions{Listen: "127.0.0.1:0", Handler: func(Message) {}})
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodGet, WebSocketPath, nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	e.WebSocketHandler().ServeHTTP(rec, req)
	if rec.Code != http.StatusServiceUnavailable {
		t.Errorf("status %d, want 503", rec.Code)
	}
}
