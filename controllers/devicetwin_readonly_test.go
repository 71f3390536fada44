package controllers_test

import (
	"context"
	"sync"
	"testing"

	. "github.com/onsi/gomega"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/client-go/tools/events"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/bridge"
	"github.com/kubetwin/kubetwin/internal/deviceid"
)

// The reconciler reads twins from the cache without a copy
// (UnsafeDisableDeepCopy), so it must never write to the twin it read: a
// change would show in the cache, and in every later reconcile, without
// being stored. Each path that writes (labels and finalizer, claim, key
// Secret, status, desired published) runs on a twin whose every Get is
// checked: asked without a copy, and the same after the reconcile.
func TestReconcileLeavesCachedTwinUnchanged(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	createTwin(t, ns, "fresh", "RO-1", `{"location":{"plant":"P1"}}`, `{"interval":30}`)
	createTwin(t, ns, "changed", "RO-2", `{"model":"m1"}`, `{"interval":10}`)
	waitObserved(t, ns, "changed")
	setSpec(t, ns, "changed", `{"spec":{"tags":{"model":"m2"},"desired":{"interval":20,"led":true}}}`)

	type read struct {
		obj  *v1alpha1.DeviceTwin
		want *v1alpha1.DeviceTwin
		copy bool
	}
	var mu sync.Mutex
	var reads []read
	c := interceptor.NewClient(k8s, interceptor.Funcs{
		Get: func(ctx context.Context, c client.WithWatch, key client.ObjectKey, obj client.Object, opts ...client.GetOption) error {
			if err := c.Get(ctx, key, obj, opts...); err != nil {
				return err
			}
			if tw, ok := obj.(*v1alpha1.DeviceTwin); ok {
				o := &client.GetOptions{}
				o.ApplyOptions(opts)
				mu.Lock()
				reads = append(reads, read{obj: tw, want: tw.DeepCopy(), copy: o.UnsafeDisableDeepCopy == nil || !*o.UnsafeDisableDeepCopy})
				mu.Unlock()
			}
			return nil
		},
	})
	br := bridge.New(bridge.Options{Resolve: func(context.Context, string) (*v1alpha1.DeviceTwin, error) { return nil, deviceid.ErrNotFound }})
	br.SetBus(&topicsBus{})
	r := &controllers.DeviceTwinReconciler{
		Client:      c,
		Bridge:      br,
		Recorder:    events.NewFakeRecorder(100),
		Credentials: &controllers.Credentials{HubHostname: testHub},
		Claims:      &deviceid.Claims{Client: c, APIReader: k8s, Namespace: claimsNS},
	}
	for _, name := range []string{"fresh", "changed", "fresh", "changed"} {
		_, err := r.Reconcile(ctx, ctrl.Request{NamespacedName: client.ObjectKey{Namespace: ns, Name: name}})
		g.Expect(err).NotTo(HaveOccurred(), name)
	}
	g.Expect(reads).NotTo(BeEmpty())
	for i, rd := range reads {
		g.Expect(rd.copy).To(BeFalse(), "read %d of %s asked for a copy", i, rd.obj.Name)
		g.Expect(equality.Semantic.DeepEqual(rd.obj, rd.want)).To(BeTrue(), "the reconcile changed twin %s it read (read %d)", rd.obj.Name, i)
	}
}
