package controllers_test

import (
	"context"
	"slices"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	"k8s.io/apimachinery/pkg/types"
	toolscache "k8s.io/client-go/tools/cache"
	"sigs.k8s.io/controller-runtime/pkg/cache"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/deviceid"
)

// The device id index keeps one key per cached twin, the cluster-wide one
// TwinsWanting asks for, and the cache's reader finds twins by it across
// namespaces, in a cache of all namespaces and in one of some namespaces.
func TestDeviceIDIndexClusterWideOnly(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ns1, ns2 := newNamespace(t), newNamespace(t)
	createTwin(t, ns1, "a", "IDX-1", "", "")
	createTwin(t, ns2, "b", "IDX-1", "", "")
	createTwin(t, ns2, "c", "IDX-2", "", "")

	for name, opts := range map[string]cache.Options{
		"all namespaces": {Scheme: testScheme},
		"two namespaces": {Scheme: testScheme, DefaultNamespaces: map[string]cache.Config{ns1: {}, ns2: {}}},
	} {
		t.Run(name, func(t *testing.T) {
			g := NewWithT(t)
			c, err := cache.New(restConfig, opts)
			g.Expect(err).NotTo(HaveOccurred())
			g.Expect(controllers.IndexTwinsByDeviceID(ctx, c)).To(Succeed())
			go func() { _ = c.Start(ctx) }()
			sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
			defer scancel()
			g.Expect(c.WaitForCacheSync(sctx)).To(BeTrue())

			got, err := deviceid.TwinsWanting(ctx, c, "IDX-1")
			g.Expect(err).NotTo(HaveOccurred())
			slices.SortFunc(got, func(a, b types.NamespacedName) int { return compareKeys(a, b) })
			want := []types.NamespacedName{{Namespace: ns1, Name: "a"}, {Namespace: ns2, Name: "b"}}
			slices.SortFunc(want, func(a, b types.NamespacedName) int { return compareKeys(a, b) })
			g.Expect(got).To(Equal(want))

			// The keys are readable in a cache of all namespaces (one
			// informer); the reader's lookup above covers the other.
			inf, err := c.GetInformer(ctx, &v1alpha1.DeviceTwin{})
			g.Expect(err).NotTo(HaveOccurred())
			if si, ok := inf.(toolscache.SharedIndexInformer); ok {
				keys := si.GetIndexer().ListIndexFuncValues("field:" + deviceid.Index)
				g.Expect(keys).To(ContainElement("__all_namespaces/IDX-2"))
				for _, k := range keys {
					g.Expect(k).To(HavePrefix("__all_namespaces/"), "a per-namespace key is kept")
				}
			} else if name == "all namespaces" {
				t.Fatalf("informer %T of a cache of all namespaces", inf)
			}
		})
	}
}

func compareKeys(a, b types.NamespacedName) int {
	if a.Namespace != b.Namespace {
		if a.Namespace < b.Namespace {
			return -1
		}
		return 1
	}
	if a.Name < b.Name {
		return -1
	} else if a.Name > b.Name {
		return 1
	}
	return 0
}
