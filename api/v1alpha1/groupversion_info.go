// Package v1alpha1 contains the API types of the kubetwin.io group: the
// DeviceTwin resource and the DeviceIDClaim that makes a device id unique.
//
// +kubebuilder:object:generate=true
// +groupName=kubetwin.io
package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

var (
	// GroupVersion is the group and version of the DeviceTwin API.
	GroupVersion = schema.GroupVersion{Group: "kubetwin.io", Version: "v1alpha1"}

	// SchemeBuilder registers the types of this group version with a scheme.
	// It depends on apimachinery only, so the package stays cheap to import.
	SchemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)

	// AddToScheme adds the types of this group version to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

// addKnownTypes registers every kind of the group version.
func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion,
		&DeviceTwin{}, &DeviceTwinList{},
		&DeviceIDClaim{}, &DeviceIDClaimList{},
		&TwinConfiguration{}, &TwinConfigurationList{},
	)
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
