package main

import (
	"flag"
	"strings"
	"testing"
	"time"

	"github.com/kubetwin/kubetwin/internal/bus"
)

func TestMQTTLimitFlags(t *testing.T) {
	fs := flag.CommandLine
	flag.CommandLine = flag.NewFlagSet("test", flag.ContinueOnError)
	defer func() { flag.CommandLine = fs }()
	var l bus.EmbeddedLimits
	bindMQTTLimitFlags(&l)
	want := bus.EmbeddedLimits{MaxPacketSize: 65536, ConnectTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second,
		MaxClientQueue: 256, MaxClientQueueBytes: 1 << 20, MaxConnections: 100000, MaxConnectionsPerIP: 1000}
	if l != want {
		t.Fatalf("flag defaults %+v, want %+v", l, want)
	}
	if err := checkLimitFlags(l); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	if err := flag.CommandLine.Parse([]string{"--mqtt-max-packet-size=1048576", "--mqtt-connect-timeout=3s", "--mqtt-write-timeout=5s",
		"--mqtt-max-client-queue=64", "--mqtt-max-client-queue-bytes=65536", "--mqtt-max-connections=10", "--mqtt-max-connections-per-ip=2"}); err != nil {
		t.Fatal(err)
	}
	if want := (bus.EmbeddedLimits{MaxPacketSize: 1 << 20, ConnectTimeout: 3 * time.Second, WriteTimeout: 5 * time.Second,
		MaxClientQueue: 64, MaxClientQueueBytes: 65536, MaxConnections: 10, MaxConnectionsPerIP: 2}); l != want {
		t.Errorf("parsed %+v, want %+v", l, want)
	}
	for name, tc := range map[string]struct {
		change func(l *bus.EmbeddedLimits)
		want   string
	}{
		"packet size 100":   {func(l *bus.EmbeddedLimits) { l.MaxPacketSize = 100 }, "--mqtt-max-packet-size"},
		"packet size 1 GiB": {func(l *bus.EmbeddedLimits) { l.MaxPacketSize = 1 << 30 }, "--mqtt-max-packet-size"},
		"connect timeout 0": {func(l *bus.EmbeddedLimits) { l.ConnectTimeout = 0 }, "--mqtt-connect-timeout"},
		"write timeout -1s": {func(l *bus.EmbeddedLimits) { l.WriteTimeout = -time.Second }, "--mqtt-write-timeout"},
		"client queue 0":    {func(l *bus.EmbeddedLimits) { l.MaxClientQueue = 0 }, "--mqtt-max-client-queue"},
		"queue bytes 100":   {func(l *bus.EmbeddedLimits) { l.MaxClientQueueBytes = 100 }, "--mqtt-max-client-queue-bytes"},
		"connections 0":     {func(l *bus.EmbeddedLimits) { l.MaxConnections = 0 }, "--mqtt-max-connections "},
		"per IP 0":          {func(l *bus.EmbeddedLimits) { l.MaxConnectionsPerIP = 0 }, "--mqtt-max-connections-per-ip"},
	} {
		t.Run(name, func(t *testing.T) {
			l := want
			tc.change(&l)
			if err := checkLimitFlags(l); err == nil || !strings.Contains(err.Error()+" ", tc.want) {
				t.Errorf("error %v, want one naming %q", err, tc.want)
			}
		})
	}
}
