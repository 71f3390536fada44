package operator

import (
	"cmp"
	"fmt"

	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/cache"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/deviceid"
	"github.com/kubetwin/kubetwin/internal/watchdecode"
)

// CacheOptions is the manager's cache as cmd/manager (and the restart
// measurement) sets it up: only Secrets labelled kubetwin.io/device-keys=true
// and the claims of claimsNS (DefaultClaimsNamespace if empty), wherever
// twins are watched (namespace, or all if empty); cached objects keep only
// what the operator reads (CacheTransform). watchDecoder is
// watchdecode.OnePass (the default if empty: the watches of DeviceTwins
// and DeviceIDClaims are decoded by package watchdecode, through cfg) or
// watchdecode.ClientGo.
func CacheOptions(cfg *rest.Config, namespace, claimsNS, watchDecoder string) (cache.Options, error) {
	o := cache.Options{ByObject: controllers.KeySecretCacheOptions(), DefaultTransform: CacheTransform}
	claimsNS = cmp.Or(claimsNS, DefaultClaimsNamespace)
	o.ByObject[&v1alpha1.DeviceIDClaim{}] = cache.ByObject{
		Namespaces: map[string]cache.Config{claimsNS: {}},
		Transform:  deviceid.CacheTransform,
	}
	if namespace != "" {
		o.DefaultNamespaces = map[string]cache.Config{namespace: {}}
	}
	switch watchDecoder {
	case "", watchdecode.OnePass:
		// Twins and claims in the namespaces above, no selectors: as
		// NewInformer requires.
		f, err := watchdecode.NewInformer(cfg,
			watchdecode.Watched{Object: &v1alpha1.DeviceTwin{}, Resource: "devicetwins", Namespace: namespace},
			watchdecode.Watched{Object: &v1alpha1.DeviceIDClaim{}, Resource: "deviceidclaims", Namespace: claimsNS})
		if err != nil {
			return o, err
		}
		o.NewInformer = f
	case watchdecode.ClientGo:
	default:
		return o, fmt.Errorf("watch decoder %q: want %s or %s", watchDecoder, watchdecode.OnePass, watchdecode.ClientGo)
	}
	return o, nil
}
