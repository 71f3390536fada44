package main

import (
	"context"
	"crypto/rand"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/dynsec"
)

// Where the installation's secret for the dynamic-security fingerprints
// is kept (in the claims namespace, next to the DeviceIDClaims).
const (
	dynsecKeySecret = "kubetwin-dynsec-fingerprint"
	dynsecKeyField  = "key"
)

// dynsecFingerprintKey returns the key of Secret ns/kubetwin-dynsec-fingerprint,
// creating the Secret with a random key the first time. It is read once
// per start, uncached (the manager caches only device key Secrets).
func dynsecFingerprintKey(mgr ctrl.Manager, ns string) func(context.Context) ([]byte, error) {
	return func(ctx context.Context) ([]byte, error) {
		return loadDynsecKey(ctx, mgr.GetAPIReader(), mgr.GetClient(), ns)
	}
}

// loadDynsecKey reads (or makes) the key; bad content is refused, not
// replaced: a new key would provision every device again.
func loadDynsecKey(ctx context.Context, r client.Reader, w client.Writer, ns string) ([]byte, error) {
	name := types.NamespacedName{Namespace: ns, Name: dynsecKeySecret}
	s := &corev1.Secret{}
	err := r.Get(ctx, name, s)
	if apierrors.IsNotFound(err) {
		key := make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			return nil, err
		}
		s = &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: dynsecKeySecret,
				Labels: map[string]string{"app.kubernetes.io/managed-by": "kubetwin"}},
			Data: map[string][]byte{dynsecKeyField: key},
		}
		err = w.Create(ctx, s)
		if err == nil {
			return key, nil
		}
		if apierrors.IsAlreadyExists(err) { // another replica was first
			err = r.Get(ctx, name, s)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("reading Secret %s: %w", name, err)
	}
	key := s.Data[dynsecKeyField]
	if len(key) < dynsec.MinFingerprintKeyBytes {
		return nil, fmt.Errorf("the Secret %s: %q is %d bytes long, want at least %d (delete the Secret to have a new one made)",
			name, dynsecKeyField, len(key), dynsec.MinFingerprintKeyBytes)
	}
	return key, nil
}

// dynsecDevices lists the device ids of the twins in the manager's cache,
// once it has synced.
func dynsecDevices(mgr ctrl.Manager) func(context.Context) (map[string]bool, error) {
	return func(ctx context.Context) (map[string]bool, error) {
		if !mgr.GetCache().WaitForCacheSync(ctx) {
			return nil, fmt.Errorf("the cache of DeviceTwins did not sync: %w", ctx.Err())
		}
		var twins v1alpha1.DeviceTwinList
		// Read-only: no copy of every twin.
		if err := mgr.GetCache().List(ctx, &twins, client.UnsafeDisableDeepCopy); err != nil {
			return nil, err
		}
		ids := make(map[string]bool, len(twins.Items))
		for i := range twins.Items {
			ids[twins.Items[i].EffectiveDeviceID()] = true
		}
		return ids, nil
	}
}
