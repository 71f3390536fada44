package operator

import (
	"net/http"
	"strings"
	"sync"

	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client/apiutil"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// NewRESTMapper is the manager's MapperProvider: controller-runtime's
// dynamic mapper, with the mappings of kubetwin.io kinds and of core
// kinds kept once found. A cache restricted to namespaces maps the kind of
// every object it reads (to tell namespaced from cluster-wide), and the
// dynamic mapper answers by asking each API group in turn, building a
// no-match error for each: ~10 KB allocated per read of a claim, once per
// twin at every start. The scope of these kinds never changes (ours are
// fixed by our CRDs, core ones by Kubernetes); other groups are asked
// every time, as their CRDs may come and go.
func NewRESTMapper(c *rest.Config, hc *http.Client) (meta.RESTMapper, error) {
	m, err := apiutil.NewDynamicRESTMapper(c, hc)
	if err != nil {
		return nil, err
	}
	return &stableMapper{RESTMapper: m}, nil
}

type stableMapper struct {
	meta.RESTMapper
	found sync.Map // mappingKey -> *meta.RESTMapping
}

type mappingKey struct {
	gk       schema.GroupKind
	versions string
}

// RESTMapping is the dynamic mapper's, kept for stable kinds once found.
func (m *stableMapper) RESTMapping(gk schema.GroupKind, versions ...string) (*meta.RESTMapping, error) {
	if gk.Group != v1alpha1.GroupVersion.Group && gk.Group != "" {
		return m.RESTMapper.RESTMapping(gk, versions...)
	}
	k := mappingKey{gk: gk}
	if len(versions) == 1 {
		k.versions = versions[0]
	} else if len(versions) > 1 {
		k.versions = strings.Join(versions, ",")
	}
	if r, ok := m.found.Load(k); ok {
		return r.(*meta.RESTMapping), nil
	}
	r, err := m.RESTMapper.RESTMapping(gk, versions...)
	if err != nil {
		return nil, err
	}
	m.found.Store(k, r)
	return r, nil
}
