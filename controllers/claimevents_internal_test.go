package controllers

import (
	"context"
	"slices"
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

// A claim's events wake the twins that want its id, but a claim created
// or updated for a twin does not wake that twin again: at start-up every
// twin creates its claim, and the wake was a second reconcile of the whole
// fleet (and an apply of labels the cache had not caught up with yet).
func TestClaimEventsWakeOthersNotTheHolder(t *testing.T) {
	twin := func(name, uid string) *v1alpha1.DeviceTwin {
		tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, UID: types.UID(uid)}}
		tw.Spec.DeviceID = "X"
		return tw
	}
	holder, other := twin("holder", "holder-uid"), twin("other", "other-uid")
	c := fake.NewClientBuilder().WithScheme(credScheme(t)).WithObjects(holder, other).
		WithIndex(&v1alpha1.DeviceTwin{}, deviceid.Index, func(o client.Object) []string {
			return []string{o.(*v1alpha1.DeviceTwin).EffectiveDeviceID()}
		}).Build()
	r := &DeviceTwinReconciler{Client: c}
	claimOf := func(uid string) *v1alpha1.DeviceIDClaim {
		cl := &v1alpha1.DeviceIDClaim{ObjectMeta: metav1.ObjectMeta{Namespace: "claims", Name: deviceid.ClaimName("X")}}
		cl.Spec.DeviceID = "X"
		cl.Spec.Twin = v1alpha1.TwinReference{Namespace: "ns", Name: "holder", UID: types.UID(uid)}
		return cl
	}
	h := r.claimEvents()
	ctx := context.Background()
	cases := map[string]struct {
		send func(q workqueue.TypedRateLimitingInterface[reconcile.Request])
		want []string
	}{
		"created by its holder": {func(q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			h.Create(ctx, event.CreateEvent{Object: claimOf("holder-uid")}, q)
		}, []string{"other"}},
		"handed over to the holder": {func(q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			h.Update(ctx, event.UpdateEvent{ObjectOld: claimOf("gone-uid"), ObjectNew: claimOf("holder-uid")}, q)
		}, []string{"other"}},
		"naming an earlier twin of the holder's name": {func(q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			h.Create(ctx, event.CreateEvent{Object: claimOf("gone-uid")}, q)
		}, []string{"holder", "other"}},
		"deleted": {func(q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
			h.Delete(ctx, event.DeleteEvent{Object: claimOf("holder-uid")}, q)
		}, []string{"holder", "other"}},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			q := workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[reconcile.Request]())
			defer q.ShutDown()
			tc.send(q)
			var got []string
			for q.Len() > 0 {
				req, _ := q.Get()
				got = append(got, req.Name)
				q.Done(req)
			}
			slices.Sort(got)
			if !slices.Equal(got, tc.want) {
				t.Errorf("woken %q, want %q", got, tc.want)
			}
		})
	}
}
