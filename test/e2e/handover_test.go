package e2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/pkg/device"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// TestDeviceIDHandover: with an external Mosquitto (dynamic security), two
// twins want one device id. The one that holds it is served; the other is
// Stalled (DuplicateDeviceID) and gets no credential. When the holder is
// deleted, its device's connection is cut and its key refused, its
// retained desired document is gone, and the other twin is served at once:
// its own key works and its device's first GET answers its desired
// document, never the deleted twin's nor an empty one.
func TestDeviceIDHandover(t *testing.T) {
	const plugin = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
	if _, err := os.Stat(plugin); err != nil {
		t.Fatalf("Mosquitto's dynamic-security plugin is not installed (%v); Debian's mosquitto package has it", err)
	}
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	dir := t.TempDir()
	pw := randomSuffix() + randomSuffix()
	dynsecFile := filepath.Join(dir, "dynamic-security.json")
	dynsecConfig(t, dynsecFile, pw)
	pwFile := filepath.Join(dir, "broker-password")
	if err := os.WriteFile(pwFile, []byte(pw), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := startMosquittoConf(t, fmt.Sprintf("allow_anonymous false\nuser root\nplugin %s\nplugin_opt_config_file %s\n", plugin, dynsecFile))
	op := newOperator(t, mosquittoBroker, ns, addr)
	op.secure = true
	op.probeUser, op.probePassword = "kubetwin-operator", pw
	// Claims in a namespace of their own, apart from the watched one: the
	// operator's cache must hold them all the same.
	claimsNS := newNamespace(t)
	op.extraArgs = []string{"--broker-username=kubetwin-operator", "--broker-password-file=" + pwFile, "--mosquitto-dynsec",
		"--claims-namespace=" + claimsNS}
	op.start()

	id := "Hand-" + randomSuffix()
	createTwin(t, ns, "old", id, `{"owner":"old","setting":4}`)
	keyOld := primaryKey(t, ns, "old")
	connect := func(key string) (*device.Client, error) {
		ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		return device.Connect(ctx, device.Options{BrokerURL: "tcp://" + addr, DeviceID: id, Username: id, Password: key})
	}
	var dev *device.Client
	g.Eventually(func() (err error) { dev, err = connect(keyOld); return err }, wait, 200*time.Millisecond).Should(Succeed())
	desired, _ := dev.Desired()
	g.Expect(desired).To(HaveKeyWithValue("owner", "old"))
	_ = dev.Close()
	conn := eventuallyConnects(t, addr, id, id, func() string { return keyOld })

	// The second twin: Stalled, no key Secret, nothing published for it.
	createTwin(t, ns, "new", id, `{"owner":"new"}`)
	g.Eventually(func(g Gomega) {
		c := cond(getTwin(g, ns, "new"), v1alpha1.ConditionStalled)
		g.Expect(c.Reason).To(Equal(v1alpha1.ReasonDuplicateDeviceID))
		g.Expect(c.Message).To(ContainSubstring(ns + "/old"))
	}, wait, tick).Should(Succeed())
	// That status was written after the keys would have been made.
	err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: v1alpha1.KeySecretName("new")}, &corev1.Secret{})
	g.Expect(apierrors.IsNotFound(err)).To(BeTrue(), "the twin that does not hold the id got a key Secret: %v", err)

	// The holder goes: its device is cut and its key refused.
	g.Expect(k8s.Delete(ctx, &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "old"}})).To(Succeed())
	waitLost(t, "deleting the holder", conn)
	g.Eventually(func() bool {
		return apierrors.IsNotFound(k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: "old"}, &v1alpha1.DeviceTwin{}))
	}, wait, tick).Should(BeTrue(), "the deleted twin's finalizer did not finish")

	// The other twin is served at once, with its own key.
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, "new")
		g.Expect(meta.FindStatusCondition(tw.Status.Conditions, v1alpha1.ConditionStalled)).To(BeNil())
		g.Expect(cond(tw, v1alpha1.ConditionCredentialsReady).Status).To(Equal(metav1.ConditionTrue))
	}, wait, tick).Should(Succeed(), "the twin that wanted the id was not served")
	keyNew := primaryKey(t, ns, "new")
	g.Expect(keyNew).NotTo(Equal(keyOld))
	_, code, err := dialMQTT(t, addr, id, id, keyOld)
	g.Expect(err).To(HaveOccurred(), "the deleted twin's key still connects")
	g.Expect(code).To(Equal(byte(5)))

	// The retained desired document is the new twin's.
	sub := startSub(t, "late subscriber", addr, "-u", "kubetwin-operator", "-P", pw, "-i", "late-"+randomSuffix(), "-q", "1",
		"-t", protocol.DesiredTopic(id))
	m := sub.waitFor("the retained desired document", protocol.DesiredTopic(id), func(m cliMessage) bool { return m.Retained })
	g.Expect(m.JSON()).To(HaveKeyWithValue("owner", "new"), "%s", m)
	g.Expect(m.JSON()).NotTo(HaveKey("setting"), "%s", m)

	// The device's first GET answers the new twin's document.
	dev, err = connect(keyNew)
	g.Expect(err).NotTo(HaveOccurred())
	t.Cleanup(func() { _ = dev.Close() })
	desired, version := dev.Desired()
	g.Expect(desired).To(HaveKeyWithValue("owner", "new"))
	g.Expect(desired).NotTo(HaveKey("setting"))
	g.Expect(version).To(BeNumerically(">", 0))

	cl := &v1alpha1.DeviceIDClaim{}
	g.Expect(k8s.Get(ctx, client.ObjectKey{Namespace: claimsNS, Name: deviceid.ClaimName(id)}, cl)).To(Succeed())
	g.Expect(cl.Spec.Holder).To(Equal(ns + "/new"))
}
