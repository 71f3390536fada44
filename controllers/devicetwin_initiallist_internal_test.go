package controllers

import (
	"context"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/workqueue"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/deviceid"
)

// The claims the cache lists at start-up wake no twin: each twin is queued
// by its own listing, and the wake cost a listing of the twins wanting the
// id and a read of the holder per claim, for the whole fleet. A claim
// created later still wakes the others.
func TestClaimsOfInitialListWakeNobody(t *testing.T) {
	var twins []client.Object
	for _, name := range []string{"holder", "other"} {
		tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, UID: types.UID(name + "-uid")}}
		tw.Spec.DeviceID = "X"
		twins = append(twins, tw)
	}
	c := fake.NewClientBuilder().WithScheme(credScheme(t)).WithObjects(twins...).
		WithIndex(&v1alpha1.DeviceTwin{}, deviceid.Index, func(o client.Object) []string {
			return []string{o.(*v1alpha1.DeviceTwin).EffectiveDeviceID()}
		}).Build()
	r := &DeviceTwinReconciler{Client: c}
	// A stale claim (its twin gone) would wake both twins.
	cl := &v1alpha1.DeviceIDClaim{ObjectMeta: metav1.ObjectMeta{Namespace: "claims", Name: deviceid.ClaimName("X")}}
	cl.Spec.DeviceID = "X"
	cl.Spec.Twin = v1alpha1.TwinReference{Namespace: "ns", Name: "holder", UID: "gone-uid"}
	h := r.claimEvents()
	q := workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[reconcile.Request]())
	defer q.ShutDown()
	h.Create(context.Background(), event.CreateEvent{Object: cl, IsInInitialList: true}, q)
	if q.Len() != 0 {
		t.Errorf("a listed claim woke %d twins, want none", q.Len())
	}
	h.Create(context.Background(), event.CreateEvent{Object: cl}, q)
	if q.Len() != 2 {
		t.Errorf("a created claim woke %d twins, want 2", q.Len())
	}
}
