package main

import (
	"slices"
	"strings"
	"testing"

	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/ratelog"
)

func TestCheckSecurityFlags(t *testing.T) {
	ok := options{deviceAuth: deviceAuthSAS, hubHostname: "hub", mqtt: mqttOptions{tlsListen: ":8883",
		sessionExpiry: bus.DefaultSessionExpiry, maxSessionQueue: bus.DefaultMaxSessionQueue, logRateLimit: ratelog.DefaultRate}}
	if err := checkSecurityFlags(ok); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	for name, tc := range map[string]struct {
		change func(o *options)
		want   string
	}{
		"unknown mode":        {func(o *options) { o.deviceAuth = "tls" }, "--device-auth"},
		"no hub host name":    {func(o *options) { o.hubHostname = "" }, "--hub-hostname"},
		"dynsec, embedded":    {func(o *options) { o.mosquittoDynsec = true }, "--broker-url"},
		"dynsec, no auth":     {func(o *options) { o.mosquittoDynsec, o.brokerURL, o.deviceAuth = true, "tcp://m:1883", deviceAuthNone }, "--device-auth=sas"},
		"no listener":         {func(o *options) { o.mqtt.tlsListen = "" }, "needs a listener"},
		"cert without key":    {func(o *options) { o.mqtt.certFile = "c.pem" }, "go together"},
		"admin, external":     {func(o *options) { o.mqtt.adminPasswordFile, o.brokerURL = "f", "tcp://m:1883" }, "embedded broker"},
		"admin, without auth": {func(o *options) { o.mqtt.adminPasswordFile, o.deviceAuth = "f", deviceAuthNone }, "embedded broker"},
		"session expiry 0":    {func(o *options) { o.mqtt.sessionExpiry = 0 }, "--mqtt-session-expiry"},
		"session queue 0":     {func(o *options) { o.mqtt.maxSessionQueue = 0 }, "--mqtt-max-session-queue"},
		"session queue 65536": {func(o *options) { o.mqtt.maxSessionQueue = 65536 }, "--mqtt-max-session-queue"},
		"log rate negative":   {func(o *options) { o.mqtt.logRateLimit = -1 }, "--log-rate-limit"},
	} {
		t.Run(name, func(t *testing.T) {
			o := ok
			tc.change(&o)
			err := checkSecurityFlags(o)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one mentioning %q", err, tc.want)
			}
		})
	}
	plainOnly := ok
	plainOnly.mqtt.tlsListen, plainOnly.mqttListen, plainOnly.deviceAuth = "", ":1883", deviceAuthNone
	if err := checkSecurityFlags(plainOnly); err != nil {
		t.Errorf("plain listener without auth (tests): %v", err)
	}
}

func TestMQTTHosts(t *testing.T) {
	o := options{hubHostname: "mqtt.example.com:8883"}
	_ = o.mqtt.hosts.Set("kubetwin-mqtt.kubetwin-system.svc, LOCALHOST")
	want := []string{"mqtt.example.com", "localhost", "127.0.0.1", "kubetwin-mqtt.kubetwin-system.svc"}
	if got := mqttHosts(o); !slices.Equal(got, want) {
		t.Errorf("mqttHosts = %v, want %v", got, want)
	}
}
