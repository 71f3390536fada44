package controllers_test

import (
	"context"
	"fmt"
	"sync"
	"testing"

	. "github.com/onsi/gomega"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/tools/events"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/bridge"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// refuseWrites is a client that reads from c and records, and refuses,
// every write.
func refuseWrites(c client.WithWatch) (client.WithWatch, func() []string) {
	var mu sync.Mutex
	var writes []string
	refuse := func(verb string, obj runtime.Object) error {
		o, _ := obj.(client.Object)
		w := fmt.Sprintf("%s %T", verb, obj)
		if o != nil {
			w += " " + o.GetNamespace() + "/" + o.GetName()
		}
		mu.Lock()
		writes = append(writes, w)
		mu.Unlock()
		return fmt.Errorf("unexpected write: %s", w)
	}
	wc := interceptor.NewClient(c, interceptor.Funcs{
		Create: func(_ context.Context, _ client.WithWatch, obj client.Object, _ ...client.CreateOption) error {
			return refuse("create", obj)
		},
		Update: func(_ context.Context, _ client.WithWatch, obj client.Object, _ ...client.UpdateOption) error {
			return refuse("update", obj)
		},
		Patch: func(_ context.Context, _ client.WithWatch, obj client.Object, _ client.Patch, _ ...client.PatchOption) error {
			return refuse("patch", obj)
		},
		Apply: func(_ context.Context, _ client.WithWatch, obj runtime.ApplyConfiguration, _ ...client.ApplyOption) error {
			return refuse("apply", nil)
		},
		Delete: func(_ context.Context, _ client.WithWatch, obj client.Object, _ ...client.DeleteOption) error {
			return refuse("delete", obj)
		},
		SubResourceUpdate: func(_ context.Context, _ client.Client, sub string, obj client.Object, _ ...client.SubResourceUpdateOption) error {
			return refuse(sub+" update", obj)
		},
		SubResourcePatch: func(_ context.Context, _ client.Client, sub string, obj client.Object, _ client.Patch, _ ...client.SubResourcePatchOption) error {
			return refuse(sub+" patch", obj)
		},
	})
	return wc, func() []string { mu.Lock(); defer mu.Unlock(); return append([]string(nil), writes...) }
}

// topicsBus records what is published.
type topicsBus struct {
	mu     sync.Mutex
	topics []string
}

func (b *topicsBus) Start(context.Context) error { return nil }
func (b *topicsBus) Connected() bool             { return true }
func (b *topicsBus) Publish(_ context.Context, topic string, _ []byte, retained bool) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.topics = append(b.topics, fmt.Sprintf("%s retained=%v", topic, retained))
	return nil
}

// An operator that starts again finds every twin as it left it: reconciling
// a twin that did not change (status, labels, finalizer, claim, key Secret
// in place) must write nothing to the API server, emit no Event and send
// the device no desired patch. A fleet-wide restart is then reads only.
func TestRestartWritesNothingForUnchangedTwin(t *testing.T) {
	g := NewWithT(t)
	ctx := context.Background()
	ns := newNamespace(t)
	createTwin(t, ns, "steady", "Steady-1", `{"location":{"plant":"P1"}}`, `{"interval":30}`)
	waitObserved(t, ns, "steady")
	dev := connect(t, "Steady-1", nil)
	_, err := dev.Report(ctx, map[string]any{"interval": 30})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(dev.Close()).To(Succeed())
	g.Eventually(func(g Gomega) {
		tw := getTwin(g, ns, "steady")
		g.Expect(cond(tw, v1alpha1.ConditionInSync).Status).To(Equal(metav1.ConditionTrue))
		g.Expect(cond(tw, v1alpha1.ConditionConnected).Reason).To(Equal(v1alpha1.ReasonDisconnected))
		g.Expect(cond(tw, v1alpha1.ConditionCredentialsReady).Status).To(Equal(metav1.ConditionTrue))
		g.Expect(tw.Labels).To(HaveKeyWithValue("location.plant", "P1"))
	}, wait, tick).Should(Succeed())

	// The restarted operator: a new bridge (no working state), a client
	// that refuses writes.
	c, writes := refuseWrites(k8s)
	pub := &topicsBus{}
	br := bridge.New(bridge.Options{Resolve: func(context.Context, string) (*v1alpha1.DeviceTwin, error) { return nil, deviceid.ErrNotFound }})
	br.SetBus(pub)
	rec := events.NewFakeRecorder(10)
	r := &controllers.DeviceTwinReconciler{
		Client:      c,
		Bridge:      br,
		Recorder:    rec,
		Credentials: &controllers.Credentials{HubHostname: testHub},
		Claims:      &deviceid.Claims{Client: c, APIReader: k8s, Namespace: claimsNS},
	}
	_, err = r.Reconcile(ctx, ctrl.Request{NamespacedName: client.ObjectKey{Namespace: ns, Name: "steady"}})
	g.Expect(err).NotTo(HaveOccurred())
	g.Expect(writes()).To(BeEmpty())
	g.Expect(rec.Events).To(BeEmpty())
	// The broker may have lost its retained messages with the operator
	// (the embedded one keeps them in memory): the document goes out again
	// as it was, but no patch.
	g.Expect(pub.topics).To(Equal([]string{protocol.DesiredTopic("Steady-1") + " retained=true"}))
}
