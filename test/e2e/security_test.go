package e2e

import (
	"context"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha512"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/pkg/device"
	"github.com/kubetwin/kubetwin/pkg/protocol"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// secret reads a Secret, waiting for it.
func secret(t *testing.T, ns, name string) *corev1.Secret {
	t.Helper()
	s := &corev1.Secret{}
	NewWithT(t).Eventually(func() error {
		return k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, s)
	}, wait, tick).Should(Succeed(), "Secret %s/%s", ns, name)
	return s
}

func primaryKey(t *testing.T, ns, twin string) string {
	t.Helper()
	return string(secret(t, ns, v1alpha1.KeySecretName(twin)).Data[v1alpha1.PrimaryKeyKey])
}

// patchSecret merge-patches a Secret's stringData.
func patchSecret(t *testing.T, ns, name string, data map[string]string) {
	t.Helper()
	b, _ := json.Marshal(map[string]any{"stringData": data})
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	if err := k8s.Patch(context.Background(), s, client.RawPatch("application/merge-patch+json", b)); err != nil {
		t.Fatal(err)
	}
}

// mqttConn is a raw MQTT 3.1.1 connection that records what it receives
// and whether the broker dropped it.
type mqttConn struct {
	paho.Client
	mu   sync.Mutex
	got  []string
	lost chan struct{}
}

func (c *mqttConn) received() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.got...)
}

// dialMQTT connects to addr and returns the connection, the CONNACK return
// code and the connect error.
func dialMQTT(t *testing.T, addr, clientID, user, password string) (*mqttConn, byte, error) {
	t.Helper()
	c := &mqttConn{lost: make(chan struct{})}
	var once sync.Once
	o := paho.NewClientOptions().AddBroker("tcp://" + addr).SetClientID(clientID).SetUsername(user).SetPassword(password).
		SetProtocolVersion(4).SetCleanSession(true).SetAutoReconnect(false).SetConnectTimeout(5 * time.Second).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) {
			c.mu.Lock()
			c.got = append(c.got, m.Topic()+" "+string(m.Payload()))
			c.mu.Unlock()
		}).
		SetConnectionLostHandler(func(paho.Client, error) { once.Do(func() { close(c.lost) }) })
	c.Client = paho.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(wait) {
		t.Fatalf("%s: no CONNACK from %s", clientID, addr)
	}
	if tok.Error() == nil {
		t.Cleanup(func() { c.Disconnect(0) })
	}
	return c, tok.(*paho.ConnectToken).ReturnCode(), tok.Error()
}

// eventuallyConnects waits until a client can connect (provisioning is
// asynchronous) and returns the connection.
func eventuallyConnects(t *testing.T, addr, clientID, user string, password func() string) *mqttConn {
	t.Helper()
	var c *mqttConn
	NewWithT(t).Eventually(func() error {
		var err error
		c, _, err = dialMQTT(t, addr, clientID, user, password())
		return err
	}, wait, 200*time.Millisecond).Should(Succeed(), "%s connecting as %s", clientID, user)
	return c
}

// eventuallyRefused waits until the broker refuses a client with CONNACK 5.
func eventuallyRefused(t *testing.T, what, addr, clientID, user string, password func() string) {
	t.Helper()
	NewWithT(t).Eventually(func() byte {
		c, code, err := dialMQTT(t, addr, clientID, user, password())
		if err == nil {
			c.Disconnect(0)
		}
		return code
	}, wait, 200*time.Millisecond).Should(Equal(byte(5)), "%s: want CONNACK 5 (not authorized)", what)
}

// waitLost waits until the broker drops a connection.
func waitLost(t *testing.T, what string, c *mqttConn) {
	t.Helper()
	select {
	case <-c.lost:
	case <-time.After(wait):
		t.Fatalf("%s: the broker did not disconnect the device", what)
	}
}

// TestDeviceSecurityEmbedded runs the operator as shipped: the embedded
// broker on TLS with a certificate it issues, devices authenticated with
// SAS tokens. A device with its connection string and the published CA
// works; a wrong key, an untrusted broker certificate and an anonymous
// client are refused; disabling takes effect at once.
func TestDeviceSecurityEmbedded(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	dir := t.TempDir()
	adminPW := randomSuffix() + randomSuffix()
	pwFile := filepath.Join(dir, "admin-password")
	if err := os.WriteFile(pwFile, []byte(adminPW+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tlsAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	op := newOperator(t, embeddedBroker, ns, "")
	op.secure = true
	op.probeUser, op.probePassword = "kubetwin-admin", adminPW
	op.extraArgs = []string{
		"--mqtt-tls-bind-address=" + tlsAddr,
		"--hub-hostname=localhost",
		"--mqtt-tls-secret-namespace=" + ns,
		"--mqtt-admin-password-file=" + pwFile,
	}
	op.start()

	// The CA devices trust, published by the operator.
	cm := &corev1.ConfigMap{}
	g.Eventually(func() error {
		return k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: "kubetwin-mqtt-ca"}, cm)
	}, wait, tick).Should(Succeed())
	caFile := filepath.Join(dir, "ca.crt")
	g.Expect(cm.Data["ca.crt"]).To(ContainSubstring("BEGIN CERTIFICATE"))
	if err := os.WriteFile(caFile, []byte(cm.Data["ca.crt"]), 0o644); err != nil {
		t.Fatal(err)
	}

	createTwin(t, ns, "sec-a", "Sec-A", `{"mode":"eco"}`)
	cs := string(secret(t, ns, v1alpha1.KeySecretName("sec-a")).Data[v1alpha1.ConnectionStringKey])
	g.Expect(cs).To(HavePrefix("HostName=localhost;DeviceId=Sec-A;SharedAccessKey="))

	// The device with its connection string, over TLS: works.
	sim := startDeviceSim(t, "--connection-string", cs, "--broker", "ssl://"+tlsAddr, "--ca-file", caFile,
		"--apply-desired", "--report", `{"fw":"1.0"}`)
	sim.waitOutput("Sec-A: connected, desired v1")
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, "sec-a")
		g.Expect(doc(tw.Status.Reported)).To(HaveKeyWithValue("fw", "1.0"))
		g.Expect(cond(tw, v1alpha1.ConditionConnected).Status).To(Equal(metav1.ConditionTrue))
	}, wait, tick).Should(Succeed())

	run := func(args ...string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), commandWait)
		defer cancel()
		out, err := exec.CommandContext(ctx, deviceSimBin, args...).CombinedOutput()
		return string(out), err
	}
	// A wrong key: refused.
	bad := sas.ConnectionString{HostName: "localhost", DeviceID: "Sec-A", SharedAccessKey: sas.NewKey()}
	out, err := run("--connection-string", bad.String(), "--broker", "ssl://"+tlsAddr, "--ca-file", caFile, "--duration", "1s")
	g.Expect(err).To(HaveOccurred(), out)
	g.Expect(out).To(ContainSubstring("not Authorized"))
	// A broker certificate the device does not trust: the device refuses it.
	out, err = run("--connection-string", cs, "--broker", "ssl://"+tlsAddr, "--duration", "1s")
	g.Expect(err).To(HaveOccurred(), out)
	g.Expect(out).To(ContainSubstring("certificate"))
	// Anonymous on the plain listener: refused.
	_, code, err := dialMQTT(t, op.brokerAddr, "Sec-A", "", "")
	g.Expect(err).To(HaveOccurred())
	g.Expect(code).To(Equal(byte(5)))

	// Disabled: the device is dropped at once and refused; enabled: it is back.
	patchTwin(t, ns, "sec-a", `{"spec":{"status":"disabled"}}`)
	sim.waitOutput("connection to broker lost")
	g.Eventually(func(g Gomega) {
		c := cond(getTwin(g, ns, "sec-a"), v1alpha1.ConditionConnected)
		g.Expect(c.Reason).To(Equal(v1alpha1.ReasonDisabled))
	}, wait, tick).Should(Succeed())
	key := primaryKey(t, ns, "sec-a")
	tok := func() string { s, _ := sas.SignDevice("localhost", "Sec-A", key, time.Now().Add(time.Hour)); return s }
	eventuallyRefused(t, "disabled device", op.brokerAddr, "Sec-A", "localhost/Sec-A/?api-version=2021-04-12", tok)
	patchTwin(t, ns, "sec-a", `{"spec":{"status":"enabled"}}`)
	g.Eventually(func(g Gomega) {
		g.Expect(cond(getTwin(g, ns, "sec-a"), v1alpha1.ConditionConnected).Status).To(Equal(metav1.ConditionTrue))
	}, 3*wait, tick).Should(Succeed(), "the device did not reconnect once enabled")
}

// dynsecConfig writes a dynamic-security configuration with one client,
// the operator (user kubetwin-operator, password pw), which may administer
// the plugin and use every kubetwin topic: what docs/security.md has a
// user set up with mosquitto_ctrl.
func dynsecConfig(t *testing.T, path, pw string) {
	t.Helper()
	salt := make([]byte, 12)
	_, _ = rand.Read(salt)
	const iterations = 101
	hash, err := pbkdf2.Key(sha512.New, pw, salt, iterations, 64)
	if err != nil {
		t.Fatal(err)
	}
	acl := func(typ, topic string) map[string]any {
		return map[string]any{"acltype": typ, "topic": topic, "allow": true}
	}
	cfg := map[string]any{
		"defaultACLAccess": map[string]bool{"publishClientSend": false, "publishClientReceive": true, "subscribe": false, "unsubscribe": true},
		"clients": []any{map[string]any{
			"username": "kubetwin-operator", "password": base64.StdEncoding.EncodeToString(hash),
			"salt": base64.StdEncoding.EncodeToString(salt), "iterations": iterations,
			"roles": []any{map[string]any{"rolename": "admin"}, map[string]any{"rolename": "kubetwin-operator"}},
		}},
		"roles": []any{
			map[string]any{"rolename": "admin", "acls": []any{
				acl("publishClientSend", "$CONTROL/dynamic-security/#"),
				acl("publishClientReceive", "$CONTROL/dynamic-security/#"),
				acl("subscribePattern", "$CONTROL/dynamic-security/#"),
			}},
			map[string]any{"rolename": "kubetwin-operator", "acls": []any{
				acl("publishClientSend", "kubetwin/v1/#"),
				acl("publishClientReceive", "kubetwin/v1/#"),
				acl("subscribePattern", "kubetwin/v1/#"),
			}},
		},
	}
	b, _ := json.MarshalIndent(cfg, "", "  ")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// dynsecFiles returns the path of Mosquitto's dynamic-security plugin
// (failing the test when it is not installed), a plugin configuration in
// a temporary folder whose admin is the operator with a new password, the
// password, and a file holding it for --broker-password-file.
func dynsecFiles(t *testing.T) (plugin, config, password, passwordFile string) {
	t.Helper()
	plugin = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
	if _, err := os.Stat(plugin); err != nil {
		t.Fatalf("Mosquitto's dynamic-security plugin is not installed (%v); Debian's mosquitto package has it", err)
	}
	dir := t.TempDir()
	password = randomSuffix() + randomSuffix()
	config = filepath.Join(dir, "dynamic-security.json")
	dynsecConfig(t, config, password)
	passwordFile = filepath.Join(dir, "broker-password")
	if err := os.WriteFile(passwordFile, []byte(password), 0o600); err != nil {
		t.Fatal(err)
	}
	return plugin, config, password, passwordFile
}

// TestMosquittoDynamicSecurity: with --mosquitto-dynsec the operator
// provisions every device in Mosquitto's dynamic-security plugin. A
// device with its key connects and works; a wrong password or client id is
// refused; it cannot touch another device's topics; disabling, re-keying
// and deleting take effect without restarting anything.
func TestMosquittoDynamicSecurity(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	plugin, dynsecFile, pw, pwFile := dynsecFiles(t)
	// "user root": Mosquitto started as root would otherwise switch to the
	// user mosquitto, which cannot read (or save) the test's files. Not
	// run as root, it keeps its user and ignores the option.
	addr := startMosquittoConf(t, fmt.Sprintf("allow_anonymous false\nuser root\nplugin %s\nplugin_opt_config_file %s\n", plugin, dynsecFile))

	op := newOperator(t, mosquittoBroker, ns, addr)
	op.secure = true
	op.probeUser, op.probePassword = "kubetwin-operator", pw
	op.extraArgs = []string{"--broker-username=kubetwin-operator", "--broker-password-file=" + pwFile, "--mosquitto-dynsec"}
	op.start()

	createTwin(t, ns, "dyn-a", "Dyn-A", `{"mode":"eco"}`)
	createTwin(t, ns, "dyn-b", "Dyn-B", "")
	keyA := func() string { return primaryKey(t, ns, "dyn-a") }
	keyB := primaryKey(t, ns, "dyn-b")

	// Device A with its key: connects (once provisioned) and works.
	var dev *device.Client
	g.Eventually(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		var err error
		dev, err = device.Connect(ctx, device.Options{BrokerURL: "tcp://" + addr, DeviceID: "Dyn-A", Username: "Dyn-A", Password: keyA()})
		return err
	}, wait, 200*time.Millisecond).Should(Succeed())
	_, err := dev.Report(context.Background(), map[string]any{"fw": "2.0"})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(doc(getTwin(g, ns, "dyn-a").Status.Reported)).To(HaveKeyWithValue("fw", "2.0"))
	_ = dev.Close()

	// Refused: a wrong password, A's password under another client id, an
	// unknown user, anonymous.
	_, code, _ := dialMQTT(t, addr, "Dyn-A", "Dyn-A", sas.NewKey())
	g.Expect(code).To(Equal(byte(5)), "wrong password")
	_, code, _ = dialMQTT(t, addr, "Dyn-B", "Dyn-A", keyA())
	g.Expect(code).To(Equal(byte(5)), "A's credential with client id Dyn-B")
	_, code, _ = dialMQTT(t, addr, "Nobody", "Nobody", keyA())
	g.Expect(code).To(Equal(byte(5)), "unknown user")
	_, code, _ = dialMQTT(t, addr, "Dyn-A", "", "")
	g.Expect(code).To(Equal(byte(5)), "anonymous")

	// A cannot subscribe to or publish on B's topics; B hears nothing and
	// its twin does not change.
	victim := eventuallyConnects(t, addr, "Dyn-B", "Dyn-B", func() string { return keyB })
	g.Expect(victim.Subscribe(protocol.ResponseFilter("Dyn-B"), 1, nil).WaitTimeout(wait)).To(BeTrue())
	g.Eventually(func(g Gomega) {
		g.Expect(getTwin(g, ns, "dyn-b").Status.ObservedGeneration).To(BeNumerically(">", 0))
	}, wait, tick).Should(Succeed())
	before := getTwin(g, ns, "dyn-b")
	attacker := eventuallyConnects(t, addr, "Dyn-A", "Dyn-A", keyA)
	for _, f := range []string{protocol.ResponseFilter("Dyn-B"), protocol.DesiredFilter("Dyn-B"), "kubetwin/v1/#", "#"} {
		tok := attacker.Subscribe(f, 1, nil)
		g.Expect(tok.WaitTimeout(wait)).To(BeTrue())
		g.Expect(tok.(*paho.SubscribeToken).Result()).To(HaveKeyWithValue(f, byte(0x80)), "subscription to %s", f)
	}
	tok := attacker.Subscribe(protocol.DesiredFilter("Dyn-A"), 1, nil)
	g.Expect(tok.WaitTimeout(wait)).To(BeTrue())
	g.Expect(tok.(*paho.SubscribeToken).Result()).To(HaveKeyWithValue(protocol.DesiredFilter("Dyn-A"), byte(1)))
	g.Expect(attacker.Publish(protocol.ReportedTopic("Dyn-B", "x1"), 1, false, `{"owned":true}`).WaitTimeout(wait)).To(BeTrue())
	g.Expect(attacker.Publish(protocol.GetTopic("Dyn-B", "g1"), 1, false, "").WaitTimeout(wait)).To(BeTrue())
	g.Consistently(func(g Gomega) {
		now := getTwin(g, ns, "dyn-b")
		g.Expect(now.Status.ReportedVersion).To(Equal(before.Status.ReportedVersion))
		g.Expect(now.Status.Reported).To(Equal(before.Status.Reported))
	}, 2*time.Second, 200*time.Millisecond).Should(Succeed())
	g.Expect(victim.received()).To(BeEmpty())
	g.Expect(attacker.received()).To(HaveLen(1)) // its own retained desired document
	g.Expect(attacker.received()[0]).To(HavePrefix(protocol.DesiredTopic("Dyn-A") + " "))

	// Disabled: kicked and refused; enabled: back.
	patchTwin(t, ns, "dyn-a", `{"spec":{"status":"disabled"}}`)
	waitLost(t, "disabling", attacker)
	eventuallyRefused(t, "disabled device", addr, "Dyn-A", "Dyn-A", keyA)
	patchTwin(t, ns, "dyn-a", `{"spec":{"status":"enabled"}}`)
	conn := eventuallyConnects(t, addr, "Dyn-A", "Dyn-A", keyA)

	// Re-keyed: kicked; the old key is refused, the new one works.
	old := keyA()
	fresh := sas.NewKey()
	patchSecret(t, ns, v1alpha1.KeySecretName("dyn-a"), map[string]string{v1alpha1.PrimaryKeyKey: fresh})
	g.Eventually(func() string {
		return string(secret(t, ns, v1alpha1.KeySecretName("dyn-a")).Data[v1alpha1.ConnectionStringKey])
	}, wait, tick).Should(HaveSuffix(fresh), "the connection string did not follow the new primary key")
	waitLost(t, "re-keying", conn)
	eventuallyRefused(t, "rotated-out key", addr, "Dyn-A", "Dyn-A", func() string { return old })
	eventuallyConnects(t, addr, "Dyn-A", "Dyn-A", func() string { return fresh })

	// Deleted: its client and role go.
	victimGone := victim
	if err := k8s.Delete(context.Background(), &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "dyn-b"}}); err != nil {
		t.Fatal(err)
	}
	waitLost(t, "deleting the twin", victimGone)
	eventuallyRefused(t, "deleted device", addr, "Dyn-B", "Dyn-B", func() string { return keyB })
	b, _ := os.ReadFile(dynsecFile)
	g.Expect(string(b)).NotTo(ContainSubstring(`"Dyn-B"`), "the plugin's configuration still has the deleted device")
	g.Expect(strings.Count(string(b), `"kubetwin-device-Dyn-A"`)).To(BeNumerically(">=", 1))
}
