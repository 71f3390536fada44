package dynsec

import (
	"context"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha512"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/go-logr/logr/testr"

	"github.com/kubetwin/kubetwin/internal/deviceauth"
	"github.com/kubetwin/kubetwin/internal/testutil/mosquitto"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

const plugin = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"

// startBroker runs Mosquitto with the dynamic-security plugin and one
// client, admin (password pw), which may administer the plugin.
func startBroker(t testing.TB, pw string) string {
	t.Helper()
	if _, err := os.Stat(plugin); err != nil {
		t.Fatalf("Mosquitto's dynamic-security plugin is not installed (%v); Debian's mosquitto package has it", err)
	}
	salt := make([]byte, 12)
	_, _ = rand.Read(salt)
	hash, err := pbkdf2.Key(sha512.New, pw, salt, 101, 64)
	if err != nil {
		t.Fatal(err)
	}
	acl := func(typ string) map[string]any {
		return map[string]any{"acltype": typ, "topic": "$CONTROL/dynamic-security/#", "allow": true}
	}
	cfg := map[string]any{
		"defaultACLAccess": map[string]bool{"publishClientSend": false, "publishClientReceive": true, "subscribe": false, "unsubscribe": true},
		"clients": []any{map[string]any{
			"username": "admin", "password": base64.StdEncoding.EncodeToString(hash),
			"salt": base64.StdEncoding.EncodeToString(salt), "iterations": 101,
			"roles": []any{map[string]any{"rolename": "admin"}},
		}},
		"roles": []any{map[string]any{"rolename": "admin",
			"acls": []any{acl("publishClientSend"), acl("publishClientReceive"), acl("subscribePattern")}}},
	}
	b, _ := json.Marshal(cfg)
	file := filepath.Join(t.TempDir(), "dynamic-security.json")
	if err := os.WriteFile(file, b, 0o600); err != nil {
		t.Fatal(err)
	}
	// "user root": as root, Mosquitto would otherwise switch to the user
	// mosquitto, which cannot read the test's files.
	return mosquitto.Start(t, fmt.Sprintf("allow_anonymous false\nuser root\nplugin %s\nplugin_opt_config_file %s\n", plugin, file))
}

// running is a started Client, stopped by stop or at the test's end.
type running struct {
	*Client
	stop func()
}

// startClient starts a Client (an operator's) and waits until it has read
// the plugin's clients.
func startClient(t testing.TB, addr, pw string, key []byte, devices map[string]bool, pageSize int) running {
	t.Helper()
	o := Options{BrokerURL: "tcp://" + addr, Username: "admin", Password: pw, ClientID: "op-dynsec",
		Logger: testr.NewWithInterface(t, testr.Options{}), PageSize: pageSize,
		FingerprintKey: func(context.Context) ([]byte, error) { return key, nil }}
	if devices != nil {
		o.Devices = func(context.Context) (map[string]bool, error) { return devices, nil }
	}
	c, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = c.Start(ctx); close(done) }()
	var once sync.Once
	stop := func() { once.Do(func() { cancel(); <-done }) }
	t.Cleanup(stop)
	select {
	case <-c.ready:
	case <-time.After(20 * time.Second):
		t.Fatal("the client did not finish reading the plugin's clients")
	}
	return running{c, stop}
}

// connect dials the broker as a device; nil error means CONNACK 0.
func connect(addr, id, password string, lost chan<- string) (paho.Client, error) {
	o := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(id).SetUsername(id).SetPassword(password).
		SetProtocolVersion(4).SetAutoReconnect(false).SetConnectRetry(false).SetConnectTimeout(5 * time.Second)
	if lost != nil {
		o.SetConnectionLostHandler(func(paho.Client, error) { lost <- id })
	}
	c := paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(10 * time.Second) {
		return nil, fmt.Errorf("%s: no CONNACK", id)
	}
	return c, tok.Error()
}

// TestRestartOnUnchangedFleet: an operator restart on an unchanged fleet
// sends the plugin only the listClients pages — no command per device, and
// no device is disconnected. A key changed while the operator was down is
// provisioned (the old key refused, the new one let in), a device whose
// twin went is removed, and a client fingerprinted by an older operator is
// left alone. The old code sent getRole and getClient for every device.
func TestRestartOnUnchangedFleet(t *testing.T) {
	pw := sas.NewKey()
	addr := startBroker(t, pw)
	key := []byte("0123456789abcdef0123456789abcdef")
	ctx := context.Background()

	const n = 30
	keys := map[string]string{}
	devices := map[string]bool{}
	for i := range n {
		id := fmt.Sprintf("dev-%02d", i)
		keys[id], devices[id] = sas.NewKey(), true
	}
	first := startClient(t, addr, pw, key, devices, 0)
	for id, k := range keys {
		if err := first.Provision(ctx, deviceauth.Device{ID: id, PrimaryKey: k}); err != nil {
			t.Fatal(err)
		}
	}
	// A client an older operator provisioned (unkeyed fingerprint).
	legacyKey := sas.NewKey()
	if err := first.doAll(ctx, []Command{
		{"command": "createRole", "rolename": RoleName("old-1"), "textname": ManagedTextName, "acls": deviceACLs("old-1")},
		{"command": "createClient", "username": "old-1", "clientid": "old-1", "password": legacyKey, "textname": ManagedTextName,
			"textdescription": legacyMarker("old-1", legacyKey), "roles": []map[string]any{{"rolename": RoleName("old-1")}}},
	}); err != nil {
		t.Fatal(err)
	}
	keys["old-1"], devices["old-1"] = legacyKey, true
	lost := make(chan string, 10)
	stay, err := connect(addr, "dev-03", keys["dev-03"], lost)
	if err != nil {
		t.Fatalf("dev-03 with its key: %v", err)
	}
	defer stay.Disconnect(0)
	first.stop()

	// While the operator is down: dev-05 is re-keyed, dev-07's twin deleted.
	oldKey5 := keys["dev-05"]
	keys["dev-05"] = sas.NewKey()
	delete(keys, "dev-07")
	delete(devices, "dev-07")

	// 31 of kubetwin's clients and admin: 5 pages of 7.
	second := startClient(t, addr, pw, key, devices, 7)
	if got, want := second.CommandsSent(), uint64(5+2); got != want {
		t.Errorf("start-up sent %d commands, want %d (5 listClients pages, deleteClient and deleteRole of dev-07)", got, want)
	}
	p := deviceauth.OnChange(second.Client) // as the operator wraps it
	for id, k := range keys {
		before := second.CommandsSent()
		if err := p.Provision(ctx, deviceauth.Device{ID: id, PrimaryKey: k}); err != nil {
			t.Fatal(err)
		}
		sent := second.CommandsSent() - before
		switch {
		case id == "dev-05" && sent != 3:
			t.Errorf("re-keyed dev-05: %d commands, want 3 (getRole, getClient, modifyClient)", sent)
		case id != "dev-05" && sent != 0:
			t.Errorf("unchanged %s: %d commands, want none", id, sent)
		}
	}

	select {
	case id := <-lost:
		t.Errorf("%s was disconnected by the restart", id)
	default:
	}
	if !stay.IsConnectionOpen() {
		t.Error("dev-03 was disconnected by the restart")
	}
	for id, k := range map[string]string{"dev-05": keys["dev-05"], "dev-11": keys["dev-11"], "old-1": legacyKey} {
		c, err := connect(addr, id, k, nil)
		if err != nil {
			t.Errorf("%s with its key after the restart: %v", id, err)
			continue
		}
		c.Disconnect(0)
	}
	for what, cred := range map[string][2]string{"dev-05's old key": {"dev-05", oldKey5}, "deleted dev-07": {"dev-07", "any"}} {
		if c, err := connect(addr, cred[0], cred[1], nil); err == nil {
			c.Disconnect(0)
			t.Errorf("%s was let in", what)
		}
	}
	rs, err := second.Do(ctx, Command{"command": "getClient", "username": "dev-07"}, Command{"command": "getRole", "rolename": RoleName("dev-07")})
	if err != nil {
		t.Fatal(err)
	}
	if rs[0].Error != errClientNotFound || rs[1].Error != errRoleNotFound {
		t.Errorf("dev-07's client and role are still there: %+v", rs)
	}
	// The fingerprint is keyed and never holds the key.
	rs, err = second.Do(ctx, Command{"command": "getClient", "username": "dev-05"})
	if err != nil {
		t.Fatal(err)
	}
	var ci clientInfo
	if err := json.Unmarshal(rs[0].Data, &ci); err != nil {
		t.Fatal(err)
	}
	if d := ci.Client.TextDescription; d != marker(key, "dev-05", keys["dev-05"]) || strings.Contains(d, keys["dev-05"]) {
		t.Errorf("dev-05's textdescription is %q", d)
	}
}

// TestStartWithoutSecretChangesNothing: a Client whose fingerprint key is
// too short refuses to start (naming the problem) and sends nothing.
func TestStartWithoutSecretChangesNothing(t *testing.T) {
	c, err := New(Options{BrokerURL: "tcp://127.0.0.1:1", ClientID: "x",
		FingerprintKey: func(context.Context) ([]byte, error) { return []byte("short"), nil }})
	if err != nil {
		t.Fatal(err)
	}
	err = c.startup(context.Background())
	if err == nil || !strings.Contains(err.Error(), "fingerprint key is 5 bytes long, want at least 16") {
		t.Fatalf("startup: %v", err)
	}
	if c.CommandsSent() != 0 {
		t.Error("commands were sent")
	}
	if _, err := New(Options{BrokerURL: "tcp://127.0.0.1:1", ClientID: "x"}); err == nil || !strings.Contains(err.Error(), "FingerprintKey") {
		t.Errorf("New without FingerprintKey: %v", err)
	}
}
