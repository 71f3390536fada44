package twinscan

import (
	"cmp"
	"context"
	"fmt"
	"strings"
	"sync"

	"github.com/google/btree"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/cache"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
)

// Key is a twin's position in a query's result: its document's deviceId
// (hubtwin.DeviceID), then its namespace and name.
type Key struct {
	ID, Namespace, Name string
}

// Compare orders keys by device id, namespace and name.
func (k Key) Compare(o Key) int {
	return cmp.Or(strings.Compare(k.ID, o.ID), strings.Compare(k.Namespace, o.Namespace), strings.Compare(k.Name, o.Name))
}

// KeyOf is t's position in a query's result.
func KeyOf(t *v1alpha1.DeviceTwin) Key {
	return Key{ID: hubtwin.DeviceID(t), Namespace: t.Namespace, Name: t.Name}
}

// An Entry is a twin in an Order, with the key it is ordered by.
type Entry struct {
	Key  Key
	Twin *v1alpha1.DeviceTwin
}

// Order keeps the twins of one namespace (or of all) sorted by Key, so
// that a page of a query's result in that order is read from where the
// previous page ended instead of by a pass over every twin. It holds the
// cache's own objects (only read), each ordered by its own Key, and ~20
// bytes per twin of its own. It is safe for concurrent use.
type Order struct {
	namespace string // "" for all
	mu        sync.RWMutex
	tree      *btree.BTreeG[*v1alpha1.DeviceTwin]
}

// NewOrder returns an empty Order of the twins of namespace ("" for all).
func NewOrder(namespace string) *Order {
	return &Order{namespace: namespace, tree: btree.NewG(32, func(a, b *v1alpha1.DeviceTwin) bool {
		return KeyOf(a).Compare(KeyOf(b)) < 0
	})}
}

// Set puts t in its place, replacing old (the object it replaces, nil for
// a new twin), whose key may differ. Twins of other namespaces are
// ignored.
func (o *Order) Set(old, t *v1alpha1.DeviceTwin) {
	if o.namespace != "" && t.Namespace != o.namespace {
		return
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if old != nil && KeyOf(old) != KeyOf(t) {
		o.tree.Delete(old)
	}
	o.tree.ReplaceOrInsert(t)
}

// Delete removes t (as last set).
func (o *Order) Delete(t *v1alpha1.DeviceTwin) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.tree.Delete(t)
}

// Len is the number of twins in the Order.
func (o *Order) Len() int {
	o.mu.RLock()
	defer o.mu.RUnlock()
	return o.tree.Len()
}

// After appends to dst the next n entries after key (from the first when
// after is nil), in order, and returns it. The lock is held only while
// they are copied out: a reader walks a large Order a batch at a time.
func (o *Order) After(after *Key, n int, dst []Entry) []Entry {
	if n <= 0 {
		return dst
	}
	o.mu.RLock()
	defer o.mu.RUnlock()
	take := func(t *v1alpha1.DeviceTwin) bool {
		k := KeyOf(t)
		if after != nil && k.Compare(*after) <= 0 {
			return true // the pivot itself
		}
		dst = append(dst, Entry{Key: k, Twin: t})
		n--
		return n > 0
	}
	if after == nil || after.ID == "" {
		// (No twin's device id is empty: such a key is before them all,
		// and no pivot twin can stand for it.)
		o.tree.Ascend(take)
		return dst
	}
	pivot := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: after.Namespace, Name: after.Name}}
	pivot.Status.DeviceID = after.ID
	o.tree.AscendGreaterOrEqual(pivot, take)
	return dst
}

// CacheOrder returns a function that gives the Order of the twins of
// namespace ("" for all) kept by the DeviceTwin informer of c. The first
// call builds it (the informer hands its handler every cached twin) and
// returns once it holds every twin the informer does; later calls return
// it. A build that fails (ctx done first) is tried again at the next call.
// The informer's handler runs after its store is updated, so a twin is in
// the Order a moment after it is in the cache.
func CacheOrder(c cache.Cache, namespace string) func(context.Context) (*Order, error) {
	var mu sync.Mutex
	var built *Order
	return func(ctx context.Context) (*Order, error) {
		mu.Lock()
		defer mu.Unlock()
		if built != nil {
			return built, nil
		}
		inf, err := c.GetInformer(ctx, &v1alpha1.DeviceTwin{})
		if err != nil {
			return nil, err
		}
		o := NewOrder(namespace)
		reg, err := inf.AddEventHandler(toolscache.ResourceEventHandlerFuncs{
			AddFunc: func(obj any) {
				if t, ok := obj.(*v1alpha1.DeviceTwin); ok {
					o.Set(nil, t)
				}
			},
			UpdateFunc: func(oldObj, newObj any) {
				old, _ := oldObj.(*v1alpha1.DeviceTwin)
				if t, ok := newObj.(*v1alpha1.DeviceTwin); ok {
					o.Set(old, t)
				}
			},
			DeleteFunc: func(obj any) {
				if d, ok := obj.(toolscache.DeletedFinalStateUnknown); ok {
					obj = d.Obj
				}
				if t, ok := obj.(*v1alpha1.DeviceTwin); ok {
					o.Delete(t)
				}
			},
		})
		if err != nil {
			return nil, fmt.Errorf("ordering the cached DeviceTwins: %w", err)
		}
		if !toolscache.WaitForCacheSync(ctx.Done(), reg.HasSynced) {
			_ = inf.RemoveEventHandler(reg)
			return nil, fmt.Errorf("ordering the cached DeviceTwins: %w", ctx.Err())
		}
		built = o
		return o, nil
	}
}
