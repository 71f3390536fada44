package abuse

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/kubetwin/kubetwin/internal/testutil/mosquitto"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// external is an operator bridging devices through a real Mosquitto with
// the ACL docs/protocol.md recommends: each client may use only
// kubetwin/v1/<its client id>/#, the operator everything under kubetwin/v1.
type external struct {
	ns   string
	addr string
	op   *operatorProc
}

func startExternal(t *testing.T) *external {
	t.Helper()
	dir := t.TempDir()
	pw := randomHex(12)
	pwFile := filepath.Join(dir, "passwd")
	if out, err := exec.Command(passwdBin, "-b", "-c", pwFile, "kubetwin-operator", pw).CombinedOutput(); err != nil {
		t.Fatalf("mosquitto_passwd: %v\n%s", err, out)
	}
	aclFile := filepath.Join(dir, "acl")
	acl := "pattern readwrite kubetwin/v1/%c/#\n\nuser kubetwin-operator\ntopic readwrite kubetwin/v1/#\n"
	if err := os.WriteFile(aclFile, []byte(acl), 0o644); err != nil {
		t.Fatal(err)
	}
	opPW := filepath.Join(dir, "operator-password")
	if err := os.WriteFile(opPW, []byte(pw), 0o600); err != nil {
		t.Fatal(err)
	}
	// "user root": Mosquitto started as root would otherwise switch to the
	// user mosquitto, which cannot read the test's files.
	x := &external{ns: newNamespace(t)}
	x.addr = mosquitto.Start(t, fmt.Sprintf("allow_anonymous true\nuser root\npassword_file %s\nacl_file %s\n", pwFile, aclFile))
	x.op = newOperatorProc(t, "operator-mosquitto", false,
		"--namespace="+x.ns,
		"--claims-namespace="+x.ns,
		"--device-auth=none",
		"--broker-url=tcp://"+x.addr,
		"--broker-client-id=kubetwin-operator-"+x.ns,
		"--broker-username=kubetwin-operator",
		"--broker-password-file="+opPW,
		"--service-api-bind-address=",
	)
	x.op.probe = func() error { return probeGet(x.addr, nil, "", "") }
	x.op.start()
	return x
}

// device connects an anonymous client with the device's id as client id
// and subscribes it to its responses.
func (x *external) device(t *testing.T, id string) *rawConn {
	t.Helper()
	c, err := dialRaw(x.addr, dialOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if _, code, err := c.connect(id, "", "", true); err != nil || code != 0 {
		t.Fatalf("%s: CONNECT to Mosquitto: %d, %v", id, code, err)
	}
	if g, err := c.subscribe(nextID(), protocol.ResponseFilter(id), 1); err != nil || g > 2 {
		t.Fatalf("%s: SUBSCRIBE: %d, %v", id, g, err)
	}
	return c
}

// reportedOf reads status.reported of a twin in the external namespace.
func (x *external) reportedOf(id string) (map[string]any, error) {
	h := &harness{ns: x.ns}
	tw, err := h.getTwin(id)
	if err != nil {
		return nil, err
	}
	return reported(tw), nil
}

// attackRetainedExternal: a reported patch a device left retained on
// Mosquitto must not be applied again when the operator reconnects (it
// would roll the device's reported state back).
func attackRetainedExternal(t *testing.T, h *harness) {
	x := startExternal(t)
	const id = "ext-0000"
	if err := createTwin(x.ns, id, ""); err != nil {
		t.Fatal(err)
	}
	waitObserved(t, x.ns, id)
	c := x.device(t, id)
	r1 := h.rid("r1")
	if err := c.send(publishPacket(protocol.ReportedTopic(id, r1), []byte(`{"v":1}`), 1, true, nextID()), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if r, err := awaitResponse(c, id, r1, 30*time.Second); err != nil || r.Status != protocol.StatusNoContent {
		t.Fatalf("the retained-flagged report: %+v, %v", r, err)
	}
	report(t, c, id, h.rid("r2"), `{"v":2}`)

	x.op.stop()
	x.op.start()
	// Mosquitto sends retained messages as the operator subscribes, so
	// they come before this report.
	report(t, c, id, h.rid("r3"), `{"w":1}`)
	check := func() error {
		r, err := x.reportedOf(id)
		if err != nil {
			return err
		}
		if v, _ := json.Marshal(r["v"]); string(v) != "2" {
			return fmt.Errorf("status.reported.v is %s", v)
		}
		return nil
	}
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if err := check(); err != nil {
			t.Fatalf("after the operator reconnected to Mosquitto, %s's reported state rolled back to its retained patch {\"v\":1}: %v (the operator must ignore retained messages, broker-sessions, item 8)", id, err)
		}
	}
}

// attackEscapes: under the %c ACL, a client whose id is a non-canonical
// escape of another device's id (%64ev1 for dev1) must not write into
// that device's twin.
func attackEscapes(t *testing.T, h *harness) {
	x := startExternal(t)
	const victim, spoof = "dev1", "%64ev1"
	if err := createTwin(x.ns, victim, ""); err != nil {
		t.Fatal(err)
	}
	waitObserved(t, x.ns, victim)
	atk := x.device(t, spoof)
	topic := protocol.Root + "/" + spoof + "/" + protocol.KindReported + "/" + h.rid("x1")
	if err := atk.send(publishPacket(topic, []byte(`{"owned":true}`), 1, false, nextID()), 5*time.Second); err != nil {
		t.Fatal(err)
	}
	// Mosquitto's PUBACK: it has taken the message and passed it on.
	for deadline := time.Now().Add(10 * time.Second); ; {
		p, err := atk.read(deadline)
		if err != nil {
			t.Fatalf("%s: no PUBACK from Mosquitto (did the ACL refuse it?): %v", spoof, err)
		}
		if p.typ() == pktPuback {
			break
		}
		atk.ackPublish(p)
	}
	// The victim's own report goes through the same device's queue after
	// the spoofed one (if the operator took it for dev1's).
	dev := x.device(t, victim)
	report(t, dev, victim, h.rid("s1"), `{"seq":1}`)
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		r, err := x.reportedOf(victim)
		if err != nil {
			t.Fatal(err)
		}
		if _, owned := r["owned"]; owned {
			t.Fatalf("client %q published on %s and wrote into %s's twin (%v): non-canonical topic escapes are accepted (service-api, item 10)", spoof, topic, victim, r)
		}
	}
}
