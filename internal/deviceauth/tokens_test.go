package deviceauth

import (
	"context"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// TestMaxTokenLifetime: a token whose expiry is further than
// MaxTokenLifetime from now is refused with its own reason and a message
// that says why; one within it, or any with no bound, is accepted.
func TestMaxTokenLifetime(t *testing.T) {
	a := &Authenticator{HubHostname: "hub.example", Now: func() time.Time { return now },
		MaxTokenLifetime: sas.DefaultMaxLifetime, Lookup: lookup(Device{ID: "dev-1", PrimaryKey: primary})}
	for _, c := range []struct {
		valid time.Duration
		ok    bool
	}{{time.Hour, true}, {sas.DefaultMaxLifetime, true}, {sas.DefaultMaxLifetime + time.Second, false}, {100 * 365 * 24 * time.Hour, false}} {
		_, err := a.Authenticate(context.Background(), "dev-1", "dev-1", tok(t, "hub.example", "dev-1", primary, now.Add(c.valid)))
		var r *bus.Refusal
		switch {
		case c.ok && err != nil:
			t.Errorf("valid %s: refused: %v", c.valid, err)
		case !c.ok && (!errors.As(err, &r) || r.Reason != bus.ReasonTokenLifetime ||
			!strings.Contains(r.Message, "more than the 8760h0m0s allowed (--max-sas-token-lifetime)")):
			t.Errorf("valid %s: error %v, want reason %s naming the bound", c.valid, err, bus.ReasonTokenLifetime)
		}
	}
	a.MaxTokenLifetime = 0
	if _, err := a.Authenticate(context.Background(), "dev-1", "dev-1", tok(t, "hub.example", "dev-1", primary, now.Add(100*sas.DefaultMaxLifetime))); err != nil {
		t.Errorf("no bound: refused: %v", err)
	}
}

// TestEscapedDeviceIDs: ids with "%XX" and "+" authenticate with tokens
// signed the documented way (sr is the URL-encoded "<host>/devices/<id>")
// and with the id encoded once more, and a token for "a%41" is not one
// for "aA".
func TestEscapedDeviceIDs(t *testing.T) {
	ids := []string{"a%41", "a%2Fb", "a+b", "aA"}
	var devs []Device
	for _, id := range ids {
		devs = append(devs, Device{ID: id, PrimaryKey: primary})
	}
	a := &Authenticator{HubHostname: "hub.example", Now: func() time.Time { return now }, Lookup: lookup(devs...)}
	k, _ := sas.DecodeKey(primary)
	for _, id := range ids {
		documented := []byte(sas.Sign(sas.DeviceResource("hub.example", id), k, now.Add(time.Hour), ""))
		twice := []byte(sas.Sign(sas.DeviceResource("hub.example", url.QueryEscape(id)), k, now.Add(time.Hour), ""))
		for form, pw := range map[string][]byte{"documented": documented, "id encoded twice": twice} {
			if g, err := a.Authenticate(context.Background(), id, "hub.example/"+id+"/?api-version=2021-04-12", pw); err != nil || g.DeviceID != id {
				t.Errorf("%s, %s: grant %+v, %v", id, form, g, err)
			}
		}
	}
	// Same key on both devices: only the resource tells them apart.
	pw := []byte(sas.Sign(sas.DeviceResource("hub.example", "a%41"), k, now.Add(time.Hour), ""))
	var r *bus.Refusal
	if _, err := a.Authenticate(context.Background(), "aA", "aA", pw); !errors.As(err, &r) || r.Reason != bus.ReasonWrongDevice {
		t.Errorf("a%%41's token as aA: %v, want %s", err, bus.ReasonWrongDevice)
	}
}
