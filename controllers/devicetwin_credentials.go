package controllers

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/deviceauth"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// The operator keeps a key Secret in every twin's namespace and reads the
// Secrets that spec.authentication.secretRef names. RBAC cannot limit
// Secrets by label, so these rights cover every Secret of the namespaces
// the operator watches; the manager's cache lists and watches only those
// labelled kubetwin.io/device-keys=true (see KeySecretCacheOptions).
//
// +kubebuilder:rbac:groups="",resources=secrets,verbs=get;list;watch;create;update

// SecretRefIndex is the field index of twins by the name of the Secret
// their spec.authentication.secretRef names.
const SecretRefIndex = "kubetwin.secretRef"

// Credentials configures device authentication in the reconciler: keys
// for every twin, and a broker that enforces them.
type Credentials struct {
	// HubHostname is the HostName of the devices' connection strings.
	HubHostname string
	// Provisioner tells the broker about each device's keys and status;
	// nil when the broker looks them up itself or is not managed.
	Provisioner deviceauth.Provisioner
}

// KeySecretCacheOptions limits the manager's cache of Secrets to those
// labelled kubetwin.io/device-keys=true, so that the operator does not
// keep every Secret of the cluster in memory. Put it in
// cache.Options.ByObject.
func KeySecretCacheOptions() map[client.Object]cache.ByObject {
	sel := labels.SelectorFromSet(labels.Set{v1alpha1.DeviceKeysLabel: "true"})
	return map[client.Object]cache.ByObject{&corev1.Secret{}: {Label: sel}}
}

// credStatus is the CredentialsReady condition to report.
type credStatus struct {
	ok      bool
	reason  string
	message string
}

// deviceKeys are a device's keys as the Secrets hold them (base64 text).
type deviceKeys struct{ primary, secondary string }

// reconcileCredentials keeps the twin's key Secret and tells the broker
// about the device's keys and status. A non-nil error with a nil status is
// an API failure to retry before anything else; with a status it is a
// provisioning failure, reported in the condition and retried.
func (r *DeviceTwinReconciler) reconcileCredentials(ctx context.Context, t *v1alpha1.DeviceTwin) (*credStatus, error) {
	keys, st, err := r.ensureKeySecret(ctx, t)
	if err != nil {
		return nil, err
	}
	if p := r.Credentials.Provisioner; p != nil {
		d := deviceauth.Device{ID: t.EffectiveDeviceID(), Disabled: t.Spec.Disabled(), PrimaryKey: keys.primary, SecondaryKey: keys.secondary}
		if err := p.Provision(ctx, d); err != nil {
			return &credStatus{reason: v1alpha1.ReasonProvisioningFailed,
				message: "the broker could not be told about the device's keys and status; retrying: " + err.Error()}, err
		}
	}
	return st, nil
}

// ensureKeySecret makes the twin's key Secret hold its keys (generated,
// or copied from spec.authentication.secretRef) and its connection string.
// It returns the keys in effect and the condition to report.
func (r *DeviceTwinReconciler) ensureKeySecret(ctx context.Context, t *v1alpha1.DeviceTwin) (deviceKeys, *credStatus, error) {
	name := v1alpha1.KeySecretName(t.Name)
	var src, banned *deviceKeys
	var refused *credStatus
	if ref := secretRef(t); ref != "" {
		s := &corev1.Secret{}
		err := r.Get(ctx, types.NamespacedName{Namespace: t.Namespace, Name: ref}, s)
		switch {
		case apierrors.IsNotFound(err):
			// Keep the keys last copied: a Secret that goes missing must not
			// lock the device out, nor let in keys nobody gave.
			cur, _ := r.currentKeys(ctx, t)
			return cur, &credStatus{reason: v1alpha1.ReasonSecretNotFound, message: fmt.Sprintf(
				"Secret %s (spec.authentication.secretRef) not found; it must carry the label %s=true for the operator to see it",
				ref, v1alpha1.DeviceKeysLabel)}, nil
		case err != nil:
			return deviceKeys{}, nil, fmt.Errorf("reading Secret %s: %w", ref, err)
		}
		src = &deviceKeys{primary: string(s.Data[v1alpha1.PrimaryKeyKey]), secondary: string(s.Data[v1alpha1.SecondaryKeyKey])}
		if err := deviceauth.CheckSecretRef(s); err != nil {
			// Take nothing from it, and replace any key an older operator
			// copied from it (unless it is the twin's own).
			if ref != name {
				banned = src
			}
			src = nil
			refused = &credStatus{reason: v1alpha1.ReasonSecretRefNotAllowed, message: fmt.Sprintf(
				"spec.authentication.secretRef: %v; the device keeps its own keys in Secret %s", err, name)}
		}
	}

	// The cached Secret is read without a copy (a restart reconciles every
	// twin, and nearly all of them need no write); it is copied only to be
	// written.
	key := types.NamespacedName{Namespace: t.Namespace, Name: name}
	cur := &corev1.Secret{}
	err := r.Get(ctx, key, cur, client.UnsafeDisableDeepCopy)
	exists := err == nil
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		return deviceKeys{}, nil, fmt.Errorf("reading Secret %s: %w", name, err)
	case !metav1.IsControlledBy(cur, t):
		return deviceKeys{}, conflict(name), nil
	}
	keys, err := r.syncKeySecret(ctx, t, key, cur, exists, src, banned)
	if apierrors.IsAlreadyExists(err) {
		// There, but not in the cache: it lacks the label, or it is the
		// one an earlier reconcile created and the cache has not seen yet
		// (the twin woken again before it). Then the live copy stands in
		// for the cached one: no retry, no error.
		live, lerr := r.ownedUncached(ctx, t, key)
		switch {
		case lerr != nil:
			return deviceKeys{}, nil, lerr
		case live == nil:
			return deviceKeys{}, conflict(name), nil
		}
		keys, err = r.syncKeySecret(ctx, t, key, live, true, src, banned)
	}
	if err != nil {
		return deviceKeys{}, nil, err
	}
	if refused != nil {
		return keys, refused, nil
	}
	return keys, keyStatus(keys, name), nil
}

// syncKeySecret makes the key Secret cur (exists false: none yet) hold
// the twin's keys: those of src when set, else its own without those of
// banned, with any missing one generated. It returns the keys.
func (r *DeviceTwinReconciler) syncKeySecret(ctx context.Context, t *v1alpha1.DeviceTwin, key types.NamespacedName,
	cur *corev1.Secret, exists bool, src, banned *deviceKeys) (deviceKeys, error) {
	keys := deviceKeys{primary: string(cur.Data[v1alpha1.PrimaryKeyKey]), secondary: string(cur.Data[v1alpha1.SecondaryKeyKey])}.without(banned)
	if src != nil {
		keys = *src
	} else {
		// Keep what is there (the user may have rotated a key); fill in
		// what is missing.
		keys.primary = cmp.Or(keys.primary, sas.NewKey())
		keys.secondary = cmp.Or(keys.secondary, sas.NewKey())
	}
	data := r.keyData(t, keys, cur.Data[v1alpha1.ConnectionStringKey])
	if exists && keySecretHolds(cur, data) {
		return keys, nil
	}
	return keys, r.writeKeySecret(ctx, t, key, cur, exists, data)
}

// ownedUncached returns t's key Secret as the API server holds it, when
// it is labelled and t's; nil when it is someone else's. An error (the
// read failed, or the Secret is gone) is to retry, not a conflict.
func (r *DeviceTwinReconciler) ownedUncached(ctx context.Context, t *v1alpha1.DeviceTwin, key types.NamespacedName) (*corev1.Secret, error) {
	if r.Claims == nil || r.Claims.APIReader == nil {
		return nil, nil
	}
	live := &corev1.Secret{}
	switch err := r.Claims.APIReader.Get(ctx, key, live); {
	case apierrors.IsNotFound(err):
		// Created by someone and deleted again since: try again.
		return nil, fmt.Errorf("Secret %s was there at its creation and is gone now; retrying", key.Name)
	case err != nil:
		return nil, fmt.Errorf("reading Secret %s: %w", key.Name, err)
	}
	if live.Labels[v1alpha1.DeviceKeysLabel] != "true" || !metav1.IsControlledBy(live, t) {
		return nil, nil
	}
	return live, nil
}

// keySecretHolds reports whether the key Secret s already holds data,
// its labels and a type.
func keySecretHolds(s *corev1.Secret, data map[string][]byte) bool {
	if s.Type == "" || s.Labels[v1alpha1.DeviceKeysLabel] != "true" || s.Labels["app.kubernetes.io/managed-by"] != "kubetwin" ||
		len(s.Data) != len(data) {
		return false
	}
	for k, v := range data {
		if w, ok := s.Data[k]; !ok || !bytes.Equal(v, w) {
			return false
		}
	}
	return true
}

// writeKeySecret creates the key Secret with data, or updates cur (the
// cached Secret, not modified here) to hold it. The update sends no
// managedFields (the cache drops them), which leaves the stored ones as
// they are, and keeps every annotation.
func (r *DeviceTwinReconciler) writeKeySecret(ctx context.Context, t *v1alpha1.DeviceTwin, key types.NamespacedName,
	cur *corev1.Secret, exists bool, data map[string][]byte) error {
	sec := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Namespace: key.Namespace, Name: key.Name}}
	if exists {
		sec = cur.DeepCopy()
	}
	sec.Type = cmp.Or(sec.Type, corev1.SecretTypeOpaque)
	sec.Data = data
	if sec.Labels == nil {
		sec.Labels = map[string]string{}
	}
	sec.Labels[v1alpha1.DeviceKeysLabel] = "true"
	sec.Labels["app.kubernetes.io/managed-by"] = "kubetwin"
	if err := controllerutil.SetControllerReference(t, sec, r.Scheme()); err != nil {
		return fmt.Errorf("writing Secret %s: %w", key.Name, err)
	}
	var err error
	if exists {
		err = r.Update(ctx, sec)
	} else {
		err = r.Create(ctx, sec)
	}
	if err != nil {
		return fmt.Errorf("writing Secret %s: %w", key.Name, err)
	}
	return nil
}

// ownCreatesIgnored is the predicate of the watch of key Secrets by their
// owner: the creation of a Secret the operator made (labelled
// app.kubernetes.io/managed-by=kubetwin) does not wake its twin, since the
// reconcile that created it already reported its keys (at a fleet's first
// start-up that second reconcile was one per twin, and found the cache not
// yet holding its own writes); nor does the cache's first listing, since
// every twin is woken by its own. Other changes, and a deletion, do.
var ownCreatesIgnored = predicate.Funcs{CreateFunc: func(e event.CreateEvent) bool {
	return !e.IsInInitialList && e.Object.GetLabels()["app.kubernetes.io/managed-by"] != "kubetwin"
}}

// initialListIgnored is the predicate of the watch of Secrets by the twins
// whose secretRef names them: the cache's first listing wakes every twin
// through its own.
var initialListIgnored = predicate.Funcs{CreateFunc: func(e event.CreateEvent) bool { return !e.IsInInitialList }}

// keyData is the data of the twin's key Secret with keys: the connection
// string follows a valid primary key, else stays as it was (cs).
func (r *DeviceTwinReconciler) keyData(t *v1alpha1.DeviceTwin, keys deviceKeys, cs []byte) map[string][]byte {
	if _, err := sas.DecodeKey(keys.primary); err == nil {
		cs = []byte(sas.ConnectionString{HostName: r.Credentials.HubHostname, DeviceID: t.EffectiveDeviceID(), SharedAccessKey: keys.primary}.String())
	}
	data := map[string][]byte{v1alpha1.PrimaryKeyKey: []byte(keys.primary)}
	if keys.secondary != "" {
		data[v1alpha1.SecondaryKeyKey] = []byte(keys.secondary)
	}
	if cs != nil {
		data[v1alpha1.ConnectionStringKey] = bytes.Clone(cs) // cs may be the cache's
	}
	return data
}

// without returns k with the keys that are also in b removed.
func (k deviceKeys) without(b *deviceKeys) deviceKeys {
	if b == nil {
		return k
	}
	for _, x := range []*string{&k.primary, &k.secondary} {
		if *x != "" && (*x == b.primary || *x == b.secondary) {
			*x = ""
		}
	}
	return k
}

// currentKeys returns the keys in the twin's key Secret, if it has one.
func (r *DeviceTwinReconciler) currentKeys(ctx context.Context, t *v1alpha1.DeviceTwin) (deviceKeys, error) {
	d, err := keysOf(ctx, r.Client, t)
	return deviceKeys{primary: d.PrimaryKey, secondary: d.SecondaryKey}, err
}

// keyStatus reports invalid keys.
func keyStatus(k deviceKeys, secret string) *credStatus {
	var bad []string
	for _, x := range []struct{ name, key string }{{v1alpha1.PrimaryKeyKey, k.primary}, {v1alpha1.SecondaryKeyKey, k.secondary}} {
		if x.key == "" && x.name == v1alpha1.SecondaryKeyKey {
			continue
		}
		if _, err := sas.DecodeKey(x.key); err != nil {
			bad = append(bad, x.name+": "+err.Error())
		}
	}
	if len(bad) > 0 {
		return &credStatus{reason: v1alpha1.ReasonInvalidKeys, message: "Secret " + secret + ": " + strings.Join(bad, "; ")}
	}
	return &credStatus{ok: true, reason: v1alpha1.ReasonKeysReady, message: "keys and connection string are in Secret " + secret}
}

func conflict(name string) *credStatus {
	return &credStatus{reason: v1alpha1.ReasonSecretConflict, message: fmt.Sprintf(
		"Secret %s exists but is not this twin's (no controller reference to it, or no label %s=true); the operator leaves it alone: delete or rename it",
		name, v1alpha1.DeviceKeysLabel)}
}

func secretRef(t *v1alpha1.DeviceTwin) string {
	if a := t.Spec.Authentication; a != nil && a.SecretRef != nil {
		return a.SecretRef.Name
	}
	return ""
}

// setCredentialsCondition sets CredentialsReady from cs, or removes it when
// the operator does not authenticate devices (cs nil).
func setCredentialsCondition(st *v1alpha1.DeviceTwinStatus, cs *credStatus, gen int64, now metav1.Time) {
	if cs == nil {
		removeCondition(st, v1alpha1.ConditionCredentialsReady)
		return
	}
	status := metav1.ConditionFalse
	if cs.ok {
		status = metav1.ConditionTrue
	}
	setCondition(st, v1alpha1.ConditionCredentialsReady, status, cs.reason, cs.message, gen, now)
}

// DeviceLookup finds devices for the embedded broker's Authenticator
// through r (the manager's cache): the twin that holds the device id, its
// status, and the keys in its key Secret.
func DeviceLookup(r deviceid.Resolver) deviceauth.Lookup {
	return func(ctx context.Context, deviceID string) (deviceauth.Device, error) {
		t, err := r.Resolve(ctx, deviceID)
		if err != nil {
			return deviceauth.Device{}, err
		}
		return keysOf(ctx, r.Reader, t)
	}
}

// keysOf returns the device of twin t with its keys: those of the Secret
// spec.authentication.secretRef names (read directly, so a rotation there
// counts before the operator has copied it), else, or when that Secret is
// gone, those of its key Secret (none when that is missing or not t's).
// A secretRef that deviceauth.CheckSecretRef refuses gives no key, and
// the key Secret's keys that equal its keys do not count either.
func keysOf(ctx context.Context, c client.Reader, t *v1alpha1.DeviceTwin) (deviceauth.Device, error) {
	d := deviceauth.Device{ID: t.EffectiveDeviceID(), Disabled: t.Spec.Disabled()}
	s := &corev1.Secret{}
	var banned *deviceKeys
	if ref := secretRef(t); ref != "" {
		err := c.Get(ctx, types.NamespacedName{Namespace: t.Namespace, Name: ref}, s)
		switch {
		case err == nil && deviceauth.CheckSecretRef(s) != nil:
			if ref != v1alpha1.KeySecretName(t.Name) {
				banned = &deviceKeys{primary: string(s.Data[v1alpha1.PrimaryKeyKey]), secondary: string(s.Data[v1alpha1.SecondaryKeyKey])}
			}
		case err == nil:
			d.PrimaryKey, d.SecondaryKey = string(s.Data[v1alpha1.PrimaryKeyKey]), string(s.Data[v1alpha1.SecondaryKeyKey])
			return d, nil
		case !apierrors.IsNotFound(err):
			return d, err
		}
		s = &corev1.Secret{}
	}
	err := c.Get(ctx, types.NamespacedName{Namespace: t.Namespace, Name: v1alpha1.KeySecretName(t.Name)}, s)
	if apierrors.IsNotFound(err) {
		return d, nil
	}
	if err != nil {
		return d, err
	}
	if !metav1.IsControlledBy(s, t) {
		return d, nil
	}
	k := deviceKeys{primary: string(s.Data[v1alpha1.PrimaryKeyKey]), secondary: string(s.Data[v1alpha1.SecondaryKeyKey])}.without(banned)
	d.PrimaryKey, d.SecondaryKey = k.primary, k.secondary
	return d, nil
}

// twinsUsingSecret maps a Secret to the twins whose
// spec.authentication.secretRef names it.
func (r *DeviceTwinReconciler) twinsUsingSecret(ctx context.Context, o client.Object) []reconcile.Request {
	var list v1alpha1.DeviceTwinList
	if err := r.List(ctx, &list, client.InNamespace(o.GetNamespace()), client.MatchingFields{SecretRefIndex: o.GetName()}); err != nil {
		return nil
	}
	out := make([]reconcile.Request, 0, len(list.Items))
	for _, t := range list.Items {
		out = append(out, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: t.Namespace, Name: t.Name}})
	}
	return out
}
