package controllers_test

import (
	"context"
	"encoding/json"
	"sync"
	"testing"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	. "github.com/onsi/gomega"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/pkg/device"
	"github.com/kubetwin/kubetwin/pkg/protocol"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// keySecret waits for the key Secret of a twin and returns it.
func keySecret(t *testing.T, ns, twinName string) *corev1.Secret {
	t.Helper()
	s := &corev1.Secret{}
	NewWithT(t).Eventually(func() error {
		return k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: v1alpha1.KeySecretName(twinName)}, s)
	}, wait, tick).Should(Succeed())
	return s
}

// setKeys merge-patches the data of a Secret.
func setKeys(t *testing.T, ns, name string, data map[string]any) {
	t.Helper()
	b, _ := json.Marshal(map[string]any{"stringData": data})
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	if err := k8s.Patch(context.Background(), s, client.RawPatch("application/merge-patch+json", b)); err != nil {
		t.Fatal(err)
	}
}

// token signs a device token for the suite's hub.
func token(t *testing.T, id, key string, valid time.Duration) string {
	t.Helper()
	tok, err := sas.SignDevice(testHub, id, key, time.Now().Add(valid))
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func username(id string) string { return testHub + "/" + id + "/?api-version=2021-04-12" }

// rawClient is an MQTT 3.1.1 client that records what it receives and
// when it loses its connection.
type rawClient struct {
	mqtt.Client
	mu   sync.Mutex
	got  []string // "topic payload"
	lost chan error
}

func (c *rawClient) received() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.got...)
}

// dial connects a raw client and returns it with the CONNACK return code
// (0 accepted, 5 not authorized) and the connect error.
func dial(t *testing.T, clientID, user, password string) (*rawClient, byte, error) {
	t.Helper()
	c := &rawClient{lost: make(chan error, 1)}
	o := mqtt.NewClientOptions().AddBroker(brokerURL).SetClientID(clientID).SetUsername(user).SetPassword(password).
		SetProtocolVersion(4).SetCleanSession(true).SetAutoReconnect(false).SetConnectRetry(false).
		SetConnectTimeout(5 * time.Second).
		SetDefaultPublishHandler(func(_ mqtt.Client, m mqtt.Message) {
			c.mu.Lock()
			c.got = append(c.got, m.Topic()+" "+string(m.Payload()))
			c.mu.Unlock()
		}).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) { c.lost <- err })
	c.Client = mqtt.NewClient(o)
	tok := c.Connect()
	if !tok.WaitTimeout(wait) {
		t.Fatalf("%s: no CONNACK", clientID)
	}
	code := tok.(*mqtt.ConnectToken).ReturnCode()
	if tok.Error() == nil {
		t.Cleanup(func() { c.Disconnect(0) })
	}
	return c, code, tok.Error()
}

// mustRefuse dials and expects CONNACK 5 (not authorized), and that the
// broker counted the refusal under reason.
func mustRefuse(t *testing.T, what, clientID, user, password, reason string) {
	t.Helper()
	before := testutil.ToFloat64(bus.Refused.WithLabelValues(reason))
	_, code, err := dial(t, clientID, user, password)
	if err == nil || code != 5 {
		t.Errorf("%s: connect = code %d, %v; want CONNACK 5 (not authorized)", what, code, err)
		return
	}
	if after := testutil.ToFloat64(bus.Refused.WithLabelValues(reason)); after != before+1 {
		t.Errorf("%s: kubetwin_broker_refused_total{reason=%q} went from %v to %v, want +1", what, reason, before, after)
	}
}

// connectSAS connects a pkg/device client with a device key.
func connectSAS(t *testing.T, id, key string, validity time.Duration) *device.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	c, err := device.Connect(ctx, device.Options{BrokerURL: brokerURL, DeviceID: id, SharedAccessKey: key,
		HubHostname: testHub, TokenValidity: validity})
	if err != nil {
		t.Fatalf("device %s: %v", id, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// TestKeySecret: every twin gets a Secret with two keys and its
// connection string; edits to the keys are kept and the connection string
// follows the primary key; a missing key is generated again.
func TestKeySecret(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	tw := createTwin(t, ns, "keys", "Keys-1", "", "")
	s := keySecret(t, ns, "keys")

	primary, secondary := string(s.Data[v1alpha1.PrimaryKeyKey]), string(s.Data[v1alpha1.SecondaryKeyKey])
	for _, k := range []string{primary, secondary} {
		if b, err := sas.DecodeKey(k); err != nil || len(b) != 32 {
			t.Fatalf("key %q: %d bytes, %v", k, len(b), err)
		}
	}
	g.Expect(primary).NotTo(Equal(secondary))
	g.Expect(string(s.Data[v1alpha1.ConnectionStringKey])).To(Equal("HostName=" + testHub + ";DeviceId=Keys-1;SharedAccessKey=" + primary))
	g.Expect(s.Labels).To(HaveKeyWithValue(v1alpha1.DeviceKeysLabel, "true"))
	g.Expect(metav1.IsControlledBy(s, tw)).To(BeTrue(), "owner references %+v", s.OwnerReferences)
	g.Eventually(func(g Gomega) {
		c := cond(getTwin(g, ns, "keys"), v1alpha1.ConditionCredentialsReady)
		g.Expect(c.Status).To(Equal(metav1.ConditionTrue))
		g.Expect(c.Reason).To(Equal(v1alpha1.ReasonKeysReady))
	}, wait, tick).Should(Succeed())

	// Rotate the primary key by hand, as kubectl apply would (with its
	// last-applied record): kept, the connection string follows, and the
	// operator's update of the Secret keeps the annotations.
	newKey := sas.NewKey()
	annotations := map[string]string{"kubectl.kubernetes.io/last-applied-configuration": `{"kind":"Secret"}`, "team": "edge"}
	b, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": annotations},
		"stringData": map[string]any{v1alpha1.PrimaryKeyKey: newKey}})
	if err := k8s.Patch(context.Background(), &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: s.Name}},
		client.RawPatch("application/merge-patch+json", b)); err != nil {
		t.Fatal(err)
	}
	g.Eventually(func(g Gomega) {
		s := keySecret(t, ns, "keys")
		g.Expect(string(s.Data[v1alpha1.PrimaryKeyKey])).To(Equal(newKey))
		g.Expect(string(s.Data[v1alpha1.SecondaryKeyKey])).To(Equal(secondary))
		g.Expect(string(s.Data[v1alpha1.ConnectionStringKey])).To(HaveSuffix(";SharedAccessKey=" + newKey))
	}, wait, tick).Should(Succeed())
	g.Expect(keySecret(t, ns, "keys").Annotations).To(Equal(annotations), "annotations after the operator's update")

	// A deleted key is generated again; the other stays.
	b, _ = json.Marshal(map[string]any{"data": map[string]any{v1alpha1.SecondaryKeyKey: nil}})
	if err := k8s.Patch(context.Background(), &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: s.Name}},
		client.RawPatch("application/merge-patch+json", b)); err != nil {
		t.Fatal(err)
	}
	g.Eventually(func(g Gomega) {
		s := keySecret(t, ns, "keys")
		g.Expect(string(s.Data[v1alpha1.PrimaryKeyKey])).To(Equal(newKey))
		_, err := sas.DecodeKey(string(s.Data[v1alpha1.SecondaryKeyKey]))
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(string(s.Data[v1alpha1.SecondaryKeyKey])).NotTo(Equal(secondary))
	}, wait, tick).Should(Succeed())

	// A key that is not a key is reported, and left as it is.
	setKeys(t, ns, s.Name, map[string]any{v1alpha1.SecondaryKeyKey: "not-a-key"})
	g.Eventually(func(g Gomega) {
		c := cond(getTwin(g, ns, "keys"), v1alpha1.ConditionCredentialsReady)
		g.Expect(c.Reason).To(Equal(v1alpha1.ReasonInvalidKeys))
		g.Expect(c.Message).To(ContainSubstring("secondaryKey"))
	}, wait, tick).Should(Succeed())
	g.Expect(string(keySecret(t, ns, "keys").Data[v1alpha1.SecondaryKeyKey])).To(Equal("not-a-key"))
}

// TestSASAuthentication: the right key connects and works (primary and
// secondary); a wrong key, an expired token, a token for another device,
// an unknown device and a bad username are refused with CONNACK 5.
func TestSASAuthentication(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	createTwin(t, ns, "auth-a", "Auth-A", "", `{"mode":"on"}`)
	createTwin(t, ns, "auth-b", "Auth-B", "", "")
	a, b := keySecret(t, ns, "auth-a"), keySecret(t, ns, "auth-b")
	keyA, keyA2, keyB := string(a.Data[v1alpha1.PrimaryKeyKey]), string(a.Data[v1alpha1.SecondaryKeyKey]), string(b.Data[v1alpha1.PrimaryKeyKey])

	// The right key: the device gets its twin and its report is stored.
	dev := connectSAS(t, "Auth-A", keyA, time.Hour)
	desired, _ := dev.Desired()
	g.Expect(desired).To(HaveKeyWithValue("mode", "on"))
	v, err := dev.Report(context.Background(), map[string]any{"fw": "1.0"})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(doc(getTwin(g, ns, "auth-a").Status.Reported)).To(HaveKeyWithValue("fw", "1.0"))
	g.Expect(v).To(BeNumerically(">=", 1))
	_ = dev.Close()

	// The secondary key, and the plain device id as username.
	c, code, err := dial(t, "Auth-A", "Auth-A", token(t, "Auth-A", keyA2, time.Hour))
	g.Expect(err).NotTo(HaveOccurred(), "code %d", code)
	c.Disconnect(0)

	wrong := sas.NewKey()
	mustRefuse(t, "wrong key", "Auth-A", username("Auth-A"), token(t, "Auth-A", wrong, time.Hour), bus.ReasonBadSignature)
	mustRefuse(t, "expired token", "Auth-A", username("Auth-A"), token(t, "Auth-A", keyA, -time.Second), bus.ReasonExpired)
	mustRefuse(t, "B's token as client A", "Auth-A", username("Auth-A"), token(t, "Auth-B", keyB, time.Hour), bus.ReasonWrongDevice)
	mustRefuse(t, "A's token as client B", "Auth-B", username("Auth-B"), token(t, "Auth-A", keyA, time.Hour), bus.ReasonWrongDevice)
	mustRefuse(t, "A's key for B's token", "Auth-B", username("Auth-B"), token(t, "Auth-B", keyA, time.Hour), bus.ReasonBadSignature)
	mustRefuse(t, "username of another device", "Auth-A", username("Auth-B"), token(t, "Auth-A", keyA, time.Hour), bus.ReasonBadUsername)
	mustRefuse(t, "unknown device", "Nobody", username("Nobody"), token(t, "Nobody", keyA, time.Hour), bus.ReasonUnknownDevice)
	mustRefuse(t, "a password, not a token", "Auth-A", username("Auth-A"), keyA, bus.ReasonBadToken)
	other, _ := sas.SignDevice("other-hub.example", "Auth-A", keyA, time.Now().Add(time.Hour))
	mustRefuse(t, "token for another hub", "Auth-A", username("Auth-A"), other, bus.ReasonWrongHub)

	// pkg/device reports the refusal.
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	_, err = device.Connect(ctx, device.Options{BrokerURL: brokerURL, DeviceID: "Auth-A", SharedAccessKey: wrong, HubHostname: testHub})
	g.Expect(err).To(MatchError(ContainSubstring("not Authorized")))
}

// TestDeviceConfinedToOwnTopics: a device that tries another device's
// topics gets nothing and changes nothing.
func TestDeviceConfinedToOwnTopics(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	createTwin(t, ns, "conf-a", "Conf-A", "", "")
	createTwin(t, ns, "conf-b", "Conf-B", "", `{"secret":"b-only"}`)
	keyA := string(keySecret(t, ns, "conf-a").Data[v1alpha1.PrimaryKeyKey])
	keyB := string(keySecret(t, ns, "conf-b").Data[v1alpha1.PrimaryKeyKey])

	// B is online and listens on its own topics.
	victim, _, err := dial(t, "Conf-B", username("Conf-B"), token(t, "Conf-B", keyB, time.Hour))
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(victim.SubscribeMultiple(map[string]byte{protocol.ResponseFilter("Conf-B"): 1}, nil).WaitTimeout(wait)).To(BeTrue())
	g.Eventually(func(g Gomega) {
		g.Expect(cond(getTwin(g, ns, "conf-b"), v1alpha1.ConditionConnected).Status).To(Equal(metav1.ConditionTrue))
	}, wait, tick).Should(Succeed())
	before := getTwin(g, ns, "conf-b")

	attacker, _, err := dial(t, "Conf-A", username("Conf-A"), token(t, "Conf-A", keyA, time.Hour))
	g.Expect(err).NotTo(HaveOccurred())

	// Subscriptions to B's topics, or to everyone's, are refused (0x80).
	denied := testutil.ToFloat64(bus.Refused.WithLabelValues(bus.ReasonSubscribeDenied))
	filters := []string{protocol.ResponseFilter("Conf-B"), protocol.DesiredFilter("Conf-B"), protocol.DesiredTopic("Conf-B"),
		"kubetwin/v1/+/desired", "kubetwin/v1/#", "#", protocol.DevicePrefix("Conf-A") + "/#"}
	for _, f := range filters {
		tok := attacker.Subscribe(f, 1, nil)
		g.Expect(tok.WaitTimeout(wait)).To(BeTrue())
		g.Expect(tok.(*mqtt.SubscribeToken).Result()).To(HaveKeyWithValue(f, byte(0x80)), "subscription to %s", f)
	}
	g.Expect(testutil.ToFloat64(bus.Refused.WithLabelValues(bus.ReasonSubscribeDenied))).To(Equal(denied + float64(len(filters))))
	// Its own topics are fine.
	tok := attacker.SubscribeMultiple(map[string]byte{protocol.ResponseFilter("Conf-A"): 1, protocol.DesiredFilter("Conf-A"): 1}, nil)
	g.Expect(tok.WaitTimeout(wait)).To(BeTrue())
	for f, code := range tok.(*mqtt.SubscribeToken).Result() {
		g.Expect(code).To(Equal(byte(1)), "own filter %s", f)
	}

	// Publishing as B: QoS 0 is dropped; QoS 1 is dropped and, in MQTT
	// 3.1.1, the attacker is disconnected (mochi has no other answer).
	pubDenied := testutil.ToFloat64(bus.Refused.WithLabelValues(bus.ReasonPublishDenied))
	attacker.Publish(protocol.ReportedTopic("Conf-B", "x0"), 0, false, `{"owned":true}`).WaitTimeout(wait)
	attacker.Publish(protocol.PresenceTopic("Conf-B"), 0, true, `{"online":false}`).WaitTimeout(wait)
	attacker.Publish(protocol.GetTopic("Conf-B", "g0"), 0, false, "").WaitTimeout(wait)
	attacker.Publish(protocol.ReportedTopic("Conf-B", "x1"), 1, false, `{"owned":true}`)
	select {
	case <-attacker.lost:
	case <-time.After(wait):
		t.Fatal("the attacker was not disconnected after a QoS 1 publish on another device's topic")
	}
	g.Eventually(func() float64 {
		return testutil.ToFloat64(bus.Refused.WithLabelValues(bus.ReasonPublishDenied))
	}, wait, tick).Should(Equal(pubDenied + 4))

	// Nothing changed for B, and B heard nothing but what is its own.
	g.Consistently(func(g Gomega) {
		now := getTwin(g, ns, "conf-b")
		g.Expect(now.Status.ReportedVersion).To(Equal(before.Status.ReportedVersion))
		g.Expect(now.Status.Reported).To(Equal(before.Status.Reported))
		g.Expect(now.ResourceVersion).To(Equal(before.ResourceVersion))
	}, 2*time.Second, 200*time.Millisecond).Should(Succeed())
	g.Expect(victim.received()).To(BeEmpty())
	g.Expect(attacker.received()).NotTo(ContainElement(ContainSubstring("b-only")))
}

// TestDisableAndEnable: disabling a device disconnects it and refuses it;
// enabling it lets it in again; no restart.
func TestDisableAndEnable(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	createTwin(t, ns, "dis", "Dis-1", "", "")
	key := string(keySecret(t, ns, "dis").Data[v1alpha1.PrimaryKeyKey])
	c, _, err := dial(t, "Dis-1", username("Dis-1"), token(t, "Dis-1", key, time.Hour))
	g.Expect(err).NotTo(HaveOccurred())
	g.Eventually(func(g Gomega) {
		g.Expect(cond(getTwin(g, ns, "dis"), v1alpha1.ConditionConnected).Status).To(Equal(metav1.ConditionTrue))
	}, wait, tick).Should(Succeed())

	setSpec(t, ns, "dis", `{"spec":{"status":"disabled"}}`)
	select {
	case <-c.lost:
	case <-time.After(wait):
		t.Fatal("the device was not disconnected when it was disabled")
	}
	mustRefuse(t, "disabled device", "Dis-1", username("Dis-1"), token(t, "Dis-1", key, time.Hour), bus.ReasonDisabled)
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, "dis")
		c := cond(tw, v1alpha1.ConditionConnected)
		g.Expect(c.Status).To(Equal(metav1.ConditionFalse))
		g.Expect(c.Reason).To(Equal(v1alpha1.ReasonDisabled))
		g.Expect(tw.Status.ConnectionState).To(Equal(v1alpha1.ConnectionStateDisconnected))
	}, wait, tick).Should(Succeed())

	setSpec(t, ns, "dis", `{"spec":{"status":"enabled"}}`)
	g.Eventually(func() error {
		c, _, err := dial(t, "Dis-1", username("Dis-1"), token(t, "Dis-1", key, time.Hour))
		if err == nil {
			c.Disconnect(0)
		}
		return err
	}, wait, tick).Should(Succeed())
}

// TestKeyRotation: a device keeps working while its key moves to the
// secondary slot, is disconnected and refused once that key is gone, and
// connects with the new key; no restart.
func TestKeyRotation(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	createTwin(t, ns, "rot", "Rot-1", "", "")
	s := keySecret(t, ns, "rot")
	old := string(s.Data[v1alpha1.PrimaryKeyKey])
	c, _, err := dial(t, "Rot-1", username("Rot-1"), token(t, "Rot-1", old, time.Hour))
	g.Expect(err).NotTo(HaveOccurred())

	// Step 1: new primary, old key kept as secondary: still connected.
	fresh := sas.NewKey()
	setKeys(t, ns, s.Name, map[string]any{v1alpha1.PrimaryKeyKey: fresh, v1alpha1.SecondaryKeyKey: old})
	g.Eventually(func() string {
		return string(keySecret(t, ns, "rot").Data[v1alpha1.ConnectionStringKey])
	}, wait, tick).Should(HaveSuffix(fresh))
	select {
	case err := <-c.lost:
		t.Fatalf("the device lost its connection while its key was still the secondary: %v", err)
	case <-time.After(time.Second):
	}

	// Step 2: the old key goes: the device is dropped and refused.
	setKeys(t, ns, s.Name, map[string]any{v1alpha1.SecondaryKeyKey: sas.NewKey()})
	select {
	case <-c.lost:
	case <-time.After(wait):
		t.Fatal("the device was not disconnected when its key was rotated out")
	}
	mustRefuse(t, "rotated-out key", "Rot-1", username("Rot-1"), token(t, "Rot-1", old, time.Hour), bus.ReasonBadSignature)
	dev := connectSAS(t, "Rot-1", fresh, time.Hour)
	_, err = dev.Report(context.Background(), map[string]any{"rotated": true})
	g.Expect(err).NotTo(HaveOccurred())
}

// TestTokenExpiry: the broker disconnects a device when its token
// expires; pkg/device reconnects with a fresh token and keeps working.
func TestTokenExpiry(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	createTwin(t, ns, "exp", "Exp-1", "", "")
	key := string(keySecret(t, ns, "exp").Data[v1alpha1.PrimaryKeyKey])
	c, _, err := dial(t, "Exp-1", username("Exp-1"), token(t, "Exp-1", key, 2*time.Second))
	g.Expect(err).NotTo(HaveOccurred())
	select {
	case <-c.lost:
	case <-time.After(wait):
		t.Fatal("the device was not disconnected when its token expired")
	}

	before := testutil.ToFloat64(bus.Refused.WithLabelValues(bus.ReasonExpired))
	dev := connectSAS(t, "Exp-1", key, 3*time.Second)
	g.Eventually(func() float64 {
		return testutil.ToFloat64(bus.Refused.WithLabelValues(bus.ReasonExpired))
	}, wait, tick).Should(BeNumerically(">", before), "the broker did not end the session of the expired token")
	g.Eventually(func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		_, err := dev.Report(ctx, map[string]any{"after": "renewal"})
		return err
	}, 3*wait, tick).Should(Succeed())
}

// TestSecretRef: keys from the user's Secret are copied into the twin's
// key Secret and used; rotating them there takes effect; a Secret the
// operator cannot see is reported.
func TestSecretRef(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	ctx := context.Background()
	mine := sas.NewKey()
	user := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "my-keys", Labels: map[string]string{v1alpha1.DeviceKeysLabel: "true"}},
		StringData: map[string]string{v1alpha1.PrimaryKeyKey: mine},
	}
	g.Expect(k8s.Create(ctx, user)).To(Succeed())
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "byo"}}
	tw.Spec.DeviceID = "Byo-1"
	tw.Spec.Authentication = &v1alpha1.Authentication{SecretRef: &v1alpha1.SecretReference{Name: "my-keys"}}
	g.Expect(k8s.Create(ctx, tw)).To(Succeed())

	g.Eventually(func() string {
		return string(keySecret(t, ns, "byo").Data[v1alpha1.ConnectionStringKey])
	}, wait, tick).Should(Equal("HostName=" + testHub + ";DeviceId=Byo-1;SharedAccessKey=" + mine))
	c, _, err := dial(t, "Byo-1", username("Byo-1"), token(t, "Byo-1", mine, time.Hour))
	g.Expect(err).NotTo(HaveOccurred())

	next := sas.NewKey()
	setKeys(t, ns, "my-keys", map[string]any{v1alpha1.PrimaryKeyKey: next})
	select {
	case <-c.lost:
	case <-time.After(wait):
		t.Fatal("the device was not disconnected when its key was replaced in its Secret")
	}
	mustRefuse(t, "replaced key", "Byo-1", username("Byo-1"), token(t, "Byo-1", mine, time.Hour), bus.ReasonBadSignature)
	c, _, err = dial(t, "Byo-1", username("Byo-1"), token(t, "Byo-1", next, time.Hour))
	g.Expect(err).NotTo(HaveOccurred())
	c.Disconnect(0)

	// A Secret without the label is invisible to the operator: reported.
	g.Expect(k8s.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "unlabelled"},
		StringData: map[string]string{v1alpha1.PrimaryKeyKey: sas.NewKey()}})).To(Succeed())
	setSpec(t, ns, "byo", `{"spec":{"authentication":{"secretRef":{"name":"unlabelled"}}}}`)
	g.Eventually(func(g Gomega) {
		c := cond(getTwin(g, ns, "byo"), v1alpha1.ConditionCredentialsReady)
		g.Expect(c.Reason).To(Equal(v1alpha1.ReasonSecretNotFound))
		g.Expect(c.Message).To(ContainSubstring(v1alpha1.DeviceKeysLabel))
	}, wait, tick).Should(Succeed())
	// The keys last copied stay in effect.
	c, _, err = dial(t, "Byo-1", username("Byo-1"), token(t, "Byo-1", next, time.Hour))
	g.Expect(err).NotTo(HaveOccurred())
	c.Disconnect(0)
}

// TestKeySecretConflict: a Secret of the key Secret's name that the twin
// does not own is left alone and reported.
func TestKeySecretConflict(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	ctx := context.Background()
	theirs := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: v1alpha1.KeySecretName("clash")},
		StringData: map[string]string{"x": "y"}}
	g.Expect(k8s.Create(ctx, theirs)).To(Succeed())
	createTwin(t, ns, "clash", "Clash-1", "", "")
	g.Eventually(func(g Gomega) {
		c := cond(getTwin(g, ns, "clash"), v1alpha1.ConditionCredentialsReady)
		g.Expect(c.Reason).To(Equal(v1alpha1.ReasonSecretConflict))
	}, wait, tick).Should(Succeed())
	s := &corev1.Secret{}
	g.Expect(k8s.Get(ctx, client.ObjectKeyFromObject(theirs), s)).To(Succeed())
	g.Expect(s.Data).To(Equal(map[string][]byte{"x": []byte("y")}))
	_, code, err := dial(t, "Clash-1", "Clash-1", token(t, "Clash-1", sas.NewKey(), time.Hour))
	g.Expect(err).To(HaveOccurred())
	g.Expect(code).To(Equal(byte(5)))
}
