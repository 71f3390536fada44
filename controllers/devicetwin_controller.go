// Package controllers holds the DeviceTwin reconciler.
package controllers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	toolscache "k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/events"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/bridge"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/internal/twin"
)

const (
	// Finalizer lets the operator clear a device's retained desired
	// document from the broker before its twin goes.
	Finalizer = "kubetwin.io/retained-desired"
	// LabelManager is the server-side apply field manager that owns the
	// labels mirrored from tags (and the finalizer), so the operator and a
	// GitOps tool never fight over them.
	LabelManager = "kubetwin-labels"
	// StatusManager is the field manager of the operator's status patches.
	StatusManager = "kubetwin"
)

// DeviceTwinReconciler persists each twin's working state (reported
// properties, versions, presence) as one status patch, publishes desired
// changes, and mirrors tags into labels.
type DeviceTwinReconciler struct {
	client.Client
	Bridge   *bridge.Bridge
	Recorder events.EventRecorder
	// MaxConcurrentReconciles bounds parallel status writes (default 32).
	MaxConcurrentReconciles int
	// Now is the clock (tests may replace it).
	Now func() time.Time
	// Credentials, when set, has the operator keep every twin's keys and
	// tell the broker about them (device authentication); nil leaves
	// devices unauthenticated.
	Credentials *Credentials
	// Claims takes and releases device ids; only the twin that holds its
	// id is served (required).
	Claims *deviceid.Claims
}

var _ reconcile.Reconciler = (*DeviceTwinReconciler)(nil)

// +kubebuilder:rbac:groups=kubetwin.io,resources=devicetwins,verbs=get;list;watch;update;patch
// +kubebuilder:rbac:groups=kubetwin.io,resources=devicetwins/status,verbs=get;update;patch
// +kubebuilder:rbac:groups=kubetwin.io,resources=devicetwins/finalizers,verbs=update
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch

// Reconcile brings one twin's status, labels and device in step.
func (r *DeviceTwinReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	log := ctrl.LoggerFrom(ctx)
	// The cached twin itself, not a copy (a copy per reconcile is most of
	// what a restart's no-op reconciles allocate): nothing here writes to
	// t (finalize acts on a live copy, the bridge copies the status it
	// keeps); TestReconcileLeavesCachedTwinUnchanged checks it.
	t := &v1alpha1.DeviceTwin{}
	if err := r.Get(ctx, req.NamespacedName, t, client.UnsafeDisableDeepCopy); err != nil {
		if apierrors.IsNotFound(err) {
			r.Bridge.Forget(req.NamespacedName)
		}
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if !t.DeletionTimestamp.IsZero() {
		return ctrl.Result{}, r.finalize(ctx, t)
	}
	// spec.tags is decoded once, for the labels and for validSpec.
	tags, tagsErr := twin.DecodeRaw(rawBytes(t.Spec.Tags))
	if err := r.applyLabels(ctx, t, tags, tagsErr); err != nil {
		return ctrl.Result{}, fmt.Errorf("mirroring tags into labels: %w", err)
	}

	held, err := r.claim(ctx, t)
	if err != nil {
		return ctrl.Result{}, err
	}
	in := statusInput{twin: t, now: r.now()}
	if held != nil {
		in.duplicateOf = held.Holder.Namespace + "/" + held.Holder.Name
	}
	// The desired document goes out before the keys: a device that can
	// log in finds its twin's document retained, never an empty one.
	in.desired, in.invalid = validSpec(t, tags, tagsErr)
	if in.invalid == nil && held == nil {
		sent, err := r.Bridge.PublishDesired(ctx, t, in.desired)
		if err != nil {
			return ctrl.Result{}, err
		}
		if sent {
			log.V(1).Info("desired change sent to device", "deviceId", t.EffectiveDeviceID())
		}
	}
	var provisionErr error // reported in the status, then retried
	if r.Credentials != nil && held == nil {
		if in.creds, provisionErr = r.reconcileCredentials(ctx, t); in.creds == nil && provisionErr != nil {
			return ctrl.Result{}, provisionErr
		}
	}
	snap, err := r.Bridge.Snapshot(t)
	if err != nil {
		return ctrl.Result{}, reconcile.TerminalError(err)
	}
	in.snap = snap
	st := computeStatus(in)
	if statusChanged(snap.Persisted, st) {
		if err := r.patchStatus(ctx, t, snap.Persisted, st); err != nil {
			return ctrl.Result{}, err
		}
		r.recordTransitions(t, snap.Persisted, st)
	}
	r.Bridge.Persisted(ctx, t, snap, st)
	if provisionErr != nil {
		return ctrl.Result{}, provisionErr
	}
	return r.requeue(snap, st), nil
}

// requeue asks to come back when lastActivityTime is due for a refresh.
func (r *DeviceTwinReconciler) requeue(snap bridge.Snapshot, st v1alpha1.DeviceTwinStatus) ctrl.Result {
	if snap.LastActivity.IsZero() || st.LastActivityTime == nil {
		return ctrl.Result{}
	}
	behind := snap.LastActivity.Sub(st.LastActivityTime.Time)
	if behind <= time.Second {
		return ctrl.Result{}
	}
	return ctrl.Result{RequeueAfter: activityResolution - behind + time.Second}
}

func (r *DeviceTwinReconciler) now() time.Time {
	if r.Now != nil {
		return r.Now()
	}
	return time.Now()
}

// validSpec decodes spec.desired and checks spec.tags (decoded as tags,
// or not, tagsErr) and spec.desired against the twin rules, with the same
// messages as the admission webhook (internal/webhook), which refuses such
// specs up front when installed: those of twin.ParseSection.
func validSpec(t *v1alpha1.DeviceTwin, tags twin.Doc, tagsErr error) (twin.Doc, error) {
	if tagsErr != nil {
		return nil, &twin.Error{Path: "spec.tags", Rule: tagsErr.Error()}
	}
	if err := twin.ValidateDocument(twin.Tags, "spec.tags", tags); err != nil {
		return nil, err
	}
	return twin.ParseSection(twin.Desired, "spec.desired", rawBytes(t.Spec.Desired))
}

func rawBytes(j *apiextensionsv1.JSON) []byte {
	if j == nil {
		return nil
	}
	return j.Raw
}

func specDoc(j *apiextensionsv1.JSON) (twin.Doc, error) {
	if j == nil {
		return twin.Doc{}, nil
	}
	return twin.DecodeRaw(j.Raw)
}

// patchStatus writes st with a merge patch computed against the status
// the operator last persisted, so only what changed is sent.
func (r *DeviceTwinReconciler) patchStatus(ctx context.Context, t *v1alpha1.DeviceTwin, old, st v1alpha1.DeviceTwinStatus) error {
	base := &v1alpha1.DeviceTwin{}
	base.Namespace, base.Name = t.Namespace, t.Name
	base.Status = old
	next := base.DeepCopy()
	next.Status = st
	start := time.Now()
	err := r.Status().Patch(ctx, next, client.MergeFrom(base), client.FieldOwner(StatusManager))
	bridge.StatusWriteSeconds.Observe(time.Since(start).Seconds())
	if err != nil {
		bridge.StatusWrites.WithLabelValues("error").Inc()
		return fmt.Errorf("patching status: %w", err)
	}
	bridge.StatusWrites.WithLabelValues("ok").Inc()
	return nil
}

// recordTransitions emits an event for every condition that changed status
// or reason. A condition seen for the first time (a twin's first status, or
// one the operator starts to report) is no transition: at start-up that
// would be an Event write per twin and condition, and the status says it.
func (r *DeviceTwinReconciler) recordTransitions(t *v1alpha1.DeviceTwin, old, st v1alpha1.DeviceTwinStatus) {
	if r.Recorder == nil {
		return
	}
	for _, c := range st.Conditions {
		switch c.Type {
		case v1alpha1.ConditionReady, v1alpha1.ConditionReconciling, v1alpha1.ConditionStalled:
			continue // they repeat InSync and Connected
		}
		prev := meta.FindStatusCondition(old.Conditions, c.Type)
		if prev == nil || prev.Status == c.Status && prev.Reason == c.Reason {
			continue
		}
		typ := "Normal"
		if c.Reason == v1alpha1.ReasonInvalidDesired || c.Reason == v1alpha1.ReasonDuplicateDeviceID {
			typ = "Warning"
		}
		r.Recorder.Eventf(t, nil, typ, c.Reason, c.Type, "%s", c.Message)
	}
}

// finalize releases the twin. Only the twin that holds its device id
// touches the device: it clears the retained desired document and has the
// broker refuse (and disconnect) the device, and only then releases the id,
// which wakes the twins that want it. A twin being deleted may still take
// a free id, so that no other twin is served while it cleans up.
func (r *DeviceTwinReconciler) finalize(ctx context.Context, t *v1alpha1.DeviceTwin) error {
	key := types.NamespacedName{Namespace: t.Namespace, Name: t.Name}
	if !controllerutil.ContainsFinalizer(t, Finalizer) {
		r.Bridge.Forget(key)
		return nil
	}
	// The cache can still show the finalizer of a twin already released
	// (the claim that round released wakes it at once): act on the live
	// object only.
	live := &v1alpha1.DeviceTwin{}
	if err := r.Claims.APIReader.Get(ctx, key, live); client.IgnoreNotFound(err) != nil {
		return err
	} else if err != nil || live.UID != t.UID || !controllerutil.ContainsFinalizer(live, Finalizer) {
		r.Bridge.Forget(key)
		return nil
	}
	t = live
	var held *deviceid.HeldError
	switch err := r.Claims.Claim(ctx, t); {
	case errors.As(err, &held):
		// Another twin's device: leave it alone.
	case err != nil:
		return fmt.Errorf("claiming the device id to release it: %w", err)
	default:
		if err := r.Bridge.ClearRetained(ctx, t.EffectiveDeviceID()); err != nil {
			return fmt.Errorf("clearing retained desired document: %w", err)
		}
		if r.Credentials != nil && r.Credentials.Provisioner != nil {
			if err := r.Credentials.Provisioner.Deprovision(ctx, t.EffectiveDeviceID()); err != nil {
				return fmt.Errorf("removing the device from the broker: %w", err)
			}
		}
		if err := r.Claims.Release(ctx, t); err != nil {
			return err
		}
	}
	// A merge patch under the resourceVersion: unlike an apply, it never
	// creates the twin again should it be gone meanwhile.
	base := t.DeepCopy()
	controllerutil.RemoveFinalizer(t, Finalizer)
	if err := r.Patch(ctx, t, client.MergeFromWithOptions(base, client.MergeFromWithOptimisticLock{})); client.IgnoreNotFound(err) != nil {
		return fmt.Errorf("removing finalizer: %w", err)
	}
	r.Bridge.Forget(key)
	return nil
}

// applyLabels makes the labels mirrored from tags and the finalizer
// exactly what the operator owns, through server-side apply, and only when
// something differs.
func (r *DeviceTwinReconciler) applyLabels(ctx context.Context, t *v1alpha1.DeviceTwin, tags twin.Doc, tagsErr error) error {
	if tagsErr != nil {
		tags = twin.Doc{}
	}
	want := twin.MirrorLabels(tags)
	owned := ownedLabels(t, LabelManager)
	need := !controllerutil.ContainsFinalizer(t, Finalizer)
	for k, v := range want {
		if cur, ok := t.Labels[k]; !ok || cur != v || !owned[k] {
			need = true
		}
	}
	for k := range owned {
		if _, ok := want[k]; !ok {
			if _, present := t.Labels[k]; present {
				need = true
			}
		}
	}
	if !need {
		return nil
	}
	u := &unstructured.Unstructured{}
	u.SetAPIVersion(v1alpha1.GroupVersion.String())
	u.SetKind("DeviceTwin")
	u.SetNamespace(t.Namespace)
	u.SetName(t.Name)
	// The uid makes the apply fail (Conflict) rather than create the twin
	// again if it is gone meanwhile.
	u.SetUID(t.UID)
	if len(want) > 0 {
		u.SetLabels(want)
	}
	u.SetFinalizers([]string{Finalizer})
	err := r.Apply(ctx, client.ApplyConfigurationFromUnstructured(u), client.FieldOwner(LabelManager), client.ForceOwnership)
	if apierrors.IsNotFound(err) {
		return nil
	}
	return err
}

// ownedLabels returns the label keys a field manager owns, read from managedFields.
func ownedLabels(t *v1alpha1.DeviceTwin, manager string) map[string]bool {
	out := map[string]bool{}
	for _, mf := range t.ManagedFields {
		if mf.Manager != manager || mf.FieldsV1 == nil {
			continue
		}
		var fields struct {
			Metadata struct {
				Labels map[string]json.RawMessage `json:"f:labels"`
			} `json:"f:metadata"`
		}
		if json.Unmarshal(mf.FieldsV1.GetRawBytes(), &fields) != nil {
			continue
		}
		for k := range fields.Metadata.Labels {
			if name, ok := strings.CutPrefix(k, "f:"); ok {
				out[name] = true
			}
		}
	}
	return out
}

// SetupWithManager registers the reconciler, the device id index, the
// bridge's source of woken twins and the watch of claims with mgr.
func (r *DeviceTwinReconciler) SetupWithManager(ctx context.Context, mgr ctrl.Manager) error {
	if r.Claims == nil {
		return errors.New("the DeviceTwin reconciler needs Claims")
	}
	if err := indexTwinsByDeviceID(ctx, mgr.GetCache()); err != nil {
		return err
	}
	workers := r.MaxConcurrentReconciles
	if workers <= 0 {
		workers = 32
	}
	b := ctrl.NewControllerManagedBy(mgr).
		For(&v1alpha1.DeviceTwin{}, builder.WithPredicates(predicate.Or(
			predicate.GenerationChangedPredicate{}, predicate.LabelChangedPredicate{}))).
		WatchesRawSource(r.Bridge.Source()).
		// A claim that goes or changes hands wakes the twins that want
		// its id, so the next holder is served at once.
		Watches(&v1alpha1.DeviceIDClaim{}, r.claimEvents()).
		WithOptions(controller.Options{MaxConcurrentReconciles: workers}).
		Named("devicetwin")
	if r.Credentials != nil {
		// Key Secrets: the twin's own (a key edited or deleted), and those
		// secretRef names. The cache holds only labelled Secrets
		// (KeySecretCacheOptions).
		if err := mgr.GetFieldIndexer().IndexField(ctx, &v1alpha1.DeviceTwin{}, SecretRefIndex, func(o client.Object) []string {
			if ref := secretRef(o.(*v1alpha1.DeviceTwin)); ref != "" {
				return []string{ref}
			}
			return nil
		}); err != nil {
			return err
		}
		b = b.Owns(&corev1.Secret{}, builder.WithPredicates(ownCreatesIgnored)).
			Watches(&corev1.Secret{}, handler.EnqueueRequestsFromMapFunc(r.twinsUsingSecret), builder.WithPredicates(initialListIgnored))
	}
	return b.Complete(QuietOnShutdown(r))
}

// indexTwinsByDeviceID registers deviceid.Index (as deviceid.IndexTwins
// does) with only the cluster-wide key: controller-runtime's IndexField
// also stores a per-namespace key, which nothing asks for (TwinsWanting
// lists across namespaces) and which costs the cache a string and a set per
// twin. The keys are those controller-runtime's cache reader looks up
// (TestDeviceIDIndexClusterWideOnly checks it).
func indexTwinsByDeviceID(ctx context.Context, c cache.Cache) error {
	inf, err := c.GetInformer(ctx, &v1alpha1.DeviceTwin{})
	if err != nil {
		return fmt.Errorf("indexing twins by device id: %w", err)
	}
	return inf.AddIndexers(toolscache.Indexers{"field:" + deviceid.Index: func(o any) ([]string, error) {
		t, ok := o.(*v1alpha1.DeviceTwin)
		if !ok {
			return nil, fmt.Errorf("indexing twins by device id: got a %T", o)
		}
		return []string{"__all_namespaces/" + t.EffectiveDeviceID()}, nil
	}})
}
