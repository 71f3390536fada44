package deviceauth

import (
	"fmt"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// CheckSecretRef returns why the Secret s may not give a twin its keys
// through spec.authentication.secretRef, or nil when it may. It must carry
// the label kubetwin.io/device-keys=true and be owned by no DeviceTwin:
// a twin's own key Secret holds keys that others (its device, whoever may
// read it) know, so a twin editor who names it would make a device they
// know the key of pass for the twin they edit. The controller, the
// broker's device lookup, the admission webhook and the service API all
// apply it.
func CheckSecretRef(s *corev1.Secret) error {
	for _, o := range s.OwnerReferences {
		gv, err := schema.ParseGroupVersion(o.APIVersion)
		if err == nil && gv.Group == v1alpha1.GroupVersion.Group && o.Kind == "DeviceTwin" {
			return fmt.Errorf("Secret %s is owned by DeviceTwin %s (it is that twin's key Secret); name a Secret labelled %s=true that no DeviceTwin owns",
				s.Name, o.Name, v1alpha1.DeviceKeysLabel)
		}
	}
	if s.Labels[v1alpha1.DeviceKeysLabel] != "true" {
		return fmt.Errorf("Secret %s lacks the label %s=true", s.Name, v1alpha1.DeviceKeysLabel)
	}
	return nil
}
