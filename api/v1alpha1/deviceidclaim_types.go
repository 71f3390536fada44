package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// DeviceIDClaimSpec says which DeviceTwin holds a device id.
type DeviceIDClaimSpec struct {
	// deviceId is the claimed device id.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=128
	// +kubebuilder:validation:XValidation:rule="self == oldSelf",message="deviceId is immutable"
	DeviceID string `json:"deviceId"`

	// twin is the DeviceTwin that holds the id.
	// +required
	Twin TwinReference `json:"twin"`

	// holder is twin's namespace/name, for display (kubectl get).
	// +required
	// +kubebuilder:validation:MaxLength=317
	Holder string `json:"holder"`

	// claimedAt is when twin took the id. A claim whose twin does not exist
	// may be taken over or removed once it is older than a minute: the
	// admission webhook claims before the API server stores the twin, and a
	// create can still fail after that.
	// +required
	ClaimedAt metav1.Time `json:"claimedAt"`
}

// TwinReference names one DeviceTwin, down to its uid: a twin deleted and
// created again with the same name is another twin.
type TwinReference struct {
	// namespace is the twin's namespace.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	Namespace string `json:"namespace"`
	// name is the twin's name.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`
	// uid is the twin's metadata.uid.
	// +required
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=128
	UID types.UID `json:"uid"`
}

// DeviceIDClaim records that one DeviceTwin holds a device id: device ids
// are unique per hub. The operator keeps claims in its own namespace
// (--claims-namespace), named "id-" and the first 40 hex digits of the
// SHA-256 of the id; creating the claim is what makes a twin the holder,
// and only one create of a name can succeed. Tenants need no rights on
// claims.
//
// +kubebuilder:object:root=true
// +kubebuilder:resource:scope=Namespaced
// +kubebuilder:printcolumn:name="Device ID",type=string,JSONPath=`.spec.deviceId`
// +kubebuilder:printcolumn:name="Twin",type=string,JSONPath=`.spec.holder`,description="namespace/name of the DeviceTwin that holds the id"
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type DeviceIDClaim struct {
	metav1.TypeMeta `json:",inline"`
	// metadata is the object's standard metadata.
	// +optional
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// spec names the device id and the twin that holds it.
	// +required
	Spec DeviceIDClaimSpec `json:"spec"`
}

// DeviceIDClaimList is a list of DeviceIDClaims.
//
// +kubebuilder:object:root=true
type DeviceIDClaimList struct {
	metav1.TypeMeta `json:",inline"`
	// metadata is the list's standard metadata.
	// +optional
	metav1.ListMeta `json:"metadata,omitempty"`
	// items are the DeviceIDClaims.
	Items []DeviceIDClaim `json:"items"`
}
