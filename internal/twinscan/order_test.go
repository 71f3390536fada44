package twinscan

import (
	"fmt"
	"math/rand/v2"
	"runtime"
	"slices"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// TestOrder: after random creations, changes of device id (in spec and in
// status, which wins), replacements and deletions, in one namespace and
// another, walking an Order from any point in batches of any size gives
// the twins of its namespace after that point sorted by Key, each the
// object last set.
func TestOrder(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := range 200 {
		o := NewOrder("ns")
		live := map[string]*v1alpha1.DeviceTwin{} // namespace/name → current object
		for range rng.IntN(300) {
			ns := []string{"ns", "ns", "ns", "other"}[rng.IntN(4)]
			name := fmt.Sprintf("t%d", rng.IntN(60))
			old := live[ns+"/"+name]
			if old != nil && rng.IntN(5) == 0 {
				o.Delete(old)
				delete(live, ns+"/"+name)
				continue
			}
			tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
			if old != nil {
				tw = old.DeepCopy()
			}
			// Ids in an order unrelated to names, shared by some twins;
			// sometimes only the status's changes.
			switch rng.IntN(4) {
			case 0:
				tw.Spec.DeviceID = fmt.Sprintf("d%02d", rng.IntN(20))
			case 1:
				tw.Status.DeviceID = fmt.Sprintf("d%02d", rng.IntN(20))
			}
			o.Set(old, tw)
			live[ns+"/"+name] = tw
		}
		var want []Entry
		for _, tw := range live {
			if tw.Namespace == "ns" {
				want = append(want, Entry{Key: KeyOf(tw), Twin: tw})
			}
		}
		slices.SortFunc(want, func(a, b Entry) int { return a.Key.Compare(b.Key) })
		if o.Len() != len(want) {
			t.Fatalf("round %d: Len %d, want %d", round, o.Len(), len(want))
		}
		// Walk from the start, or from a twin's key, or from a key that
		// is no twin's (one without a device id too), in batches.
		start := 0
		var after *Key
		switch rng.IntN(4) {
		case 1:
			if len(want) > 0 {
				i := rng.IntN(len(want))
				after, start = &want[i].Key, i+1
			}
		case 2:
			k := Key{ID: fmt.Sprintf("d%02d~", rng.IntN(20))}
			after = &k
			start, _ = slices.BinarySearchFunc(want, k, func(e Entry, k Key) int { return e.Key.Compare(k) })
		case 3:
			// No device id (a token a client made up): before every twin.
			after = &Key{Namespace: "ns", Name: "zz"}
		}
		batch := 1 + rng.IntN(10)
		var got []Entry
		for {
			next := o.After(after, batch, nil)
			got = append(got, next...)
			if len(next) < batch {
				break
			}
			after = &next[len(next)-1].Key
		}
		if !slices.Equal(got, want[start:]) {
			t.Fatalf("round %d: walked\n%v\nwant\n%v", round, keys(got), keys(want[start:]))
		}
	}
}

func keys(es []Entry) []Key {
	out := make([]Key, len(es))
	for i, e := range es {
		out[i] = e.Key
	}
	return out
}

// BenchmarkOrderHeap: the heap an Order of 100,000 twins holds of its
// own (the twins are the cache's), measured between two GCs.
func BenchmarkOrderHeap(b *testing.B) {
	const n = 100000
	twins := make([]*v1alpha1.DeviceTwin, n)
	for i := range twins {
		twins[i] = &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: "scale", Name: fmt.Sprintf("dev-%06d", i)}}
	}
	var per float64
	for b.Loop() {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		o := NewOrder("scale")
		for _, tw := range twins {
			o.Set(nil, tw)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		per = float64(after.HeapAlloc-before.HeapAlloc) / n
		runtime.KeepAlive(o)
	}
	b.ReportMetric(per, "heap-B/twin")
}
