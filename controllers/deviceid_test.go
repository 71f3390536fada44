package controllers_test

import (
	"context"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/bridge"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// claimOf returns the claim of a device id.
func claimOf(g Gomega, id string) *v1alpha1.DeviceIDClaim {
	c := &v1alpha1.DeviceIDClaim{}
	g.ExpectWithOffset(1, k8s.Get(context.Background(), types.NamespacedName{Namespace: claimsNS, Name: deviceid.ClaimName(id)}, c)).To(Succeed())
	return c
}

// Without the webhook (this suite runs none), the reconciler decides who
// holds a device id: the twin that claimed it first is served, a second
// twin from another namespace is Stalled with DuplicateDeviceID naming the
// holder and gets nothing (no key Secret, nothing published). Deleting the
// holder cuts its device, refuses its key and clears its retained desired
// document, then the waiting twin is served at once: it holds the id, has
// its own keys, and its device gets its desired document on connect.
func TestDeviceIDHandover(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	a, b := newNamespace(t), newNamespace(t)
	const id = "Handover-1"
	holder := createTwin(t, a, "holder", id, "", `{"owner":"a"}`)
	keyA := string(keySecret(t, a, "holder").Data[v1alpha1.PrimaryKeyKey])
	g.Eventually(func(g Gomega) {
		g.Expect(claimOf(g, id).Spec.Twin).To(Equal(v1alpha1.TwinReference{Namespace: a, Name: "holder", UID: holder.UID}))
		g.Expect(retained(protocol.DesiredTopic(id))).To(ContainSubstring(`"owner":"a"`))
	}, wait, tick).Should(Succeed())
	dev, _, err := dial(t, id, username(id), token(t, id, keyA, time.Hour))
	g.Expect(err).NotTo(HaveOccurred())

	next := createTwin(t, b, "next", id, "", `{"owner":"b"}`)
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, b, "next")
		c := cond(tw, v1alpha1.ConditionStalled)
		g.Expect(c.Status).To(Equal(metav1.ConditionTrue))
		g.Expect(c.Reason).To(Equal(v1alpha1.ReasonDuplicateDeviceID))
		g.Expect(c.Message).To(ContainSubstring(a + "/holder"))
	}, wait, tick).Should(Succeed())
	// The status above was written after the keys would have been made.
	err = k8s.Get(ctx, client.ObjectKey{Namespace: b, Name: v1alpha1.KeySecretName("next")}, &corev1.Secret{})
	g.Expect(apierrors.IsNotFound(err)).To(BeTrue(), "the twin that does not hold the id got a key Secret: %v", err)
	g.Expect(retained(protocol.DesiredTopic(id))).To(ContainSubstring(`"owner":"a"`))
	g.Expect(dev.IsConnectionOpen()).To(BeTrue())

	g.Expect(k8s.Delete(ctx, getTwin(g, a, "holder"))).To(Succeed())
	select {
	case <-dev.lost:
	case <-time.After(wait):
		t.Fatal("the deleted holder's device stayed connected")
	}
	g.Eventually(func(g Gomega) {
		g.Expect(claimOf(g, id).Spec.Twin).To(Equal(v1alpha1.TwinReference{Namespace: b, Name: "next", UID: next.UID}))
		tw := getTwin(g, b, "next")
		g.Expect(meta.FindStatusCondition(tw.Status.Conditions, v1alpha1.ConditionStalled)).To(BeNil())
		g.Expect(cond(tw, v1alpha1.ConditionCredentialsReady).Status).To(Equal(metav1.ConditionTrue))
	}, wait, tick).Should(Succeed())
	_, code, err := dial(t, id, username(id), token(t, id, keyA, time.Hour))
	g.Expect(err).To(HaveOccurred(), "the deleted holder's key still connects")
	g.Expect(code).To(Equal(byte(5)))

	keyB := string(keySecret(t, b, "next").Data[v1alpha1.PrimaryKeyKey])
	g.Expect(keyB).NotTo(Equal(keyA))
	g.Expect(retained(protocol.DesiredTopic(id))).To(And(ContainSubstring(`"owner":"b"`), Not(ContainSubstring(`"owner":"a"`))))
	c := connectSAS(t, id, keyB, time.Hour)
	desired, _ := c.Desired()
	g.Expect(desired).To(HaveKeyWithValue("owner", "b"))
}

// A claim whose twin does not exist and that is older than
// deviceid.StaleAfter is removed, and a twin that wants its id takes it.
func TestDeviceIDStaleClaims(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	stale := func(id string) *v1alpha1.DeviceIDClaim {
		cl := &v1alpha1.DeviceIDClaim{
			ObjectMeta: metav1.ObjectMeta{Namespace: claimsNS, Name: deviceid.ClaimName(id)},
			Spec: v1alpha1.DeviceIDClaimSpec{
				DeviceID: id, Twin: v1alpha1.TwinReference{Namespace: "elsewhere", Name: "never-stored", UID: "0f0f0f0f-0000-0000-0000-000000000000"},
				Holder: "elsewhere/never-stored", ClaimedAt: metav1.NewTime(time.Now().Add(-2 * deviceid.StaleAfter)),
			},
		}
		g.Expect(k8s.Create(ctx, cl)).To(Succeed())
		return cl
	}

	// Nobody wants it: collected.
	orphan := stale("orphan-1")
	g.Eventually(func() bool {
		return apierrors.IsNotFound(k8s.Get(ctx, client.ObjectKeyFromObject(orphan), &v1alpha1.DeviceIDClaim{}))
	}, wait, tick).Should(BeTrue(), "the stale claim was not collected")

	// A twin wants it: that twin holds it and is served.
	stale("wanted-1")
	ns := newNamespace(t)
	tw := createTwin(t, ns, "wanted", "wanted-1", "", "")
	keySecret(t, ns, "wanted")
	g.Eventually(func(g Gomega) {
		g.Expect(claimOf(g, "wanted-1").Spec.Twin.UID).To(Equal(tw.UID))
		g.Expect(meta.FindStatusCondition(getTwin(g, ns, "wanted").Status.Conditions, v1alpha1.ConditionStalled)).To(BeNil())
	}, wait, tick).Should(Succeed())
}

// staleReads answers reads of one twin with a snapshot, as a cache that
// has not yet seen the latest events would, and everything else from the
// API server.
type staleReads struct {
	client.Client
	twin *v1alpha1.DeviceTwin
}

func (s staleReads) Get(ctx context.Context, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
	if t, ok := obj.(*v1alpha1.DeviceTwin); ok && key == client.ObjectKeyFromObject(s.twin) {
		s.twin.DeepCopyInto(t)
		return nil
	}
	return s.Client.Get(ctx, key, obj, opts...)
}

// nopBus takes every publish.
type nopBus struct{}

func (nopBus) Start(context.Context) error                         { return nil }
func (nopBus) Publish(context.Context, string, []byte, bool) error { return nil }
func (nopBus) Connected() bool                                     { return true }

// A reconcile that still sees a released twin as being deleted with the
// operator's finalizer (the claim its release deleted wakes it at once,
// before the cache has caught up) must not touch the device id again, nor
// create the twin anew.
func TestStaleFinalizeLeavesDeletedTwinAlone(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	createTwin(t, ns, "once", "Once-1", "", `{"a":1}`)
	waitObserved(t, ns, "once")
	stale := getTwin(g, ns, "once")
	g.Expect(stale.Finalizers).To(ContainElement(controllers.Finalizer))
	g.Expect(k8s.Delete(ctx, stale)).To(Succeed())
	g.Eventually(func() bool {
		return apierrors.IsNotFound(k8s.Get(ctx, client.ObjectKeyFromObject(stale), &v1alpha1.DeviceTwin{}))
	}, wait, tick).Should(BeTrue())
	now := metav1.Now()
	stale.DeletionTimestamp = &now

	br := bridge.New(bridge.Options{Resolve: func(context.Context, string) (*v1alpha1.DeviceTwin, error) { return nil, deviceid.ErrNotFound }})
	br.SetBus(nopBus{})
	r := &controllers.DeviceTwinReconciler{
		Client: staleReads{Client: k8s, twin: stale},
		Bridge: br,
		Claims: &deviceid.Claims{Client: k8s, APIReader: k8s, Namespace: claimsNS},
	}
	_, err := r.Reconcile(ctx, ctrl.Request{NamespacedName: client.ObjectKeyFromObject(stale)})
	g.Expect(err).NotTo(HaveOccurred())
	err = k8s.Get(ctx, client.ObjectKeyFromObject(stale), &v1alpha1.DeviceTwin{})
	g.Expect(apierrors.IsNotFound(err)).To(BeTrue(), "the deleted twin was created again: %v", err)
	err = k8s.Get(ctx, types.NamespacedName{Namespace: claimsNS, Name: deviceid.ClaimName("Once-1")}, &v1alpha1.DeviceIDClaim{})
	g.Expect(apierrors.IsNotFound(err)).To(BeTrue(), "the released id was claimed again: %v", err)
}
