package webhook_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/internal/webhook"
)

// getClaim returns the claim of a device id.
func getClaim(id string) (*v1alpha1.DeviceIDClaim, error) {
	c := &v1alpha1.DeviceIDClaim{}
	err := k8s.Get(context.Background(), types.NamespacedName{Namespace: claimsNS, Name: deviceid.ClaimName(id)}, c)
	return c, err
}

// heldMessage is the refusal of a twin whose id ns/name holds.
func heldMessage(id, ns, name string) string {
	return fmt.Sprintf("spec.deviceId: device id %q is already held by DeviceTwin %s/%s", id, ns, name)
}

// A second twin with a device id another twin holds is refused, from any
// namespace, with a message naming the holder; the holder's claim names it
// down to its uid. A dry run checks without claiming.
func TestDeviceIDHeldRefused(t *testing.T) {
	apiServer(t)
	g := NewWithT(t)
	ctx := context.Background()
	a, b := newNamespace(t), newNamespace(t)
	holder := newTwin(a, "holder", "held-device", "", "")
	g.Expect(k8s.Create(ctx, holder)).To(Succeed())
	cl, err := getClaim("held-device")
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(cl.Spec.Twin).To(Equal(v1alpha1.TwinReference{Namespace: a, Name: "holder", UID: holder.UID}))
	g.Expect(cl.Spec.Holder).To(Equal(a + "/holder"))

	for _, ns := range []string{b, a} {
		err := k8s.Create(ctx, newTwin(ns, "thief", "held-device", "", ""))
		expectRefused(g, err, []string{heldMessage("held-device", a, "holder")},
			[]cause{{"spec.deviceId", fmt.Sprintf("device id %q is already held by DeviceTwin %s/holder", "held-device", a)}})
		_, err = getTwin(t, ns, "thief")
		g.Expect(apierrors.IsNotFound(err)).To(BeTrue(), "a refused twin was stored")
	}
	// The device id defaults to the name: the same rule.
	err = k8s.Create(ctx, newTwin(b, "held-device", "", "", ""))
	expectRefused(g, err, []string{heldMessage("held-device", a, "holder")}, nil)

	// Dry run: refused the same way; a free id is allowed but not claimed.
	err = k8s.Create(ctx, newTwin(b, "thief", "held-device", "", ""), client.DryRunAll)
	expectRefused(g, err, []string{heldMessage("held-device", a, "holder")}, nil)
	g.Expect(k8s.Create(ctx, newTwin(b, "dry", "dry-run-id", "", ""), client.DryRunAll)).To(Succeed())
	_, err = getClaim("dry-run-id")
	g.Expect(apierrors.IsNotFound(err)).To(BeTrue(), "a dry run claimed the id: %v", err)

	// Updates of the holder are not refused by its own claim.
	holder.Spec.Tags = &apiextensionsv1.JSON{Raw: []byte(`{"site":"x"}`)}
	g.Expect(k8s.Update(ctx, holder)).To(Succeed())
}

// While the holder is being deleted, the refusal says so and when to
// retry.
func TestDeviceIDHolderBeingDeleted(t *testing.T) {
	apiServer(t)
	g := NewWithT(t)
	ctx := context.Background()
	a, b := newNamespace(t), newNamespace(t)
	holder := newTwin(a, "leaving", "leaving-id", "", "")
	holder.Finalizers = []string{"test.kubetwin.io/hold"}
	g.Expect(k8s.Create(ctx, holder)).To(Succeed())
	g.Expect(k8s.Delete(ctx, holder)).To(Succeed())
	t.Cleanup(func() {
		_ = k8s.Patch(ctx, holder, client.RawPatch(types.MergePatchType, []byte(`{"metadata":{"finalizers":null}}`)))
	})
	err := k8s.Create(ctx, newTwin(b, "next", "leaving-id", "", ""))
	expectRefused(g, err, []string{heldMessage("leaving-id", a, "leaving") + ", which is being deleted: retry once it is gone"}, nil)
}

// A twin deleted and created again under the same namespace/name gets its
// id back at once, even though its claim was not released (no operator
// runs in this suite); a twin elsewhere must wait until the claim is stale.
func TestDeviceIDSameNameRecreated(t *testing.T) {
	apiServer(t)
	g := NewWithT(t)
	ctx := context.Background()
	a, b := newNamespace(t), newNamespace(t)
	first := newTwin(a, "again", "again-id", "", "")
	g.Expect(k8s.Create(ctx, first)).To(Succeed())
	g.Expect(k8s.Delete(ctx, first)).To(Succeed())
	g.Eventually(func() bool { _, err := getTwin(t, a, "again"); return apierrors.IsNotFound(err) }, wait, tick).Should(BeTrue())

	err := k8s.Create(ctx, newTwin(b, "other", "again-id", "", ""))
	expectRefused(g, err, []string{heldMessage("again-id", a, "again")}, nil)

	second := newTwin(a, "again", "again-id", "", "")
	g.Expect(k8s.Create(ctx, second)).To(Succeed())
	cl, err := getClaim("again-id")
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(cl.Spec.Twin.UID).To(Equal(second.UID))
}

// A claim whose twin never got stored is taken over once it is older than
// deviceid.StaleAfter, and not before.
func TestDeviceIDStaleClaimTakenOver(t *testing.T) {
	apiServer(t)
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	for _, tc := range []struct {
		id    string
		age   time.Duration
		taken bool
	}{
		{"stale-id", deviceid.StaleAfter + time.Minute, true},
		{"fresh-id", 0, false},
	} {
		cl := &v1alpha1.DeviceIDClaim{
			ObjectMeta: metav1.ObjectMeta{Namespace: claimsNS, Name: deviceid.ClaimName(tc.id)},
			Spec: v1alpha1.DeviceIDClaimSpec{
				DeviceID: tc.id, Twin: v1alpha1.TwinReference{Namespace: "elsewhere", Name: "never-stored", UID: "0f0f0f0f-0000-0000-0000-000000000000"},
				Holder: "elsewhere/never-stored", ClaimedAt: metav1.NewTime(time.Now().Add(-tc.age)),
			},
		}
		g.Expect(k8s.Create(ctx, cl)).To(Succeed())
		tw := newTwin(ns, tc.id, tc.id, "", "")
		err := k8s.Create(ctx, tw)
		if !tc.taken {
			expectRefused(g, err, []string{heldMessage(tc.id, "elsewhere", "never-stored")}, nil)
			continue
		}
		g.Expect(err).NotTo(HaveOccurred())
		got, err := getClaim(tc.id)
		g.Expect(err).NotTo(HaveOccurred())
		g.Expect(got.Spec.Twin).To(Equal(v1alpha1.TwinReference{Namespace: ns, Name: tc.id, UID: tw.UID}))
		g.Expect(got.Spec.ClaimedAt.Time).To(BeTemporally(">", time.Now().Add(-deviceid.StaleAfter)), "claimedAt not renewed")
	}
}

// Concurrent creates of one device id in different namespaces: exactly one
// succeeds, and every other is refused naming the one that did.
func TestDeviceIDConcurrentCreates(t *testing.T) {
	apiServer(t)
	g := NewWithT(t)
	ctx := context.Background()
	const n = 8
	nss := make([]string, n)
	for i := range nss {
		nss[i] = newNamespace(t)
	}
	errs := make([]error, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			errs[i] = k8s.Create(ctx, newTwin(nss[i], "racer", "raced-id", "", ""))
		}()
	}
	close(start)
	wg.Wait()
	winner := -1
	for i, err := range errs {
		if err == nil {
			g.Expect(winner).To(Equal(-1), "two creates succeeded: %s and %s", nss[max(winner, 0)], nss[i])
			winner = i
		}
	}
	g.Expect(winner).NotTo(Equal(-1), "every create failed: %v", errs)
	for i, err := range errs {
		if i != winner {
			expectRefused(g, err, []string{heldMessage("raced-id", nss[winner], "racer")}, nil)
		}
	}
	var list v1alpha1.DeviceTwinList
	g.Expect(k8s.List(ctx, &list)).To(Succeed())
	stored := 0
	for _, tw := range list.Items {
		if tw.EffectiveDeviceID() == "raced-id" {
			stored++
		}
	}
	g.Expect(stored).To(Equal(1))
}

// A twin outside the namespace the hub serves (--namespace) claims
// nothing: it is not this hub's device.
func TestDeviceIDOtherNamespaceClaimsNothing(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	c := fake.NewClientBuilder().WithScheme(testScheme).Build()
	v := webhook.Validator{Claims: &deviceid.Claims{Client: c, APIReader: c, Namespace: claimsNS}, Namespace: "served"}
	for _, tc := range []struct {
		ns      string
		claimed bool
	}{{"elsewhere", false}, {"served", true}} {
		tw := newTwin(tc.ns, "t", "ns-id-"+tc.ns, "", "")
		tw.UID = types.UID("uid-" + tc.ns)
		_, err := v.ValidateCreate(ctx, tw)
		g.Expect(err).NotTo(HaveOccurred())
		err = c.Get(ctx, types.NamespacedName{Namespace: claimsNS, Name: deviceid.ClaimName("ns-id-" + tc.ns)}, &v1alpha1.DeviceIDClaim{})
		g.Expect(err == nil).To(Equal(tc.claimed), "twin in %s: %v", tc.ns, err)
	}
}
