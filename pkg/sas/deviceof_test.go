package sas

import (
	"errors"
	"net/url"
	"testing"
	"time"
)

// TestForDeviceEscapedIDs: device ids with "%", "+" and the like match
// tokens signed the documented way (sr is the URL-encoded
// "<host>/devices/<id>", so the id is encoded once) and with the id
// encoded once more; a token for one id never matches another.
func TestForDeviceEscapedIDs(t *testing.T) {
	key := vectorKeyBytes(t)
	for _, id := range []string{"a%41", "a%2Fb", "a+b", "a%2541", "plain", "x:y=z@$'"} {
		forms := map[string]string{
			"documented":         "hub/devices/" + id,
			"id encoded (query)": "hub/devices/" + url.QueryEscape(id),
			"id encoded (path)":  "hub/devices/" + url.PathEscape(id),
		}
		for form, res := range forms {
			tok, err := Parse(Sign(res, key, time.Unix(1, 0), ""))
			if err != nil {
				t.Fatal(err)
			}
			if !tok.ForDevice(id) {
				_, got, _ := tok.DeviceOf()
				t.Errorf("%s, %s: ForDevice(%q) = false (DeviceOf id %q)", id, form, id, got)
			}
		}
	}
	// The documented form of "a%41" names "a%41", never "aA" (no encoder
	// escapes a letter). ("a%2541" does name "a%41" encoded twice too: only
	// the key tells them apart, as in IoT Hub.)
	for id, notFor := range map[string]string{"a%41": "aA", "aA": "a%41", "a%2Fb": "a%2fb", "a%7Eb": "a~b"} {
		tok, err := Parse(Sign(DeviceResource("hub", id), key, time.Unix(1, 0), ""))
		if err != nil {
			t.Fatal(err)
		}
		if _, got, err := tok.DeviceOf(); err != nil || got != id {
			t.Errorf("DeviceOf of %q's token = %q, %v", id, got, err)
		}
		if tok.ForDevice(notFor) {
			t.Errorf("the token of %q is accepted for %q", id, notFor)
		}
	}
}

func TestCheckLifetime(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	key := vectorKeyBytes(t)
	for _, c := range []struct {
		valid, max time.Duration
		ok         bool
	}{
		{time.Hour, DefaultMaxLifetime, true},
		{DefaultMaxLifetime, DefaultMaxLifetime, true},
		{DefaultMaxLifetime + time.Second, DefaultMaxLifetime, false},
		{100 * DefaultMaxLifetime, DefaultMaxLifetime, false},
		{100 * DefaultMaxLifetime, 0, true},
		{-time.Hour, time.Minute, true}, // expired: Expired's business
	} {
		tok, err := Parse(Sign("hub/devices/d", key, now.Add(c.valid), ""))
		if err != nil {
			t.Fatal(err)
		}
		err = tok.CheckLifetime(now, c.max)
		if (err == nil) != c.ok || (err != nil && !errors.Is(err, ErrLifetimeTooLong)) {
			t.Errorf("valid %s, max %s: CheckLifetime = %v", c.valid, c.max, err)
		}
	}
	tok, _ := Parse(Sign("hub/devices/d", key, now.Add(100*DefaultMaxLifetime), ""))
	want := "SAS token lifetime too long: it expires at 2123-10-21T22:13:20Z, 876000h0m0s from now, more than the 8760h0m0s allowed"
	if err := tok.CheckLifetime(now, DefaultMaxLifetime); err == nil || err.Error() != want {
		t.Errorf("CheckLifetime = %v\nwant %s", err, want)
	}
}
