package v1alpha1

import (
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// Condition types of a TwinConfiguration, in the kstatus convention
// (Ready, Reconciling, Stalled) plus Progressing, as a Deployment has it.
const (
	// ConfigConditionProgressing is True while the content is still being
	// applied to targeted twins, or a rollout waits for a batch to report it
	// back; False when the rollout is done, paused or halted.
	ConfigConditionProgressing = "Progressing"
)

// Condition reasons of a TwinConfiguration.
const (
	// ReasonApplied: every targeted twin that this configuration wins has its content.
	ReasonApplied = "Applied"
	// ReasonApplying: twins are being given the content.
	ReasonApplying = "Applying"
	// ReasonWaitingForDevices: the content is in every twin's spec; devices have yet to report it back.
	ReasonWaitingForDevices = "WaitingForDevices"
	// ReasonRolloutPaused: spec.rollout.paused is true.
	ReasonRolloutPaused = "RolloutPaused"
	// ReasonRolloutHalted: the rollout's health metric went over its threshold; no more twins get the content.
	ReasonRolloutHalted = "RolloutHalted"
	// ReasonInvalidConfiguration: the target condition, a metric query or the content is not valid.
	ReasonInvalidConfiguration = "InvalidConfiguration"
)

// ConfigurationsLabelPrefix prefixes the label each twin carries for every
// configuration that targets it: configurations.kubetwin.io/<name>, with
// the value Targeted or Applied (IoT Hub's configurations.[[id]].status).
const ConfigurationsLabelPrefix = "configurations.kubetwin.io/"

// Values of a twin's configurations.kubetwin.io/<name> label.
const (
	// ConfigurationTargeted: the twin matches the target condition but this
	// configuration sets none of its desired paths (another one with a higher
	// priority, or the twin's own manifest, owns them; or a rollout has not
	// reached the twin yet).
	ConfigurationTargeted = "Targeted"
	// ConfigurationApplied: the configuration's content is in the twin's spec.desired.
	ConfigurationApplied = "Applied"
)

// TwinConfigurationSpec selects twins and says what desired properties they get.
//
// +kubebuilder:validation:XValidation:rule="has(self.targetCondition) != has(self.selector)",message="set exactly one of spec.targetCondition and spec.selector"
type TwinConfigurationSpec struct {
	// targetCondition selects the twins of this namespace that get the
	// content: the WHERE clause of the IoT Hub query language, without the
	// word WHERE, e.g. tags.location.plant = 'Redmond43' AND
	// properties.reported.firmware.version < '2.0'; "*" selects every twin.
	// Conditions over tags are answered with label selectors.
	// +optional
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=4096
	TargetCondition string `json:"targetCondition,omitempty"`

	// selector selects the twins of this namespace by label, instead of a
	// targetCondition.
	// +optional
	Selector *metav1.LabelSelector `json:"selector,omitempty"`

	// priority decides, for each desired path, which configuration a twin
	// gets when several target it: the highest priority wins; on a tie, the
	// most recently created configuration.
	// +optional
	// +kubebuilder:validation:Minimum=0
	Priority int32 `json:"priority,omitempty"`

	// content is what the targeted twins get.
	// +required
	Content TwinConfigurationContent `json:"content"`

	// metrics are named queries counted over the twins of this namespace, e.g.
	// failed: SELECT deviceId FROM devices WHERE properties.reported.firmware.status = 'failed'.
	// Their counts are in status.metrics.
	// +optional
	// +listType=map
	// +listMapKey=name
	// +kubebuilder:validation:MaxItems=20
	Metrics []ConfigurationMetric `json:"metrics,omitempty"`

	// rollout, when set, gives the content to a few twins at a time and goes
	// on only while a health metric stays under its threshold.
	// +optional
	Rollout *RolloutSpec `json:"rollout,omitempty"`
}

// TwinConfigurationContent is the content a configuration gives its twins.
type TwinConfigurationContent struct {
	// desired is merged into each targeted twin's spec.desired, path by
	// path, under the same rules as spec.desired of a DeviceTwin. A path the
	// twin's own manifest sets keeps the manifest's value.
	// +required
	// +kubebuilder:pruning:PreserveUnknownFields
	// +kubebuilder:validation:Type=object
	Desired *apiextensionsv1.JSON `json:"desired"`
}

// ConfigurationMetric is one named query.
type ConfigurationMetric struct {
	// name names the metric (IoT Hub's metric id).
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=63
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9][A-Za-z0-9_.-]*$`
	Name string `json:"name"`
	// query is an IoT Hub query: SELECT deviceId FROM devices WHERE ....
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=4096
	Query string `json:"query"`
}

// RolloutSpec stages a configuration's rollout.
type RolloutSpec struct {
	// maxInFlight is how many targeted twins (a number, or a percentage of the
	// targeted twins) may have the content without having reported it back
	// yet; the next twins get it as earlier ones come in sync.
	// +required
	// +kubebuilder:validation:XIntOrString
	MaxInFlight intstr.IntOrString `json:"maxInFlight"`

	// healthMetric names one of spec.metrics; the rollout halts (no more
	// twins get the content) while its count is over maxUnhealthy.
	// +optional
	// +kubebuilder:validation:MaxLength=63
	HealthMetric string `json:"healthMetric,omitempty"`

	// maxUnhealthy is the highest healthMetric count (a number, or a
	// percentage of the twins that have the content) the rollout tolerates.
	// Default 0.
	// +optional
	// +kubebuilder:validation:XIntOrString
	MaxUnhealthy *intstr.IntOrString `json:"maxUnhealthy,omitempty"`

	// paused stops giving the content to more twins; twins that have it keep it.
	// +optional
	Paused bool `json:"paused,omitempty"`
}

// TwinConfigurationStatus is what the operator observed.
type TwinConfigurationStatus struct {
	// observedGeneration is the generation these counts were computed for.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`

	// targetedCount is how many twins match the target.
	// +optional
	TargetedCount int32 `json:"targetedCount"`

	// appliedCount is how many targeted twins have this configuration's
	// content in spec.desired (label configurations.kubetwin.io/<name>=Applied).
	// +optional
	AppliedCount int32 `json:"appliedCount"`

	// inSyncCount is how many of those report the content back: every
	// desired leaf of the content has the same value in their reported
	// properties.
	// +optional
	InSyncCount int32 `json:"inSyncCount"`

	// metrics are the counts of spec.metrics.
	// +optional
	// +listType=map
	// +listMapKey=name
	Metrics []ConfigurationMetricResult `json:"metrics,omitempty"`

	// conditions: Ready (every targeted twin this configuration wins has the
	// content and reports it back), Progressing, and the kstatus
	// Reconciling and Stalled.
	// +optional
	// +listType=map
	// +listMapKey=type
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// ConfigurationMetricResult is one metric's count.
type ConfigurationMetricResult struct {
	// name is the metric's name.
	// +required
	Name string `json:"name"`
	// count is how many twins the metric's query selects.
	// +required
	Count int32 `json:"count"`
}

// TwinConfiguration gives desired properties to every twin of its
// namespace that matches a target condition: IoT Hub's automatic device
// configurations, applied through server-side apply with one field manager
// per configuration (kubetwin-configuration-<name>), so
// `kubectl get devicetwin NAME -o yaml --show-managed-fields` shows which
// configuration set each path.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName={tc,twinconfig},categories=iot
// +kubebuilder:printcolumn:name="Priority",type=integer,JSONPath=`.spec.priority`
// +kubebuilder:printcolumn:name="Targeted",type=integer,JSONPath=`.status.targetedCount`
// +kubebuilder:printcolumn:name="Applied",type=integer,JSONPath=`.status.appliedCount`
// +kubebuilder:printcolumn:name="InSync",type=integer,JSONPath=`.status.inSyncCount`
// +kubebuilder:printcolumn:name="Ready",type=string,JSONPath=`.status.conditions[?(@.type=="Ready")].status`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
// +kubebuilder:validation:XValidation:rule="size(self.metadata.name) <= 63",message="metadata.name must be at most 63 characters (it is a label key: configurations.kubetwin.io/<name>)"
type TwinConfiguration struct {
	metav1.TypeMeta `json:",inline"`
	// metadata is the object's standard metadata.
	// +optional
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// spec selects twins and says what they get.
	// +required
	Spec TwinConfigurationSpec `json:"spec"`

	// status counts targeted, applied and in-sync twins.
	// +optional
	Status TwinConfigurationStatus `json:"status,omitempty"`
}

// TwinConfigurationList is a list of TwinConfigurations.
//
// +kubebuilder:object:root=true
type TwinConfigurationList struct {
	metav1.TypeMeta `json:",inline"`
	// metadata is the list's standard metadata.
	// +optional
	metav1.ListMeta `json:"metadata,omitempty"`
	// items are the TwinConfigurations.
	Items []TwinConfiguration `json:"items"`
}
