package watchdecode

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// TestCacheAsClientGo runs two controller-runtime caches against a real
// API server, one with NewInformer's one-pass watches (twins of one
// namespace, claims of another) and one with client-go's: after the
// first listing, and after creates, updates and deletes, both hold the
// same objects, the one-pass cache only the namespaces it was given, and
// its objects came through the one pass.
func TestCacheAsClientGo(t *testing.T) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Fatal("KUBEBUILDER_ASSETS is not set: KUBEBUILDER_ASSETS=$(hack/controlplane.sh) go test ./internal/watchdecode")
	}
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
	}
	cfg, err := env.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	scheme := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(scheme)
	_ = v1alpha1.AddToScheme(scheme)
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	for _, ns := range []string{"fleet", "other", "claims"} {
		if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
			t.Fatal(err)
		}
	}
	twin := func(ns string, i int) *v1alpha1.DeviceTwin {
		return &v1alpha1.DeviceTwin{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("dev-%03d", i), Labels: map[string]string{"site": "redmond43"}},
			Spec: v1alpha1.DeviceTwinSpec{
				Tags:    &apiextensionsv1.JSON{Raw: []byte(fmt.Sprintf(`{"location":{"floor":%d,"room":"3.1\u00e9"}}`, i))},
				Desired: &apiextensionsv1.JSON{Raw: []byte(`{"telemetry":{"interval":30,"enabled":true}}`)},
			},
		}
	}
	create := func(ns string, from, to int) {
		for i := from; i < to; i++ {
			tw := twin(ns, i)
			if err := c.Create(ctx, tw); err != nil {
				t.Fatal(err)
			}
			tw.Status.ConnectionState = "Connected"
			tw.Status.Reported = &apiextensionsv1.JSON{Raw: []byte(fmt.Sprintf(`{"temperature":%d.5}`, i))}
			tw.Status.Conditions = []metav1.Condition{{Type: "Ready", Status: metav1.ConditionTrue, Reason: "Synced", Message: "in sync", LastTransitionTime: metav1.Now()}}
			if err := c.Status().Update(ctx, tw); err != nil {
				t.Fatal(err)
			}
		}
	}
	create("fleet", 0, 40)
	create("other", 0, 5)
	for i := range 20 {
		claim := &v1alpha1.DeviceIDClaim{
			ObjectMeta: metav1.ObjectMeta{Namespace: "claims", Name: fmt.Sprintf("dev-%03d", i)},
			Spec:       v1alpha1.DeviceIDClaimSpec{DeviceID: fmt.Sprintf("dev-%03d", i), Twin: v1alpha1.TwinReference{Namespace: "fleet", Name: fmt.Sprintf("dev-%03d", i), UID: "u"}, ClaimedAt: metav1.Now()},
		}
		if err := c.Create(ctx, claim); err != nil {
			t.Fatal(err)
		}
	}

	newInformer, err := NewInformer(cfg,
		Watched{Object: &v1alpha1.DeviceTwin{}, Resource: "devicetwins", Namespace: "fleet"},
		Watched{Object: &v1alpha1.DeviceIDClaim{}, Resource: "deviceidclaims", Namespace: "claims"})
	if err != nil {
		t.Fatal(err)
	}
	opts := func(f func(o *cache.Options)) cache.Options {
		o := cache.Options{
			Scheme:            scheme,
			DefaultNamespaces: map[string]cache.Config{"fleet": {}},
			ByObject:          map[client.Object]cache.ByObject{&v1alpha1.DeviceIDClaim{}: {Namespaces: map[string]cache.Config{"claims": {}}}},
		}
		if f != nil {
			f(&o)
		}
		return o
	}
	twinsBefore := testutil.ToFloat64(decoded.WithLabelValues("DeviceTwin", OnePass))
	claimsBefore := testutil.ToFloat64(decoded.WithLabelValues("DeviceIDClaim", OnePass))
	onePass, err := cache.New(cfg, opts(func(o *cache.Options) { o.NewInformer = newInformer }))
	if err != nil {
		t.Fatal(err)
	}
	clientGo, err := cache.New(cfg, opts(nil))
	if err != nil {
		t.Fatal(err)
	}
	for _, ca := range []cache.Cache{onePass, clientGo} {
		go func() { _ = ca.Start(ctx) }()
		// Informers start on first use.
		if _, err := ca.GetInformer(ctx, &v1alpha1.DeviceTwin{}); err != nil {
			t.Fatal(err)
		}
		if _, err := ca.GetInformer(ctx, &v1alpha1.DeviceIDClaim{}); err != nil {
			t.Fatal(err)
		}
		if !ca.WaitForCacheSync(ctx) {
			t.Fatal("cache did not sync")
		}
	}

	// same waits until both caches hold the same twins and claims, n twins
	// each, and returns the one-pass cache's twins.
	same := func(what string, n int) []v1alpha1.DeviceTwin {
		t.Helper()
		var a, b v1alpha1.DeviceTwinList
		var ca, cb v1alpha1.DeviceIDClaimList
		for deadline := time.Now().Add(30 * time.Second); ; {
			for _, l := range []struct {
				c   cache.Cache
				obj client.ObjectList
			}{{onePass, &a}, {clientGo, &b}, {onePass, &ca}, {clientGo, &cb}} {
				if err := l.c.List(ctx, l.obj); err != nil {
					t.Fatal(err)
				}
			}
			// A cache lists in no particular order.
			for _, items := range [][]v1alpha1.DeviceTwin{a.Items, b.Items} {
				slices.SortFunc(items, func(x, y v1alpha1.DeviceTwin) int { return cmp.Compare(x.Name, y.Name) })
			}
			for _, items := range [][]v1alpha1.DeviceIDClaim{ca.Items, cb.Items} {
				slices.SortFunc(items, func(x, y v1alpha1.DeviceIDClaim) int { return cmp.Compare(x.Name, y.Name) })
			}
			if len(a.Items) == n && reflect.DeepEqual(a.Items, b.Items) && reflect.DeepEqual(ca.Items, cb.Items) {
				if len(ca.Items) != 20 {
					t.Fatalf("%s: %d claims cached, want 20", what, len(ca.Items))
				}
				return a.Items
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the one-pass cache has %d twins, client-go's %d (want %d), equal: %v; claims equal: %v",
					what, len(a.Items), len(b.Items), n, reflect.DeepEqual(a.Items, b.Items), reflect.DeepEqual(ca.Items, cb.Items))
			}
			time.Sleep(20 * time.Millisecond) // polling two caches for the watch's events, not synchronising
		}
	}
	twins := same("after the first listing", 40)
	for _, tw := range twins {
		if tw.Namespace != "fleet" || tw.Status.Reported == nil || tw.Spec.Tags == nil || len(tw.Status.Conditions) != 1 || len(tw.ManagedFields) == 0 {
			t.Fatalf("cached twin %s/%s lacks what was written: %+v", tw.Namespace, tw.Name, tw)
		}
	}
	if got := testutil.ToFloat64(decoded.WithLabelValues("DeviceTwin", OnePass)) - twinsBefore; got < 40 {
		t.Errorf("%.0f twins decoded in one pass, want at least 40", got)
	}
	if got := testutil.ToFloat64(decoded.WithLabelValues("DeviceIDClaim", OnePass)) - claimsBefore; got < 20 {
		t.Errorf("%.0f claims decoded in one pass, want at least 20", got)
	}

	// Watch events after the listing: creates, an update, a delete.
	create("fleet", 40, 45)
	tw := &v1alpha1.DeviceTwin{}
	if err := c.Get(ctx, client.ObjectKey{Namespace: "fleet", Name: "dev-007"}, tw); err != nil {
		t.Fatal(err)
	}
	tw.Spec.Desired = &apiextensionsv1.JSON{Raw: []byte(`{"telemetry":{"interval":5}}`)}
	if err := c.Update(ctx, tw); err != nil {
		t.Fatal(err)
	}
	if err := c.Delete(ctx, twin("fleet", 3)); err != nil {
		t.Fatal(err)
	}
	twins = same("after creates, an update and a delete", 44)
	for _, tw := range twins {
		if tw.Name == "dev-003" {
			t.Error("dev-003 was deleted but is cached")
		}
		if tw.Name == "dev-007" && string(tw.Spec.Desired.Raw) != `{"telemetry":{"interval":5}}` {
			t.Errorf("dev-007's desired is %s after the update", tw.Spec.Desired.Raw)
		}
	}
}
