package controllers

import (
	"context"
	"errors"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/client/interceptor"
	"sigs.k8s.io/controller-runtime/pkg/event"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// The checks of spec.authentication.secretRef must hold whatever reader
// the operator runs with: the manager's cache sees only labelled Secrets,
// but a reader without that filter (here a fake client) sees all, so the
// label is checked itself.

func credScheme(t *testing.T) *runtime.Scheme {
	t.Helper()
	s := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	if err := v1alpha1.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	return s
}

// refTwin is a twin "victim" whose secretRef names ref, with its key
// Secret holding own (controlled by it).
func refTwin(t *testing.T, ref, own string) (*v1alpha1.DeviceTwin, *corev1.Secret) {
	t.Helper()
	tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "victim", UID: "victim-uid"}}
	tw.Spec.DeviceID = "Victim"
	tw.Spec.Authentication = &v1alpha1.Authentication{SecretRef: &v1alpha1.SecretReference{Name: ref}}
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: v1alpha1.KeySecretName("victim"),
		Labels: map[string]string{v1alpha1.DeviceKeysLabel: "true"}},
		Data: map[string][]byte{v1alpha1.PrimaryKeyKey: []byte(own), v1alpha1.SecondaryKeyKey: []byte(sas.NewKey())}}
	ctrl := true
	sec.OwnerReferences = []metav1.OwnerReference{{APIVersion: v1alpha1.GroupVersion.String(), Kind: "DeviceTwin",
		Name: "victim", UID: "victim-uid", Controller: &ctrl}}
	return tw, sec
}

func keySecretWith(name, key string, labelled bool, owner string) *corev1.Secret {
	s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name},
		Data: map[string][]byte{v1alpha1.PrimaryKeyKey: []byte(key)}}
	if labelled {
		s.Labels = map[string]string{v1alpha1.DeviceKeysLabel: "true"}
	}
	if owner != "" {
		s.OwnerReferences = []metav1.OwnerReference{{APIVersion: v1alpha1.GroupVersion.String(), Kind: "DeviceTwin", Name: owner, UID: "other-uid"}}
	}
	return s
}

// TestSecretRefRefused: an unlabelled Secret, or another twin's key
// Secret, gives no key to the broker's lookup (keysOf) nor to the twin's
// key Secret (ensureKeySecret), and the condition says why; a labelled
// Secret that no twin owns does.
func TestSecretRefRefused(t *testing.T) {
	own, theirs := sas.NewKey(), sas.NewKey()
	for name, c := range map[string]struct {
		ref      *corev1.Secret
		want     string // key in effect: "own" or "theirs"
		reason   string
		inReason string
	}{
		"unlabelled":           {keySecretWith("plain", theirs, false, ""), "own", v1alpha1.ReasonSecretRefNotAllowed, "Secret plain lacks the label kubetwin.io/device-keys=true"},
		"another twin's":       {keySecretWith("other-device-key", theirs, true, "other"), "own", v1alpha1.ReasonSecretRefNotAllowed, "Secret other-device-key is owned by DeviceTwin other"},
		"labelled, no owner":   {keySecretWith("byo", theirs, true, ""), "theirs", v1alpha1.ReasonKeysReady, ""},
		"unlabelled and owned": {keySecretWith("both", theirs, false, "other"), "own", v1alpha1.ReasonSecretRefNotAllowed, "owned by DeviceTwin other"},
	} {
		t.Run(name, func(t *testing.T) {
			tw, sec := refTwin(t, c.ref.Name, own)
			cl := fake.NewClientBuilder().WithScheme(credScheme(t)).WithObjects(tw, sec, c.ref).Build()
			want := map[string]string{"own": own, "theirs": theirs}[c.want]

			d, err := keysOf(context.Background(), cl, tw)
			if err != nil {
				t.Fatal(err)
			}
			if d.PrimaryKey != want {
				t.Errorf("keysOf: primary key from %s, want %s", which(d.PrimaryKey, own, theirs), c.want)
			}

			r := &DeviceTwinReconciler{Client: cl, Credentials: &Credentials{HubHostname: "hub"}}
			keys, st, err := r.ensureKeySecret(context.Background(), tw)
			if err != nil {
				t.Fatal(err)
			}
			if keys.primary != want || st.reason != c.reason || !contains(st.message, c.inReason) {
				t.Errorf("ensureKeySecret: primary key from %s, condition %s %q; want %s, %s containing %q",
					which(keys.primary, own, theirs), st.reason, st.message, c.want, c.reason, c.inReason)
			}
			got := &corev1.Secret{}
			if err := cl.Get(context.Background(), types.NamespacedName{Namespace: "ns", Name: sec.Name}, got); err != nil {
				t.Fatal(err)
			}
			if k := string(got.Data[v1alpha1.PrimaryKeyKey]); k != want {
				t.Errorf("the twin's key Secret holds the primary key from %s, want %s", which(k, own, theirs), c.want)
			}
		})
	}
}

// TestSecretRefCopiedKeyReplaced: a key in the twin's key Secret that
// equals one of a refused secretRef (copied there by an operator from
// before the check) counts for nothing and is replaced.
func TestSecretRefCopiedKeyReplaced(t *testing.T) {
	theirs := sas.NewKey()
	ref := keySecretWith("other-device-key", theirs, true, "other")
	tw, sec := refTwin(t, ref.Name, theirs)
	cl := fake.NewClientBuilder().WithScheme(credScheme(t)).WithObjects(tw, sec, ref).Build()
	d, err := keysOf(context.Background(), cl, tw)
	if err != nil {
		t.Fatal(err)
	}
	if d.PrimaryKey != "" || d.SecondaryKey == "" {
		t.Errorf("keysOf: primary %q (want none), secondary %q (want the twin's)", d.PrimaryKey, d.SecondaryKey)
	}
	r := &DeviceTwinReconciler{Client: cl, Credentials: &Credentials{HubHostname: "hub"}}
	keys, st, err := r.ensureKeySecret(context.Background(), tw)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sas.DecodeKey(keys.primary); err != nil || keys.primary == theirs || st.reason != v1alpha1.ReasonSecretRefNotAllowed {
		t.Errorf("ensureKeySecret: primary %q (%v), reason %s; want a new key and %s", keys.primary, err, st.reason, v1alpha1.ReasonSecretRefNotAllowed)
	}
	got := &corev1.Secret{}
	if err := cl.Get(context.Background(), client.ObjectKeyFromObject(sec), got); err != nil {
		t.Fatal(err)
	}
	if string(got.Data[v1alpha1.PrimaryKeyKey]) != keys.primary {
		t.Errorf("the key Secret was not rewritten with the new key")
	}
}

// TestSecretRefOwnKeySecret: naming the twin's own key Secret is refused
// but leaves its keys alone (no churn of new keys at every reconcile).
func TestSecretRefOwnKeySecret(t *testing.T) {
	own := sas.NewKey()
	tw, sec := refTwin(t, v1alpha1.KeySecretName("victim"), own)
	cl := fake.NewClientBuilder().WithScheme(credScheme(t)).WithObjects(tw, sec).Build()
	r := &DeviceTwinReconciler{Client: cl, Credentials: &Credentials{HubHostname: "hub"}}
	for i := 0; i < 2; i++ {
		keys, st, err := r.ensureKeySecret(context.Background(), tw)
		if err != nil {
			t.Fatal(err)
		}
		if keys.primary != own || st.reason != v1alpha1.ReasonSecretRefNotAllowed {
			t.Errorf("round %d: primary changed (%v) or reason %s", i, keys.primary != own, st.reason)
		}
	}
}

func which(k, own, theirs string) string {
	switch k {
	case own:
		return "own"
	case theirs:
		return "theirs"
	case "":
		return "nowhere"
	}
	return "elsewhere"
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

// TestOwnKeySecretCreatesIgnored: the watch of key Secrets does not wake
// a twin for the creation of a Secret the operator made, nor for the
// cache's first listing, but does for any other creation and for changes.
func TestOwnKeySecretCreatesIgnored(t *testing.T) {
	secret := func(labels map[string]string) *corev1.Secret {
		return &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "a-keys", Labels: labels}}
	}
	ours := secret(map[string]string{v1alpha1.DeviceKeysLabel: "true", "app.kubernetes.io/managed-by": "kubetwin"})
	theirs := secret(map[string]string{v1alpha1.DeviceKeysLabel: "true"})
	if ownCreatesIgnored.Create(event.CreateEvent{Object: ours}) {
		t.Error("the creation of the operator's own key Secret woke the twin again")
	}
	if !ownCreatesIgnored.Create(event.CreateEvent{Object: theirs}) {
		t.Error("the creation of a key Secret the operator did not make did not wake the twin")
	}
	if !ownCreatesIgnored.Update(event.UpdateEvent{ObjectOld: ours, ObjectNew: ours}) || !ownCreatesIgnored.Delete(event.DeleteEvent{Object: ours}) {
		t.Error("a change or deletion of the operator's key Secret did not wake the twin")
	}
	listed := event.CreateEvent{Object: theirs, IsInInitialList: true}
	if ownCreatesIgnored.Create(listed) || initialListIgnored.Create(listed) {
		t.Error("the cache's first listing of a Secret woke its twin (each twin is woken by its own listing)")
	}
}

// TestKeySecretNotYetCached: a key Secret that exists but is not in the
// cache is the twin's own, created by an earlier reconcile (its live copy
// is used: its keys, no error, no condition but KeysReady, no write when
// it holds them), or someone else's (SecretConflict).
func TestKeySecretNotYetCached(t *testing.T) {
	for name, c := range map[string]struct {
		labelled, owned bool
		adopt           bool
	}{
		"own, the cache behind": {true, true, true},
		"unlabelled":            {false, true, false},
		"not owned":             {true, false, false},
	} {
		t.Run(name, func(t *testing.T) {
			own := sas.NewKey()
			tw, sec := refTwin(t, "", own)
			tw.Spec.Authentication = nil
			if !c.labelled {
				sec.Labels = nil
			}
			if !c.owned {
				sec.OwnerReferences = nil
			}
			api := fake.NewClientBuilder().WithScheme(credScheme(t)).WithObjects(tw, sec).Build()
			// The cache: the twin, and no Secret.
			cached := fake.NewClientBuilder().WithScheme(credScheme(t)).WithObjects(tw).
				WithInterceptorFuncs(interceptor.Funcs{Create: func(ctx context.Context, _ client.WithWatch, o client.Object, opts ...client.CreateOption) error {
					return api.Create(ctx, o, opts...)
				}, Update: func(ctx context.Context, _ client.WithWatch, o client.Object, opts ...client.UpdateOption) error {
					return api.Update(ctx, o, opts...)
				}}).Build()
			r := &DeviceTwinReconciler{Client: cached, Credentials: &Credentials{HubHostname: "hub"}, Claims: &deviceid.Claims{APIReader: api}}
			keys, st, err := r.ensureKeySecret(context.Background(), tw)
			if !c.adopt {
				if err != nil || st == nil || st.reason != v1alpha1.ReasonSecretConflict {
					t.Errorf("condition %+v, error %v: want %s", st, err, v1alpha1.ReasonSecretConflict)
				}
				return
			}
			if err != nil || st == nil || st.reason != v1alpha1.ReasonKeysReady {
				t.Fatalf("condition %+v, error %v: want %s and no error", st, err, v1alpha1.ReasonKeysReady)
			}
			if keys.primary != own || keys.secondary != string(sec.Data[v1alpha1.SecondaryKeyKey]) {
				t.Errorf("keys %+v: want the live Secret's", keys)
			}
			// The live Secret lacked the connection string and the
			// managed-by label: the update (from the live copy) adds them
			// and keeps its keys.
			got := &corev1.Secret{}
			if err := api.Get(context.Background(), client.ObjectKeyFromObject(sec), got); err != nil {
				t.Fatal(err)
			}
			if string(got.Data[v1alpha1.PrimaryKeyKey]) != own || len(got.Data[v1alpha1.ConnectionStringKey]) == 0 ||
				got.Labels["app.kubernetes.io/managed-by"] != "kubetwin" {
				t.Errorf("live Secret after: labels %v, data keys %d: want its keys, a connection string and the managed-by label", got.Labels, len(got.Data))
			}
			// Again, now that it holds everything: no write.
			rv := got.ResourceVersion
			if _, st, err := r.ensureKeySecret(context.Background(), tw); err != nil || st.reason != v1alpha1.ReasonKeysReady {
				t.Fatalf("second pass: condition %+v, error %v", st, err)
			}
			if err := api.Get(context.Background(), client.ObjectKeyFromObject(sec), got); err != nil || got.ResourceVersion != rv {
				t.Errorf("second pass wrote the Secret (resourceVersion %s → %s, %v)", rv, got.ResourceVersion, err)
			}
		})
	}
}

// TestKeySecretNotYetCachedReadFails: when the live read of a key Secret
// the cache lacks fails, or finds it gone, the reconcile retries: no
// SecretConflict condition.
func TestKeySecretNotYetCachedReadFails(t *testing.T) {
	for name, getErr := range map[string]error{
		"read fails": errors.New("connection refused"),
		"gone":       apierrors.NewNotFound(corev1.Resource("secrets"), "victim-device-key"),
	} {
		t.Run(name, func(t *testing.T) {
			tw, sec := refTwin(t, "", sas.NewKey())
			tw.Spec.Authentication = nil
			api := fake.NewClientBuilder().WithScheme(credScheme(t)).WithObjects(tw, sec).Build()
			live := fake.NewClientBuilder().WithScheme(credScheme(t)).WithObjects(tw, sec).
				WithInterceptorFuncs(interceptor.Funcs{Get: func(context.Context, client.WithWatch, client.ObjectKey, client.Object, ...client.GetOption) error {
					return getErr
				}}).Build()
			cached := fake.NewClientBuilder().WithScheme(credScheme(t)).WithObjects(tw).
				WithInterceptorFuncs(interceptor.Funcs{Create: func(ctx context.Context, _ client.WithWatch, o client.Object, opts ...client.CreateOption) error {
					return api.Create(ctx, o, opts...)
				}}).Build()
			r := &DeviceTwinReconciler{Client: cached, Credentials: &Credentials{HubHostname: "hub"}, Claims: &deviceid.Claims{APIReader: live}}
			if _, st, err := r.ensureKeySecret(context.Background(), tw); err == nil || st != nil {
				t.Errorf("condition %+v, error %v: want a retry (an error) and no condition", st, err)
			}
		})
	}
}
