package bridge

import (
	"context"
	"sync"

	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/workqueue"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"
)

// wakeQueue hands twins to reconcile to the controller's work queue, which
// is unbounded and holds a key at most once, so waking never blocks the
// bus however many twins wait. Twins woken before the controller starts
// are kept, once each, until it does.
type wakeQueue struct {
	mu    sync.Mutex
	queue workqueue.TypedRateLimitingInterface[reconcile.Request]
	early map[types.NamespacedName]struct{}
}

func (w *wakeQueue) add(key types.NamespacedName) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.queue != nil {
		w.queue.Add(reconcile.Request{NamespacedName: key})
		return
	}
	if w.early == nil {
		w.early = map[types.NamespacedName]struct{}{}
	}
	w.early[key] = struct{}{}
}

func (w *wakeQueue) start(_ context.Context, q workqueue.TypedRateLimitingInterface[reconcile.Request]) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.queue = q
	for key := range w.early {
		q.Add(reconcile.Request{NamespacedName: key})
	}
	w.early = nil
	return nil
}

// Source is the controller-runtime source of twins whose working state
// changed; the DeviceTwin controller watches it (WatchesRawSource).
// Starting it also starts dropping the state of idle twins: the state lives
// where the controller runs (the leader), and only as long.
func (b *Bridge) Source() source.Source {
	return source.Func(func(ctx context.Context, q workqueue.TypedRateLimitingInterface[reconcile.Request]) error {
		go b.dropIdleEvery(ctx)
		return b.wakes.start(ctx, q)
	})
}
