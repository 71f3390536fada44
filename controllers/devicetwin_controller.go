// Package controllers holds the DeviceTwin reconciler.
package controllers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/bridge"
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
	// DeviceIDIndex is the field index of twins by effective device id.
	DeviceIDIndex = "kubetwin.deviceId"
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
}

var _ reconcile.Reconciler = (*DeviceTwinReconciler)(nil)

// +kubebuilder:rbac:groups=kubetwin.io,resources=devicetwins,verbs=get;list;watch;update;patch
// +kubebuilder:rbac:groups=kubetwin.io,resources=devicetwins/status,verbs=get;update;patch
// +kubebuilder:rbac:groups=kubetwin.io,resources=devicetwins/finalizers,verbs=update
// +kubebuilder:rbac:groups=events.k8s.io,resources=events,verbs=create;patch

// Reconcile brings one twin's status, labels and device in step.
func (r *DeviceTwinReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	log := ctrl.LoggerFrom(ctx)
	t := &v1alpha1.DeviceTwin{}
	if err := r.Get(ctx, req.NamespacedName, t); err != nil {
		if apierrors.IsNotFound(err) {
			r.Bridge.Forget(req.NamespacedName)
		}
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	if !t.DeletionTimestamp.IsZero() {
		return ctrl.Result{}, r.finalize(ctx, t)
	}
	if err := r.applyLabels(ctx, t, true); err != nil {
		return ctrl.Result{}, fmt.Errorf("mirroring tags into labels: %w", err)
	}

	owner, err := r.owner(ctx, t)
	if err != nil {
		return ctrl.Result{}, err
	}
	in := statusInput{twin: t, now: r.now()}
	if owner != nil {
		in.duplicateOf = owner.Namespace + "/" + owner.Name
	}
	var provisionErr error // reported in the status, then retried
	if r.Credentials != nil && owner == nil {
		if in.creds, provisionErr = r.reconcileCredentials(ctx, t); in.creds == nil && provisionErr != nil {
			return ctrl.Result{}, provisionErr
		}
	}
	in.desired, in.invalid = validSpec(t)
	if in.invalid == nil && in.duplicateOf == "" {
		sent, err := r.Bridge.PublishDesired(ctx, t, in.desired)
		if err != nil {
			return ctrl.Result{}, err
		}
		if sent {
			log.V(1).Info("desired change sent to device", "deviceId", t.EffectiveDeviceID())
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

// validSpec decodes spec.desired and checks spec.tags and spec.desired
// against the twin rules, with the same messages as the admission webhook
// (internal/webhook), which refuses such specs up front when installed.
func validSpec(t *v1alpha1.DeviceTwin) (twin.Doc, error) {
	if _, err := twin.ParseSection(twin.Tags, "spec.tags", rawBytes(t.Spec.Tags)); err != nil {
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
	err := r.Status().Patch(ctx, next, client.MergeFrom(base), client.FieldOwner(StatusManager))
	if err != nil {
		bridge.StatusWrites.WithLabelValues("error").Inc()
		return fmt.Errorf("patching status: %w", err)
	}
	bridge.StatusWrites.WithLabelValues("ok").Inc()
	return nil
}

// recordTransitions emits an event for every condition that changed status.
func (r *DeviceTwinReconciler) recordTransitions(t *v1alpha1.DeviceTwin, old, st v1alpha1.DeviceTwinStatus) {
	if r.Recorder == nil {
		return
	}
	for _, c := range st.Conditions {
		switch c.Type {
		case v1alpha1.ConditionReady, v1alpha1.ConditionReconciling, v1alpha1.ConditionStalled:
			continue // they repeat InSync and Connected
		}
		prev := findCondition(old.Conditions, c.Type)
		if prev != nil && prev.Status == c.Status && prev.Reason == c.Reason {
			continue
		}
		typ := "Normal"
		if c.Reason == v1alpha1.ReasonInvalidDesired || c.Reason == v1alpha1.ReasonDuplicateDeviceID {
			typ = "Warning"
		}
		r.Recorder.Eventf(t, nil, typ, c.Reason, c.Type, "%s", c.Message)
	}
}

// owner returns the twin that owns t's device id when that is another
// twin (the oldest claim wins), else nil.
func (r *DeviceTwinReconciler) owner(ctx context.Context, t *v1alpha1.DeviceTwin) (*v1alpha1.DeviceTwin, error) {
	o, err := ResolveDeviceID(ctx, r.Client, t.EffectiveDeviceID())
	if err != nil {
		if errors.Is(err, bridge.ErrNotFound) {
			return nil, nil
		}
		return nil, err
	}
	if o.Namespace == t.Namespace && o.Name == t.Name {
		return nil, nil
	}
	return o, nil
}

// ResolveDeviceID finds the twin that owns a device id: the oldest of the
// twins that claim it. c is the manager's cache; the result is shared with
// it (no deep copy on this per-message path) and must not be modified.
func ResolveDeviceID(ctx context.Context, c client.Reader, deviceID string) (*v1alpha1.DeviceTwin, error) {
	var list v1alpha1.DeviceTwinList
	if err := c.List(ctx, &list, client.MatchingFields{DeviceIDIndex: deviceID}, client.UnsafeDisableDeepCopy); err != nil {
		return nil, err
	}
	var live []*v1alpha1.DeviceTwin
	for i := range list.Items {
		if list.Items[i].DeletionTimestamp.IsZero() {
			live = append(live, &list.Items[i])
		}
	}
	if len(live) == 0 {
		return nil, bridge.ErrNotFound
	}
	sort.Slice(live, func(i, j int) bool {
		a, b := live[i], live[j]
		if !a.CreationTimestamp.Equal(&b.CreationTimestamp) {
			return a.CreationTimestamp.Before(&b.CreationTimestamp)
		}
		return a.Namespace+"/"+a.Name < b.Namespace+"/"+b.Name
	})
	return live[0], nil
}

// finalize clears the device's retained desired document, has the broker
// refuse the device from now on, and releases the twin.
func (r *DeviceTwinReconciler) finalize(ctx context.Context, t *v1alpha1.DeviceTwin) error {
	key := types.NamespacedName{Namespace: t.Namespace, Name: t.Name}
	if !controllerutil.ContainsFinalizer(t, Finalizer) {
		r.Bridge.Forget(key)
		return nil
	}
	if owner, err := r.owner(ctx, t); err == nil && owner == nil {
		if err := r.Bridge.ClearRetained(ctx, t.EffectiveDeviceID()); err != nil {
			return fmt.Errorf("clearing retained desired document: %w", err)
		}
		if r.Credentials != nil && r.Credentials.Provisioner != nil {
			if err := r.Credentials.Provisioner.Deprovision(ctx, t.EffectiveDeviceID()); err != nil {
				return fmt.Errorf("removing the device from the broker: %w", err)
			}
		}
	}
	if err := r.applyLabels(ctx, t, false); err != nil {
		return fmt.Errorf("removing finalizer: %w", err)
	}
	r.Bridge.Forget(key)
	return nil
}

// applyLabels makes the labels mirrored from tags (and, when keep is true,
// the finalizer) exactly what the operator owns, through server-side apply,
// and only when something differs.
func (r *DeviceTwinReconciler) applyLabels(ctx context.Context, t *v1alpha1.DeviceTwin, keep bool) error {
	tags, err := specDoc(t.Spec.Tags)
	if err != nil {
		tags = twin.Doc{}
	}
	want := map[string]string{}
	if keep {
		want = twin.MirrorLabels(tags)
	}
	owned := ownedLabels(t, LabelManager)
	need := keep != controllerutil.ContainsFinalizer(t, Finalizer)
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
	if len(want) > 0 {
		u.SetLabels(want)
	}
	if keep {
		u.SetFinalizers([]string{Finalizer})
	}
	err = r.Apply(ctx, client.ApplyConfigurationFromUnstructured(u), client.FieldOwner(LabelManager), client.ForceOwnership)
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
		if json.Unmarshal(mf.FieldsV1.Raw, &fields) != nil {
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

// SetupWithManager registers the reconciler, the device id index and the
// bridge's source of woken twins with mgr.
func (r *DeviceTwinReconciler) SetupWithManager(ctx context.Context, mgr ctrl.Manager) error {
	if err := mgr.GetFieldIndexer().IndexField(ctx, &v1alpha1.DeviceTwin{}, DeviceIDIndex, func(o client.Object) []string {
		return []string{o.(*v1alpha1.DeviceTwin).EffectiveDeviceID()}
	}); err != nil {
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
		b = b.Owns(&corev1.Secret{}).
			Watches(&corev1.Secret{}, handler.EnqueueRequestsFromMapFunc(r.twinsUsingSecret))
	}
	return b.Complete(r)
}

func findCondition(cs []metav1.Condition, typ string) *metav1.Condition {
	i := slices.IndexFunc(cs, func(c metav1.Condition) bool { return c.Type == typ })
	if i < 0 {
		return nil
	}
	return &cs[i]
}
