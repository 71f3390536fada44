package controllers

import (
	"context"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/deviceid"
)

// The claim reconciler reads claims from the cache without a copy (a
// restart reconciles every claim once) and leaves what the object it read
// points to unchanged (the struct itself is its own, and reused), whether
// its holder lives or the claim is collected.
func TestClaimReconcileReadsWithoutCopy(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	holder := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "holder", UID: "holder-uid"}}
	held := &v1alpha1.DeviceIDClaim{ObjectMeta: metav1.ObjectMeta{Namespace: "claims", Name: deviceid.ClaimName("H"), UID: "c1"}}
	held.Spec.DeviceID = "H"
	held.Spec.Twin = v1alpha1.TwinReference{Namespace: "ns", Name: "holder", UID: "holder-uid"}
	stale := &v1alpha1.DeviceIDClaim{ObjectMeta: metav1.ObjectMeta{Namespace: "claims", Name: deviceid.ClaimName("S"), UID: "c2"}}
	stale.Spec.DeviceID = "S"
	stale.Spec.Twin = v1alpha1.TwinReference{Namespace: "ns", Name: "gone", UID: "gone-uid"}
	stale.Spec.ClaimedAt = metav1.NewTime(now.Add(-time.Hour))
	base := fake.NewClientBuilder().WithScheme(credScheme(t)).WithObjects(holder, held, stale).Build()

	type read struct {
		shallow, want v1alpha1.DeviceIDClaim
		copy          bool
	}
	var reads []read
	c := interceptor.NewClient(base, interceptor.Funcs{
		Get: func(ctx context.Context, c client.WithWatch, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
			if err := c.Get(ctx, key, obj, opts...); err != nil {
				return err
			}
			if cl, ok := obj.(*v1alpha1.DeviceIDClaim); ok {
				o := &client.GetOptions{}
				o.ApplyOptions(opts)
				reads = append(reads, read{shallow: *cl, want: *cl.DeepCopy(), copy: o.UnsafeDisableDeepCopy == nil || !*o.UnsafeDisableDeepCopy})
			}
			return nil
		},
	})
	r := &DeviceIDClaimReconciler{Client: c, Claims: &deviceid.Claims{Client: c, APIReader: base, Namespace: "claims", Now: func() time.Time { return now }}}
	for _, cl := range []*v1alpha1.DeviceIDClaim{held, stale} {
		if _, err := r.Reconcile(context.Background(), ctrl.Request{NamespacedName: client.ObjectKeyFromObject(cl)}); err != nil {
			t.Fatalf("reconciling claim %s: %v", cl.Name, err)
		}
	}
	if len(reads) != 2 {
		t.Fatalf("%d claim reads, want 2", len(reads))
	}
	for _, rd := range reads {
		if rd.copy {
			t.Errorf("claim %s was read with a copy", rd.want.Name)
		}
		if !equality.Semantic.DeepEqual(rd.shallow, rd.want) {
			t.Errorf("the reconcile changed claim %s it read", rd.want.Name)
		}
	}
	if err := base.Get(context.Background(), types.NamespacedName{Namespace: "claims", Name: held.Name}, &v1alpha1.DeviceIDClaim{}); err != nil {
		t.Errorf("the held claim: %v, want it kept", err)
	}
	if err := base.Get(context.Background(), types.NamespacedName{Namespace: "claims", Name: stale.Name}, &v1alpha1.DeviceIDClaim{}); !apierrors.IsNotFound(err) {
		t.Errorf("the stale claim: %v, want it collected", err)
	}
}
