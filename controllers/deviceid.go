package controllers

import (
	"context"
	"errors"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/workqueue"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/deviceid"
)

// Claims live in the operator's own namespace (config/rbac names it
// "system"; kustomize and the chart put the release namespace there). The
// operator reads twins everywhere it watches to tell live holders from
// stale claims.
//
// +kubebuilder:rbac:groups=kubetwin.io,resources=deviceidclaims,verbs=get;list;watch;create;update;delete,namespace=system

// claim makes t the holder of its device id if it can, and returns the
// *deviceid.HeldError naming the holder when another live twin holds it.
// A twin that already holds its id, as the cache shows, costs nothing
// more; anything else is decided on live data.
func (r *DeviceTwinReconciler) claim(ctx context.Context, t *v1alpha1.DeviceTwin) (*deviceid.HeldError, error) {
	cl := scratchClaims.Get().(*v1alpha1.DeviceIDClaim)
	key := types.NamespacedName{Namespace: r.Claims.Namespace, Name: deviceid.ClaimName(t.EffectiveDeviceID())}
	err := r.Get(ctx, key, cl, client.UnsafeDisableDeepCopy)
	heldByT := err == nil && deviceid.HeldBy(cl, t)
	putScratchClaim(cl)
	if heldByT {
		return nil, nil
	}
	var held *deviceid.HeldError
	switch err := r.Claims.Claim(ctx, t); {
	case errors.As(err, &held):
		return held, nil
	case err != nil:
		return nil, err
	}
	return nil, nil
}

// claimEvents is the DeviceTwin controller's handler of claim events: it
// wakes the twins that want the claim's device id, so that the next holder
// is served at once. A created or updated claim does not wake the twin it
// names: that twin made it (or takes it when its own creation wakes it),
// so a fleet's claims cost no second reconcile of every twin at start-up.
// A deleted claim wakes its holder too, which claims the id again.
func (r *DeviceTwinReconciler) claimEvents() handler.EventHandler {
	type queue = workqueue.TypedRateLimitingInterface[reconcile.Request]
	return handler.Funcs{
		CreateFunc: func(ctx context.Context, e event.CreateEvent, q queue) {
			// A start-up's claims: every twin is queued by its own listing.
			if !e.IsInInitialList {
				r.wakeWanting(ctx, e.Object, false, q)
			}
		},
		UpdateFunc: func(ctx context.Context, e event.UpdateEvent, q queue) { r.wakeWanting(ctx, e.ObjectNew, false, q) },
		DeleteFunc: func(ctx context.Context, e event.DeleteEvent, q queue) { r.wakeWanting(ctx, e.Object, true, q) },
		GenericFunc: func(ctx context.Context, e event.GenericEvent, q queue) {
			r.wakeWanting(ctx, e.Object, true, q)
		},
	}
}

// wakeWanting enqueues the twins with the device id of claim o, the twin
// the claim names only if holderToo.
func (r *DeviceTwinReconciler) wakeWanting(ctx context.Context, o client.Object, holderToo bool, q workqueue.TypedRateLimitingInterface[reconcile.Request]) {
	cl, ok := o.(*v1alpha1.DeviceIDClaim)
	if !ok {
		return
	}
	keys, err := deviceid.TwinsWanting(ctx, r.Client, cl.Spec.DeviceID)
	if err != nil {
		ctrl.LoggerFrom(ctx).Error(err, "listing the twins that want a device id", "deviceId", cl.Spec.DeviceID)
		return
	}
	for _, k := range keys {
		if !holderToo && r.names(ctx, cl, k) {
			continue
		}
		q.Add(reconcile.Request{NamespacedName: k})
	}
}

// names reports whether claim cl names the twin at key, down to its uid
// (a twin created again under the same name is another twin), as the
// cache shows it.
func (r *DeviceTwinReconciler) names(ctx context.Context, cl *v1alpha1.DeviceIDClaim, key types.NamespacedName) bool {
	h := cl.Spec.Twin
	if h.Namespace != key.Namespace || h.Name != key.Name {
		return false
	}
	return cachedTwinIs(ctx, r.Client, key, h.UID)
}

// Scratch objects for reads of the cache without a copy whose fields are
// only looked at, not kept: a restart reconciles every twin and claim,
// and each such read would allocate the struct. Put them back zeroed
// (they point into the cache's objects).
var (
	scratchTwins  = sync.Pool{New: func() any { return new(v1alpha1.DeviceTwin) }}
	scratchClaims = sync.Pool{New: func() any { return new(v1alpha1.DeviceIDClaim) }}
)

func putScratchClaim(cl *v1alpha1.DeviceIDClaim) {
	*cl = v1alpha1.DeviceIDClaim{}
	scratchClaims.Put(cl)
}

// cachedTwinIs reports whether the cache holds the twin at key with uid.
func cachedTwinIs(ctx context.Context, c client.Reader, key types.NamespacedName, uid types.UID) bool {
	t := scratchTwins.Get().(*v1alpha1.DeviceTwin)
	is := c.Get(ctx, key, t, client.UnsafeDisableDeepCopy) == nil && t.UID == uid
	*t = v1alpha1.DeviceTwin{}
	scratchTwins.Put(t)
	return is
}

// DeviceIDClaimReconciler removes stale claims: those whose twin does not
// exist (never stored, or deleted without its finalizer) once they are
// older than deviceid.StaleAfter.
type DeviceIDClaimReconciler struct {
	client.Client
	Claims *deviceid.Claims
}

var _ reconcile.Reconciler = (*DeviceIDClaimReconciler)(nil)

// Reconcile checks one claim.
func (r *DeviceIDClaimReconciler) Reconcile(ctx context.Context, req ctrl.Request) (ctrl.Result, error) {
	// The cached claim itself, not a copy (a restart reconciles every
	// claim): only Collect, which gets a copy, may write to it.
	cl := scratchClaims.Get().(*v1alpha1.DeviceIDClaim)
	defer putScratchClaim(cl)
	if err := r.Get(ctx, req.NamespacedName, cl, client.UnsafeDisableDeepCopy); err != nil {
		return ctrl.Result{}, client.IgnoreNotFound(err)
	}
	// The usual case, a holder the cache holds, needs no API call.
	h := cl.Spec.Twin
	if cachedTwinIs(ctx, r.Client, types.NamespacedName{Namespace: h.Namespace, Name: h.Name}, h.UID) {
		return ctrl.Result{}, nil
	}
	wait, err := r.Claims.Collect(ctx, cl.DeepCopy())
	switch {
	case apierrors.IsConflict(err):
		return ctrl.Result{RequeueAfter: time.Second}, nil // changed meanwhile; look again
	case err != nil:
		return ctrl.Result{}, err
	case wait > 0:
		return ctrl.Result{RequeueAfter: wait}, nil
	}
	return ctrl.Result{}, nil
}

// SetupWithManager registers the reconciler of the claims in
// r.Claims.Namespace; a twin deleted without releasing its claim wakes it.
func (r *DeviceIDClaimReconciler) SetupWithManager(mgr ctrl.Manager) error {
	ns := r.Claims.Namespace
	inNS := predicate.NewPredicateFuncs(func(o client.Object) bool { return o.GetNamespace() == ns })
	onDelete := predicate.Funcs{
		CreateFunc:  func(event.CreateEvent) bool { return false },
		UpdateFunc:  func(event.UpdateEvent) bool { return false },
		GenericFunc: func(event.GenericEvent) bool { return false },
	}
	return ctrl.NewControllerManagedBy(mgr).
		For(&v1alpha1.DeviceIDClaim{}, builder.WithPredicates(inNS)).
		Watches(&v1alpha1.DeviceTwin{}, handler.EnqueueRequestsFromMapFunc(func(_ context.Context, o client.Object) []reconcile.Request {
			t := o.(*v1alpha1.DeviceTwin)
			return []reconcile.Request{{NamespacedName: types.NamespacedName{Namespace: ns, Name: deviceid.ClaimName(t.EffectiveDeviceID())}}}
		}), builder.WithPredicates(onDelete)).
		Named("deviceidclaim").
		Complete(QuietOnShutdown(r))
}
