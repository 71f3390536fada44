package deviceid

import (
	"context"
	"errors"
	"regexp"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

const ns = "kubetwin-system"

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func twinObj(namespace, name, id, uid string) *v1alpha1.DeviceTwin {
	t := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, UID: types.UID(uid)}}
	t.Spec.DeviceID = id
	return t
}

func claimObj(id string, holder *v1alpha1.DeviceTwin, at time.Time) *v1alpha1.DeviceIDClaim {
	return &v1alpha1.DeviceIDClaim{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: ClaimName(id)},
		Spec: v1alpha1.DeviceIDClaimSpec{
			DeviceID: id, Twin: refOf(holder), Holder: holder.Namespace + "/" + holder.Name, ClaimedAt: metav1.NewTime(at),
		},
	}
}

func newClient(t *testing.T, objs ...client.Object) client.WithWatch {
	t.Helper()
	s := runtime.NewScheme()
	if err := v1alpha1.AddToScheme(s); err != nil {
		t.Fatal(err)
	}
	return fake.NewClientBuilder().WithScheme(s).WithObjects(objs...).Build()
}

func TestClaimName(t *testing.T) {
	name := ClaimName("myDeviceId")
	if !regexp.MustCompile(`^id-[0-9a-f]{40}$`).MatchString(name) {
		t.Errorf("ClaimName = %q, want id- and 40 lower-case hex digits", name)
	}
	if ClaimName("mydeviceid") == name {
		t.Error("ids that differ in case share a claim")
	}
	if ClaimName("a/b:%41") == ClaimName("a/b:A") || len(ClaimName("a/b:%41")) != 43 {
		t.Error("characters no object name may hold change the claim's shape or collide")
	}
}

func TestHeldErrorMessage(t *testing.T) {
	e := &HeldError{DeviceID: "X", Holder: v1alpha1.TwinReference{Namespace: "ns", Name: "name"}}
	if got, want := e.Error(), `device id "X" is already held by DeviceTwin ns/name`; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	e.Deleting = true
	if got, want := e.Error(), `device id "X" is already held by DeviceTwin ns/name, which is being deleted: retry once it is gone`; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

func TestResolve(t *testing.T) {
	holder := twinObj("a", "holder", "dev", "u1")
	deleting := twinObj("a", "leaving", "gone", "u2")
	deleting.Finalizers = []string{"x"}
	now := metav1.Now()
	deleting.DeletionTimestamp = &now
	replaced := twinObj("a", "replaced", "old", "u3-new")
	c := newClient(t, holder, deleting, replaced,
		twinObj("b", "loser", "dev", "u9"),
		claimObj("dev", holder, t0),
		claimObj("gone", deleting, t0),
		claimObj("old", twinObj("a", "replaced", "old", "u3-old"), t0),
		claimObj("phantom", twinObj("c", "never", "phantom", "u4"), t0),
	)
	r := Resolver{Reader: c, Namespace: ns}
	for _, tc := range []struct {
		id   string
		want string // namespace/name, or "" for ErrNotFound
	}{
		{"dev", "a/holder"},
		{"unclaimed", ""},
		{"gone", ""},    // holder being deleted
		{"old", ""},     // same name, another object
		{"phantom", ""}, // holder never stored
	} {
		got, err := r.Resolve(context.Background(), tc.id)
		switch {
		case tc.want == "" && !errors.Is(err, ErrNotFound):
			t.Errorf("Resolve(%q) = %v, %v; want ErrNotFound", tc.id, got, err)
		case tc.want != "" && (err != nil || got.Namespace+"/"+got.Name != tc.want):
			t.Errorf("Resolve(%q) = %v, %v; want %s", tc.id, got, err, tc.want)
		}
	}
}

func TestClaim(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name     string
		existing []client.Object
		twin     *v1alpha1.DeviceTwin
		// want is "" when twin must hold the claim afterwards, else the
		// HeldError message.
		want string
	}{
		{name: "free", twin: twinObj("b", "t", "id", "ub")},
		{
			name:     "held by itself",
			existing: []client.Object{twinObj("b", "t", "id", "ub"), claimObj("id", twinObj("b", "t", "id", "ub"), t0.Add(-time.Hour))},
			twin:     twinObj("b", "t", "id", "ub"),
		},
		{
			name:     "held by a live twin",
			existing: []client.Object{twinObj("a", "h", "id", "ua"), claimObj("id", twinObj("a", "h", "id", "ua"), t0.Add(-time.Hour))},
			twin:     twinObj("b", "t", "id", "ub"),
			want:     `device id "id" is already held by DeviceTwin a/h`,
		},
		{
			name:     "holder never stored, within the grace",
			existing: []client.Object{claimObj("id", twinObj("a", "h", "id", "ua"), t0.Add(-StaleAfter+time.Second))},
			twin:     twinObj("b", "t", "id", "ub"),
			want:     `device id "id" is already held by DeviceTwin a/h`,
		},
		{
			name:     "holder never stored, stale",
			existing: []client.Object{claimObj("id", twinObj("a", "h", "id", "ua"), t0.Add(-StaleAfter))},
			twin:     twinObj("b", "t", "id", "ub"),
		},
		{
			name:     "holder replaced by another object of its name, within the grace",
			existing: []client.Object{twinObj("a", "h", "id", "ua-2"), claimObj("id", twinObj("a", "h", "id", "ua"), t0)},
			twin:     twinObj("b", "t", "id", "ub"),
			want:     `device id "id" is already held by DeviceTwin a/h`,
		},
		{
			name:     "same namespace/name created again",
			existing: []client.Object{claimObj("id", twinObj("b", "t", "id", "old-uid"), t0)},
			twin:     twinObj("b", "t", "id", "ub"),
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newClient(t, tc.existing...)
			cl := &Claims{Client: c, APIReader: c, Namespace: ns, Now: func() time.Time { return t0 }}
			err := cl.Claim(ctx, tc.twin)
			got := &v1alpha1.DeviceIDClaim{}
			if gerr := c.Get(ctx, types.NamespacedName{Namespace: ns, Name: ClaimName("id")}, got); gerr != nil {
				t.Fatal(gerr)
			}
			if tc.want == "" {
				if err != nil || !HeldBy(got, tc.twin) {
					t.Fatalf("Claim = %v; claim holds %+v", err, got.Spec.Twin)
				}
				if cerr := cl.Check(ctx, tc.twin); cerr != nil {
					t.Errorf("Check after Claim = %v", cerr)
				}
				return
			}
			var held *HeldError
			if !errors.As(err, &held) || err.Error() != tc.want {
				t.Fatalf("Claim = %v, want %q", err, tc.want)
			}
			if HeldBy(got, tc.twin) {
				t.Error("a refused claim took the id")
			}
			if cerr := cl.Check(ctx, tc.twin); cerr == nil || cerr.Error() != tc.want {
				t.Errorf("Check = %v, want %q", cerr, tc.want)
			}
		})
	}
}

func TestReleaseOnlyByHolder(t *testing.T) {
	ctx := context.Background()
	holder := twinObj("a", "h", "id", "ua")
	c := newClient(t, holder, claimObj("id", holder, t0))
	cl := &Claims{Client: c, APIReader: c, Namespace: ns}
	if err := cl.Release(ctx, twinObj("b", "other", "id", "ub")); err != nil {
		t.Fatal(err)
	}
	key := types.NamespacedName{Namespace: ns, Name: ClaimName("id")}
	if err := c.Get(ctx, key, &v1alpha1.DeviceIDClaim{}); err != nil {
		t.Fatalf("a twin that does not hold the id released it: %v", err)
	}
	if err := cl.Release(ctx, holder); err != nil {
		t.Fatal(err)
	}
	if err := c.Get(ctx, key, &v1alpha1.DeviceIDClaim{}); !apierrors.IsNotFound(err) {
		t.Fatalf("the holder's release left the claim: %v", err)
	}
}

func TestCollect(t *testing.T) {
	ctx := context.Background()
	live := twinObj("a", "h", "live", "ua")
	for _, tc := range []struct {
		name     string
		claim    *v1alpha1.DeviceIDClaim
		wait     time.Duration
		collects bool
	}{
		{"live holder", claimObj("live", live, t0.Add(-time.Hour)), 0, false},
		{"gone, young", claimObj("young", twinObj("a", "x", "young", "ux"), t0.Add(-20*time.Second)), StaleAfter - 20*time.Second, false},
		{"gone, stale", claimObj("stale", twinObj("a", "x", "stale", "ux"), t0.Add(-StaleAfter)), 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newClient(t, live, tc.claim)
			cl := &Claims{Client: c, APIReader: c, Namespace: ns, Now: func() time.Time { return t0 }}
			cur := &v1alpha1.DeviceIDClaim{}
			if err := c.Get(ctx, client.ObjectKeyFromObject(tc.claim), cur); err != nil {
				t.Fatal(err)
			}
			wait, err := cl.Collect(ctx, cur)
			if err != nil || wait != tc.wait {
				t.Fatalf("Collect = %v, %v; want %v, nil", wait, err, tc.wait)
			}
			err = c.Get(ctx, client.ObjectKeyFromObject(tc.claim), &v1alpha1.DeviceIDClaim{})
			if gone := apierrors.IsNotFound(err); gone != tc.collects {
				t.Errorf("claim removed = %v, want %v (%v)", gone, tc.collects, err)
			}
		})
	}
}

// The cache keeps a claim's identity and spec, without its managedFields.
func TestCacheTransformDropsClaimManagedFields(t *testing.T) {
	holder := twinObj("ns", "a", "A-1", "uid-a")
	cl := claimObj("A-1", holder, t0)
	cl.UID, cl.ResourceVersion = "claim-uid", "42"
	entries := []metav1.ManagedFieldsEntry{{Manager: "kubetwin", Operation: metav1.ManagedFieldsOperationUpdate,
		FieldsType: "FieldsV1", FieldsV1: &metav1.FieldsV1{}}}
	cl.ManagedFields = entries
	want := cl.DeepCopy()
	want.ManagedFields = nil
	got, err := CacheTransform(cl)
	if err != nil {
		t.Fatal(err)
	}
	if !equality.Semantic.DeepEqual(got, want) {
		t.Errorf("transformed claim %+v, want %+v", got, want)
	}
	// Other objects pass unchanged.
	tw := twinObj("ns", "b", "B-1", "uid-b")
	tw.ManagedFields = entries
	if got, _ := CacheTransform(tw.DeepCopy()); !equality.Semantic.DeepEqual(got, tw) {
		t.Errorf("a DeviceTwin was changed: %+v", got)
	}
}
