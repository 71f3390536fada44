package controllers_test

import (
	"context"
	"net/url"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/bus"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// TestSecretRefToAnotherTwinsKeySecret: a twin editor who points a victim
// twin's secretRef at another twin's managed key Secret (whose key they
// know: it is their own device's) cannot connect as the victim with that
// key; the victim reports SecretRefNotAllowed naming the Secret, and a key
// already copied from it (by an operator from before the check) is
// replaced and its connection ended.
func TestSecretRefToAnotherTwinsKeySecret(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	createTwin(t, ns, "mine", "Ref-Mine", "", "")
	createTwin(t, ns, "victim", "Ref-Victim", "", "")
	createTwin(t, ns, "copied", "Ref-Copied", "", "")
	mine := keySecret(t, ns, "mine")
	known := string(mine.Data[v1alpha1.PrimaryKeyKey])
	victimKeys := keySecret(t, ns, "victim")

	setSpec(t, ns, "victim", `{"spec":{"authentication":{"secretRef":{"name":"`+mine.Name+`"}}}}`)
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, "victim")
		c := cond(tw, v1alpha1.ConditionCredentialsReady)
		g.Expect(c.ObservedGeneration).To(Equal(tw.Generation))
		g.Expect(c.Status).To(Equal(metav1.ConditionFalse))
		g.Expect(c.Reason).To(Equal(v1alpha1.ReasonSecretRefNotAllowed))
		g.Expect(c.Message).To(ContainSubstring("Secret " + mine.Name + " is owned by DeviceTwin mine"))
	}, wait, tick).Should(Succeed())
	mustRefuse(t, "the victim with the key of another twin's Secret", "Ref-Victim", username("Ref-Victim"),
		token(t, "Ref-Victim", known, time.Hour), bus.ReasonBadSignature)
	// The victim keeps its own keys, and they still work.
	g.Expect(keySecret(t, ns, "victim").Data).To(Equal(victimKeys.Data))
	c, _, err := dial(t, "Ref-Victim", username("Ref-Victim"), token(t, "Ref-Victim", string(victimKeys.Data[v1alpha1.PrimaryKeyKey]), time.Hour))
	g.Expect(err).NotTo(HaveOccurred())
	c.Disconnect(0)

	// A key an older operator copied from such a Secret: connected with
	// it, the device is cut off once the reference is refused, and the key
	// is replaced.
	copied := v1alpha1.KeySecretName("copied")
	setKeys(t, ns, copied, map[string]any{v1alpha1.PrimaryKeyKey: known})
	g.Eventually(func() error {
		c, _, err = dial(t, "Ref-Copied", username("Ref-Copied"), token(t, "Ref-Copied", known, time.Hour))
		return err
	}, wait, tick).Should(Succeed())
	setSpec(t, ns, "copied", `{"spec":{"authentication":{"secretRef":{"name":"`+mine.Name+`"}}}}`)
	select {
	case <-c.lost:
	case <-time.After(wait):
		t.Fatal("the device connected with the copied key stayed connected")
	}
	g.Eventually(func() string {
		return string(keySecret(t, ns, "copied").Data[v1alpha1.PrimaryKeyKey])
	}, wait, tick).ShouldNot(Equal(known))
	mustRefuse(t, "the copied key", "Ref-Copied", username("Ref-Copied"), token(t, "Ref-Copied", known, time.Hour), bus.ReasonBadSignature)
	// The other twin's own device is untouched.
	c, _, err = dial(t, "Ref-Mine", username("Ref-Mine"), token(t, "Ref-Mine", known, time.Hour))
	g.Expect(err).NotTo(HaveOccurred())
	c.Disconnect(0)
}

// TestSecretRefUnlabelledNeverUsed: a Secret without the device-keys label
// gives no key, whether it is named from the start or later.
func TestSecretRefUnlabelledNeverUsed(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	ctx := context.Background()
	key := sas.NewKey()
	g.Expect(k8s.Create(ctx, &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "plain"},
		StringData: map[string]string{v1alpha1.PrimaryKeyKey: key}})).To(Succeed())
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "unl"}}
	tw.Spec.DeviceID = "Unl-1"
	tw.Spec.Authentication = &v1alpha1.Authentication{SecretRef: &v1alpha1.SecretReference{Name: "plain"}}
	g.Expect(k8s.Create(ctx, tw)).To(Succeed())
	g.Eventually(func(g Gomega) {
		c := cond(getTwin(g, ns, "unl"), v1alpha1.ConditionCredentialsReady)
		g.Expect(c.Status).To(Equal(metav1.ConditionFalse))
		g.Expect(c.Message).To(ContainSubstring("plain"))
	}, wait, tick).Should(Succeed())
	mustRefuse(t, "the unlabelled Secret's key", "Unl-1", username("Unl-1"), token(t, "Unl-1", key, time.Hour), bus.ReasonNoKeys)
}

// TestEscapedDeviceIDsConnect: twins whose device ids hold "%XX" or "+"
// get connection strings whose keys connect with tokens signed the
// documented way (sr is the URL-encoded "<host>/devices/<id>").
func TestEscapedDeviceIDsConnect(t *testing.T) {
	g := NewWithT(t)
	ns := newNamespace(t)
	for i, id := range []string{"esc%41", "esc%2Fb", "esc+b"} {
		name := "esc-" + string(rune('a'+i))
		createTwin(t, ns, name, id, "", "")
		key := string(keySecret(t, ns, name).Data[v1alpha1.PrimaryKeyKey])
		k, _ := sas.DecodeKey(key)
		tok := sas.Sign(testHub+"/devices/"+id, k, time.Now().Add(time.Hour), "")
		g.Expect(tok).To(ContainSubstring("sr=" + url.QueryEscape(testHub+"/devices/"+id) + "&"))
		c, code, err := dial(t, id, username(id), tok)
		g.Expect(err).NotTo(HaveOccurred(), "%s: CONNACK %d", id, code)
		c.Disconnect(0)
	}
}
