// Package v1alpha1 contains the API types of the kubetwin.io group: the
// DeviceTwin resource and the DeviceIDClaim that makes a device id unique.
//
// +kubebuilder:object:generate=true
// +groupName=kubetwin.io
package v1alpha1

import (
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/scheme"
)

var (
	// GroupVersion is the group and version of the DeviceTwin API.
	GroupVersion = schema.GroupVersion{Group: "kubetwin.io", Version: "v1alpha1"}

	// SchemeBuilder registers the types of this group version with a scheme.
	SchemeBuilder = &scheme.Builder{GroupVersion: GroupVersion}

	// AddToScheme adds the types of this group version to a scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)
