package operator

import (
	"cmp"

	"sigs.k8s.io/controller-runtime/pkg/cache"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/controllers"
	"github.com/kubetwin/kubetwin/internal/deviceid"
)

// CacheOptions is the manager's cache as cmd/manager (and the restart
// measurement) sets it up: only Secrets labelled kubetwin.io/device-keys=true
// and the claims of claimsNS (DefaultClaimsNamespace if empty), wherever
// twins are watched (namespace, or all if empty); cached objects keep only
// what the operator reads (CacheTransform).
func CacheOptions(namespace, claimsNS string) cache.Options {
	o := cache.Options{ByObject: controllers.KeySecretCacheOptions(), DefaultTransform: CacheTransform}
	o.ByObject[&v1alpha1.DeviceIDClaim{}] = cache.ByObject{
		Namespaces: map[string]cache.Config{cmp.Or(claimsNS, DefaultClaimsNamespace): {}},
		Transform:  deviceid.CacheTransform,
	}
	if namespace != "" {
		o.DefaultNamespaces = map[string]cache.Config{namespace: {}}
	}
	return o
}
