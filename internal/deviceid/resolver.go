package deviceid

import (
	"context"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// Resolver finds the twin that holds a device id.
type Resolver struct {
	// Reader is the manager's cache; it must hold the claims of Namespace
	// and the twins. Resolve runs for every device message, so it reads
	// only from memory.
	Reader client.Reader
	// Namespace is where the claims are (--claims-namespace).
	Namespace string
}

// Resolve returns the live twin that holds deviceID, or an error matching
// ErrNotFound when there is none (no claim; its twin gone, replaced or
// being deleted). The twin is shared with the cache (not copied) and must
// not be modified.
func (r Resolver) Resolve(ctx context.Context, deviceID string) (*v1alpha1.DeviceTwin, error) {
	c := &v1alpha1.DeviceIDClaim{}
	err := r.Reader.Get(ctx, types.NamespacedName{Namespace: r.Namespace, Name: ClaimName(deviceID)}, c, client.UnsafeDisableDeepCopy)
	if apierrors.IsNotFound(err) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("reading the claim of device id %q: %w", deviceID, err)
	}
	if c.Spec.DeviceID != deviceID {
		return nil, ErrNotFound // a SHA-256 prefix collision: the claim is another id's
	}
	h := c.Spec.Twin
	t := &v1alpha1.DeviceTwin{}
	err = r.Reader.Get(ctx, types.NamespacedName{Namespace: h.Namespace, Name: h.Name}, t, client.UnsafeDisableDeepCopy)
	if apierrors.IsNotFound(err) {
		return nil, ErrNotFound
	}
	if err != nil {
		return nil, fmt.Errorf("reading DeviceTwin %s/%s, holder of device id %q: %w", h.Namespace, h.Name, deviceID, err)
	}
	if t.UID != h.UID || !t.DeletionTimestamp.IsZero() || t.EffectiveDeviceID() != deviceID {
		return nil, ErrNotFound
	}
	return t, nil
}
