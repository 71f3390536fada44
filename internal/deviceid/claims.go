package deviceid

import (
	"context"
	"errors"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// StaleAfter is how long a claim whose twin does not exist is kept: the
// admission webhook claims before the API server stores the twin, so for
// a moment the holder legitimately does not exist yet; a create refused
// after admission (or never stored) leaves its claim behind.
const StaleAfter = time.Minute

// HeldError says that another twin holds the device id.
type HeldError struct {
	DeviceID string
	// Holder is the twin that holds the id.
	Holder v1alpha1.TwinReference
	// Deleting is true when the holder is being deleted: the id is free
	// once it is gone.
	Deleting bool
}

func (e *HeldError) Error() string {
	msg := fmt.Sprintf("device id %q is already held by DeviceTwin %s/%s", e.DeviceID, e.Holder.Namespace, e.Holder.Name)
	if e.Deleting {
		msg += ", which is being deleted: retry once it is gone"
	}
	return msg
}

// Claims takes and releases the claims of device ids.
type Claims struct {
	// Client writes claims.
	Client client.Client
	// APIReader reads claims and twins from the API server: who holds an
	// id is decided on live data only.
	APIReader client.Reader
	// Namespace is where the claims are (--claims-namespace).
	Namespace string
	// Now is the clock (tests may replace it); time.Now if nil.
	Now func() time.Time
}

func (c *Claims) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

func (c *Claims) key(deviceID string) types.NamespacedName {
	return types.NamespacedName{Namespace: c.Namespace, Name: ClaimName(deviceID)}
}

// newClaim is the claim of t's device id held by t.
func (c *Claims) newClaim(t *v1alpha1.DeviceTwin) *v1alpha1.DeviceIDClaim {
	cl := &v1alpha1.DeviceIDClaim{}
	cl.Namespace, cl.Name = c.Namespace, ClaimName(t.EffectiveDeviceID())
	cl.Labels = map[string]string{"app.kubernetes.io/managed-by": "kubetwin"}
	c.hold(cl, t)
	return cl
}

func (c *Claims) hold(cl *v1alpha1.DeviceIDClaim, t *v1alpha1.DeviceTwin) {
	cl.Spec = v1alpha1.DeviceIDClaimSpec{
		DeviceID:  t.EffectiveDeviceID(),
		Twin:      refOf(t),
		Holder:    t.Namespace + "/" + t.Name,
		ClaimedAt: metav1.NewTime(c.now()),
	}
}

// Claim makes t the holder of its device id, or returns a *HeldError
// naming the live twin that holds it. t must have its uid (the API server
// sets it before validating admission runs). It is race-free: of
// concurrent claims only one create (or, for a stale claim, one
// resourceVersion-preconditioned update) succeeds.
func (c *Claims) Claim(ctx context.Context, t *v1alpha1.DeviceTwin) error {
	if t.UID == "" {
		return errors.New("a DeviceTwin without uid cannot hold a device id")
	}
	for range 5 {
		err := c.Client.Create(ctx, c.newClaim(t))
		if err == nil || !apierrors.IsAlreadyExists(err) {
			return err
		}
		cur := &v1alpha1.DeviceIDClaim{}
		err = c.APIReader.Get(ctx, c.key(t.EffectiveDeviceID()), cur)
		if apierrors.IsNotFound(err) {
			continue // released meanwhile
		}
		if err != nil {
			return fmt.Errorf("reading the claim of device id %q: %w", t.EffectiveDeviceID(), err)
		}
		if HeldBy(cur, t) {
			return nil
		}
		if held := c.holder(ctx, cur, t); held != nil {
			return held
		}
		// Stale: take it over, unless someone else changed it first.
		c.hold(cur, t)
		err = c.Client.Update(ctx, cur)
		if err == nil {
			return nil
		}
		if !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) {
			return fmt.Errorf("taking over the stale claim of device id %q: %w", t.EffectiveDeviceID(), err)
		}
	}
	return fmt.Errorf("the claim of device id %q keeps changing; retrying", t.EffectiveDeviceID())
}

// Check returns the *HeldError Claim would return for t, without writing
// anything (dry-run admission).
func (c *Claims) Check(ctx context.Context, t *v1alpha1.DeviceTwin) error {
	cur := &v1alpha1.DeviceIDClaim{}
	err := c.APIReader.Get(ctx, c.key(t.EffectiveDeviceID()), cur)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading the claim of device id %q: %w", t.EffectiveDeviceID(), err)
	}
	if HeldBy(cur, t) {
		return nil
	}
	if held := c.holder(ctx, cur, t); held != nil {
		return held
	}
	return nil
}

// holder returns the *HeldError of claim cl for twin t, or nil when the
// claim is stale and t may take it over: its twin does not exist (or is
// another object by now), and either it is t's own namespace/name (t is
// that twin created again) or the claim is older than StaleAfter. An
// error reading the holder counts as held: nothing is taken on doubt.
func (c *Claims) holder(ctx context.Context, cl *v1alpha1.DeviceIDClaim, t *v1alpha1.DeviceTwin) error {
	held := &HeldError{DeviceID: cl.Spec.DeviceID, Holder: cl.Spec.Twin}
	alive, deleting, err := c.alive(ctx, cl)
	switch {
	case err != nil:
		return fmt.Errorf("%w (checking that it still exists: %v)", held, err)
	case alive:
		held.Deleting = deleting
		return held
	case cl.Spec.Twin.Namespace == t.Namespace && cl.Spec.Twin.Name == t.Name:
		return nil
	case c.now().Sub(cl.Spec.ClaimedAt.Time) < StaleAfter:
		return held
	}
	return nil
}

// alive reports whether the twin a claim names exists (same uid), read
// from the API server, and whether it is being deleted.
func (c *Claims) alive(ctx context.Context, cl *v1alpha1.DeviceIDClaim) (alive, deleting bool, err error) {
	h := cl.Spec.Twin
	t := &v1alpha1.DeviceTwin{}
	err = c.APIReader.Get(ctx, types.NamespacedName{Namespace: h.Namespace, Name: h.Name}, t)
	if apierrors.IsNotFound(err) {
		return false, false, nil
	}
	if err != nil {
		return false, false, err
	}
	return t.UID == h.UID, !t.DeletionTimestamp.IsZero(), nil
}

// Release deletes the claim of t's device id if t holds it; the
// preconditions make sure a claim taken over meanwhile is left alone.
func (c *Claims) Release(ctx context.Context, t *v1alpha1.DeviceTwin) error {
	cur := &v1alpha1.DeviceIDClaim{}
	err := c.APIReader.Get(ctx, c.key(t.EffectiveDeviceID()), cur)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("reading the claim of device id %q: %w", t.EffectiveDeviceID(), err)
	}
	if !HeldBy(cur, t) {
		return nil
	}
	return c.deleteExactly(ctx, cur)
}

func (c *Claims) deleteExactly(ctx context.Context, cl *v1alpha1.DeviceIDClaim) error {
	err := c.Client.Delete(ctx, cl, client.Preconditions{UID: &cl.UID, ResourceVersion: &cl.ResourceVersion})
	if err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("releasing the claim of device id %q: %w", cl.Spec.DeviceID, err)
	}
	return nil
}

// Collect deletes claim cl if it is stale: its twin does not exist and it
// is older than StaleAfter. Otherwise it returns how long until it could
// be stale (0 when its twin exists). A claim changed meanwhile gives a
// Conflict error: read it again.
func (c *Claims) Collect(ctx context.Context, cl *v1alpha1.DeviceIDClaim) (time.Duration, error) {
	alive, _, err := c.alive(ctx, cl)
	if err != nil || alive {
		return 0, err
	}
	if wait := StaleAfter - c.now().Sub(cl.Spec.ClaimedAt.Time); wait > 0 {
		return wait, nil
	}
	err = c.Client.Delete(ctx, cl, client.Preconditions{UID: &cl.UID, ResourceVersion: &cl.ResourceVersion})
	if apierrors.IsNotFound(err) {
		return 0, nil
	}
	return 0, err
}
