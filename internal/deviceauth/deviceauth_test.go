package deviceauth

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

var (
	now     = time.Unix(1_800_000_000, 0)
	primary = sas.NewKey()
	second  = sas.NewKey()
)

func lookup(devices ...Device) Lookup {
	return func(_ context.Context, id string) (Device, error) {
		for _, d := range devices {
			if d.ID == id {
				return d, nil
			}
		}
		if id == "broken" {
			return Device{}, errors.New("cache not synced")
		}
		return Device{}, deviceid.ErrNotFound
	}
}

func tok(t *testing.T, hub, id, key string, exp time.Time) []byte {
	t.Helper()
	s, err := sas.SignDevice(hub, id, key, exp)
	if err != nil {
		t.Fatal(err)
	}
	return []byte(s)
}

func TestAuthenticate(t *testing.T) {
	a := &Authenticator{
		HubHostname:   "Hub.Example:8883",
		AdminPassword: "s3cret",
		Now:           func() time.Time { return now },
		Lookup: lookup(
			Device{ID: "dev-1", PrimaryKey: primary, SecondaryKey: second},
			Device{ID: "off", PrimaryKey: primary, Disabled: true},
			Device{ID: "keyless"},
			Device{ID: "bad-primary", PrimaryKey: "junk", SecondaryKey: second},
			Device{ID: "line+1#a", PrimaryKey: primary},
		),
	}
	later := now.Add(time.Hour)
	user := "hub.example/dev-1/?api-version=2021-04-12&DeviceClientType=x"
	for name, tc := range map[string]struct {
		clientID, username string
		password           []byte
		wantReason         string // "" = accepted
		wantAdmin          bool
	}{
		"primary key":                 {"dev-1", user, tok(t, "hub.example", "dev-1", primary, later), "", false},
		"secondary key":               {"dev-1", user, tok(t, "hub.example", "dev-1", second, later), "", false},
		"plain device id as username": {"dev-1", "dev-1", tok(t, "hub.example", "dev-1", primary, later), "", false},
		"username without suffix":     {"dev-1", "hub.example/dev-1", tok(t, "hub.example", "dev-1", primary, later), "", false},
		"hub with port and case":      {"dev-1", user, tok(t, "HUB.example:8883", "dev-1", primary, later), "", false},
		"valid key beside a bad one":  {"bad-primary", "bad-primary", tok(t, "hub.example", "bad-primary", second, later), "", false},
		"id with special characters":  {"line+1#a", "line+1#a", tok(t, "hub.example", "line+1#a", primary, later), "", false},
		"admin":                       {"anything", AdminUsername, []byte("s3cret"), "", true},
		"admin, wrong password":       {"anything", AdminUsername, []byte("guess"), bus.ReasonBadAdminPassword, false},
		"no username":                 {"dev-1", "", tok(t, "hub.example", "dev-1", primary, later), bus.ReasonBadUsername, false},
		"username of another device":  {"dev-1", "hub.example/dev-2/", tok(t, "hub.example", "dev-1", primary, later), bus.ReasonBadUsername, false},
		"no password":                 {"dev-1", user, nil, bus.ReasonBadToken, false},
		"the key as password":         {"dev-1", user, []byte(primary), bus.ReasonBadToken, false},
		"hub token":                   {"dev-1", user, []byte(sas.Sign("hub.example", []byte("0123456789abcdef"), later, "iothubowner")), bus.ReasonBadToken, false},
		"token for another device":    {"dev-1", user, tok(t, "hub.example", "dev-2", primary, later), bus.ReasonWrongDevice, false},
		"token for another hub":       {"dev-1", user, tok(t, "other.example", "dev-1", primary, later), bus.ReasonWrongHub, false},
		"wrong key":                   {"dev-1", user, tok(t, "hub.example", "dev-1", sas.NewKey(), later), bus.ReasonBadSignature, false},
		"expired":                     {"dev-1", user, tok(t, "hub.example", "dev-1", primary, now), bus.ReasonExpired, false},
		"unknown device":              {"dev-9", "dev-9", tok(t, "hub.example", "dev-9", primary, later), bus.ReasonUnknownDevice, false},
		"disabled":                    {"off", "off", tok(t, "hub.example", "off", primary, later), bus.ReasonDisabled, false},
		"no keys":                     {"keyless", "keyless", tok(t, "hub.example", "keyless", primary, later), bus.ReasonNoKeys, false},
		"lookup fails":                {"broken", "broken", tok(t, "hub.example", "broken", primary, later), bus.ReasonError, false},
	} {
		t.Run(name, func(t *testing.T) {
			g, err := a.Authenticate(context.Background(), tc.clientID, tc.username, tc.password)
			if tc.wantReason == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				if g.Admin != tc.wantAdmin || (!g.Admin && (g.DeviceID != tc.clientID || !g.Expires.Equal(later))) {
					t.Errorf("grant %+v", g)
				}
				return
			}
			var r *bus.Refusal
			switch {
			case err == nil:
				t.Fatalf("accepted with grant %+v, want reason %s", g, tc.wantReason)
			case tc.wantReason == bus.ReasonError:
				if errors.As(err, &r) {
					t.Errorf("refusal %v, want an internal error", err)
				}
			case !errors.As(err, &r) || r.Reason != tc.wantReason:
				t.Errorf("error %v, want reason %s", err, tc.wantReason)
			}
		})
	}
}

func TestVerifyUsesTheGivenDevice(t *testing.T) {
	a := &Authenticator{HubHostname: "hub", Lookup: lookup(), Now: func() time.Time { return now }}
	p := tok(t, "hub", "d", primary, now.Add(time.Hour))
	if _, err := a.Verify(Device{ID: "d", PrimaryKey: primary}, "d", p); err != nil {
		t.Errorf("Verify with the key: %v", err)
	}
	if _, err := a.Verify(Device{ID: "d", PrimaryKey: second}, "d", p); err == nil {
		t.Error("Verify after the key was rotated out: accepted")
	}
	if _, err := a.Verify(Device{ID: "d", PrimaryKey: primary, Disabled: true}, "d", p); err == nil {
		t.Error("Verify of a disabled device: accepted")
	}
}

type countingProvisioner struct{ provisions, deprovisions int }

func (c *countingProvisioner) Provision(context.Context, Device) error { c.provisions++; return nil }
func (c *countingProvisioner) Deprovision(context.Context, string) error {
	c.deprovisions++
	return nil
}

func TestOnChange(t *testing.T) {
	ctx := context.Background()
	c := &countingProvisioner{}
	p := OnChange(c)
	d := Device{ID: "d", PrimaryKey: primary, SecondaryKey: second}
	for range 3 {
		_ = p.Provision(ctx, d)
	}
	if c.provisions != 1 {
		t.Fatalf("three Provisions of the same device: %d calls, want 1", c.provisions)
	}
	d.Disabled = true
	_ = p.Provision(ctx, d)
	d.SecondaryKey = sas.NewKey()
	_ = p.Provision(ctx, d)
	if c.provisions != 3 {
		t.Fatalf("after two changes: %d calls, want 3", c.provisions)
	}
	_ = p.Deprovision(ctx, "d")
	_ = p.Provision(ctx, d)
	if c.deprovisions != 1 || c.provisions != 4 {
		t.Fatalf("after Deprovision: %d provisions, %d deprovisions", c.provisions, c.deprovisions)
	}
}

// BenchmarkVerify is the embedded broker's recheck of a connected device,
// which the reconciler runs on every reconcile of its twin.
func BenchmarkVerify(b *testing.B) {
	a := &Authenticator{HubHostname: "hub", Lookup: lookup()}
	d := Device{ID: "dev-1", PrimaryKey: primary, SecondaryKey: second}
	s, _ := sas.SignDevice("hub", "dev-1", second, time.Now().Add(time.Hour))
	p := []byte(s)
	for b.Loop() {
		if _, err := a.Verify(d, "hub/dev-1/?api-version=2021-04-12", p); err != nil {
			b.Fatal(err)
		}
	}
}
