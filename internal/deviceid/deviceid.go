// Package deviceid is the one home of device-id ownership: a device id is
// unique per hub, held by one DeviceTwin through a DeviceIDClaim in the
// operator's namespace. It names claims, finds the twin that holds an id
// (Resolver, used for every device message, broker login and service API
// call), takes and releases claims (Claims, used by the admission webhook
// and the reconciler), and indexes twins by device id to find those that
// want an id once it is free.
package deviceid

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"

	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// ErrNotFound means no DeviceTwin holds the device id.
var ErrNotFound = errors.New("no DeviceTwin has this device id")

// Index is the field index of DeviceTwins by effective device id
// (IndexTwins registers it).
const Index = "kubetwin.deviceId"

// ClaimName is the name of the DeviceIDClaim of a device id: "id-" and the
// first 40 hex digits of its SHA-256. Device ids may hold characters no
// object name may, so the id itself cannot be the name.
func ClaimName(deviceID string) string {
	sum := sha256.Sum256([]byte(deviceID))
	return "id-" + hex.EncodeToString(sum[:])[:40]
}

// IndexTwins registers Index with the manager's field indexer.
func IndexTwins(ctx context.Context, fi client.FieldIndexer) error {
	return fi.IndexField(ctx, &v1alpha1.DeviceTwin{}, Index, func(o client.Object) []string {
		return []string{o.(*v1alpha1.DeviceTwin).EffectiveDeviceID()}
	})
}

// TwinsWanting returns the twins in r (the manager's cache, with Index)
// whose device id is deviceID, holder or not, deleted or not.
func TwinsWanting(ctx context.Context, r client.Reader, deviceID string) ([]types.NamespacedName, error) {
	var list v1alpha1.DeviceTwinList
	if err := r.List(ctx, &list, client.MatchingFields{Index: deviceID}, client.UnsafeDisableDeepCopy); err != nil {
		return nil, err
	}
	out := make([]types.NamespacedName, 0, len(list.Items))
	for i := range list.Items {
		out = append(out, types.NamespacedName{Namespace: list.Items[i].Namespace, Name: list.Items[i].Name})
	}
	return out, nil
}

// refOf is the reference a claim held by t carries.
func refOf(t *v1alpha1.DeviceTwin) v1alpha1.TwinReference {
	return v1alpha1.TwinReference{Namespace: t.Namespace, Name: t.Name, UID: t.UID}
}

// HeldBy reports whether claim c names twin t (down to its uid).
func HeldBy(c *v1alpha1.DeviceIDClaim, t *v1alpha1.DeviceTwin) bool {
	return c.Spec.Twin == refOf(t) && c.Spec.DeviceID == t.EffectiveDeviceID()
}
