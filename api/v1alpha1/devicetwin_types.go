package v1alpha1

import (
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Condition types of a DeviceTwin.
const (
	// ConditionConnected is True while the device holds a connection to the
	// broker (from its birth message, or the embedded broker's own events) and
	// False once it has gone (last will, disconnect) or has never connected.
	ConditionConnected = "Connected"

	// ConditionCredentialsReady is True when the device has usable keys
	// (in the Secret <twin name>-device-key) and the broker has been told
	// about them. It is present only when the operator authenticates
	// devices (--device-auth=sas, the default).
	ConditionCredentialsReady = "CredentialsReady"

	// ConditionInSync is True when the device has seen the current desired
	// version and every desired leaf has the same value in the reported
	// properties (the delta is empty). GitOps pipelines wait on it:
	// `kubectl wait --for=condition=InSync devicetwin/NAME`.
	ConditionInSync = "InSync"
)

// Conditions in the kstatus convention (sigs.k8s.io/cli-utils), so Flux,
// kubectl wait and other generic tools see a twin's progress too.
const (
	// ConditionReady mirrors InSync: True when the device has converged.
	ConditionReady = "Ready"
	// ConditionReconciling is present, True, while the device has not yet
	// converged on the current desired state (DesiredNotSeen, Converging).
	ConditionReconciling = "Reconciling"
	// ConditionStalled is present, True, when waiting cannot help: the
	// desired state was refused (InvalidDesired; the spec must change) or
	// another twin holds the device id (DuplicateDeviceID; until it is
	// deleted).
	ConditionStalled = "Stalled"
)

// Condition reasons of a DeviceTwin.
const (
	// ReasonConnected: the device is online.
	ReasonConnected = "Connected"
	// ReasonDisconnected: the device went offline.
	ReasonDisconnected = "Disconnected"
	// ReasonNeverConnected: the device has not connected since the twin was created.
	ReasonNeverConnected = "NeverConnected"
	// ReasonDuplicateDeviceID: another DeviceTwin holds the device id (its DeviceIDClaim); this twin is not served until that one is deleted.
	ReasonDuplicateDeviceID = "DuplicateDeviceID"
	// ReasonInSync: the device has the current desired version and reports every desired value.
	ReasonInSync = "InSync"
	// ReasonDesiredNotSeen: the device has not yet acknowledged (IoT Hub devices: been sent) the current desired version.
	ReasonDesiredNotSeen = "DesiredNotSeen"
	// ReasonConverging: the device has the current desired version but reports other values for some leaves.
	ReasonConverging = "Converging"
	// ReasonInvalidDesired: spec.desired or spec.tags break the twin rules; nothing was sent to the device.
	ReasonInvalidDesired = "InvalidDesired"
	// ReasonDisabled: spec.status is disabled; the broker refuses the device.
	ReasonDisabled = "Disabled"
	// ReasonKeysReady: the device's keys are in its Secret and the broker knows them.
	ReasonKeysReady = "KeysReady"
	// ReasonSecretNotFound: the Secret named in spec.authentication.secretRef
	// does not exist or lacks the label kubetwin.io/device-keys=true.
	ReasonSecretNotFound = "SecretNotFound"
	// ReasonInvalidKeys: a key is not base64 of 16 to 64 bytes (the other
	// key, if valid, still works).
	ReasonInvalidKeys = "InvalidKeys"
	// ReasonSecretConflict: a Secret named <twin name>-device-key exists
	// that this twin does not own; the operator leaves it alone.
	ReasonSecretConflict = "SecretConflict"
	// ReasonSecretRefNotAllowed: the Secret named in
	// spec.authentication.secretRef may not give keys: it is owned by a
	// DeviceTwin (another twin's key Secret) or lacks the label
	// kubetwin.io/device-keys=true. No key is taken from it.
	ReasonSecretRefNotAllowed = "SecretRefNotAllowed"
	// ReasonProvisioningFailed: the broker could not be told about the
	// device's keys or status (e.g. Mosquitto's dynamic-security plugin
	// did not answer); the operator retries.
	ReasonProvisioningFailed = "ProvisioningFailed"
)

// Device keys: the Secret the operator keeps for every twin.
const (
	// DeviceKeysLabel marks Secrets that hold device keys. The operator
	// watches (and so sees) only Secrets with DeviceKeysLabel=true: the
	// Secrets it creates, and those named in spec.authentication.secretRef.
	DeviceKeysLabel = "kubetwin.io/device-keys"
	// KeySecretSuffix makes the name of a twin's key Secret:
	// <twin name>-device-key.
	KeySecretSuffix = "-device-key"
	// PrimaryKeyKey and SecondaryKeyKey hold the device's symmetric keys
	// (base64 of 16 to 64 bytes, as in IoT Hub); ConnectionStringKey holds
	// HostName=<hub host>;DeviceId=<id>;SharedAccessKey=<primary key>.
	PrimaryKeyKey       = "primaryKey"
	SecondaryKeyKey     = "secondaryKey"
	ConnectionStringKey = "connectionString"
)

// DeviceStatus is whether a device may connect (IoT Hub's device status).
// +kubebuilder:validation:Enum=enabled;disabled
type DeviceStatus string

// Device statuses.
const (
	// DeviceEnabled devices may connect.
	DeviceEnabled DeviceStatus = "enabled"
	// DeviceDisabled devices are refused, and disconnected if connected.
	DeviceDisabled DeviceStatus = "disabled"
)

// AuthenticationType is how a device proves its identity.
// +kubebuilder:validation:Enum=symmetricKey
type AuthenticationType string

// AuthenticationSymmetricKey: SAS tokens signed with the device's primary or
// secondary key, as in IoT Hub.
const AuthenticationSymmetricKey AuthenticationType = "symmetricKey"

// Authentication is how the device proves its identity to the broker.
type Authentication struct {
	// type is the authentication mechanism. symmetricKey (the only one):
	// the device signs SAS tokens (IoT Hub's format) with its primary or
	// secondary key and sends them as its MQTT password.
	// +optional
	// +kubebuilder:default=symmetricKey
	Type AuthenticationType `json:"type,omitempty"`

	// secretRef names a Secret in the twin's namespace that holds the
	// device's keys in primaryKey and secondaryKey (base64 of 16 to 64
	// bytes; secondaryKey may be left out), for keys made elsewhere. The
	// Secret must carry the label kubetwin.io/device-keys=true: the
	// operator sees only Secrets with it. The operator copies the keys
	// into the Secret <twin name>-device-key it keeps for every twin (with
	// the connection string), and follows changes to them. Without
	// secretRef the operator generates the keys there.
	// +optional
	SecretRef *SecretReference `json:"secretRef,omitempty"`
}

// SecretReference names a Secret in the twin's namespace.
type SecretReference struct {
	// name is the Secret's name.
	// +required
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=253
	Name string `json:"name"`
}

// Connection states reported in status.connectionState.
const (
	// ConnectionStateConnected means the device is online.
	ConnectionStateConnected = "Connected"
	// ConnectionStateDisconnected means the device is offline or has never connected.
	ConnectionStateDisconnected = "Disconnected"
)

// DeviceTwinSpec is what the back end owns: the device's identity, its tags
// and its desired properties.
type DeviceTwinSpec struct {
	// deviceId is the id the device uses on the wire (MQTT topics, client id).
	// It defaults to metadata.name and, unlike a Kubernetes name, may hold
	// upper case letters and any of - : . + % _ # * ? ! ( ) , = @ ; $ '
	// (the IoT Hub device id character set), up to 128 characters. It cannot
	// be changed once set.
	//
	// A device id is unique per hub (operator install): one twin holds it,
	// recorded in a DeviceIDClaim in the operator's namespace. Creating a
	// second twin with an id another twin holds is refused at admission with
	// a message naming the holder; without the webhook, the second twin is
	// Stalled with reason DuplicateDeviceID and never served (no keys, nothing
	// published). Deleting the holder cuts its device's credentials and
	// connection and clears its retained desired document, then releases the
	// id: a twin that wants it next is served at once, with its own keys.
	// +optional
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=128
	// +kubebuilder:validation:Pattern=`^[A-Za-z0-9\-:.+%_#*?!(),=@;$']+$`
	DeviceID string `json:"deviceId,omitempty"`

	// tags is back-end metadata about the device (site, customer, firmware
	// channel) that is never sent to the device: a JSON object of strings,
	// numbers, booleans and nested objects (no arrays; keys without '.', '$',
	// space or control characters; at most 10 levels; at most 8 KB). Every
	// scalar tag at path a.b.c whose value is a valid label value is mirrored
	// into the label a.b.c, so `kubectl get devicetwins -l a.b.c=value` works.
	// +optional
	// +kubebuilder:pruning:PreserveUnknownFields
	// +kubebuilder:validation:Schemaless
	// +kubebuilder:validation:Type=object
	Tags *apiextensionsv1.JSON `json:"tags,omitempty"`

	// desired is the configuration the device should apply: a JSON object with
	// the same rules as tags, at most 32 KB. Every change is sent to the
	// device as a patch (deleted keys as null) with a new desired $version,
	// and is kept retained on the broker so a device that connects while the
	// operator is down still gets it. Progress shows in status.delta and the
	// InSync condition.
	// +optional
	// +kubebuilder:pruning:PreserveUnknownFields
	// +kubebuilder:validation:Schemaless
	// +kubebuilder:validation:Type=object
	Desired *apiextensionsv1.JSON `json:"desired,omitempty"`

	// status is enabled or disabled, as in IoT Hub. A disabled device is
	// refused by the broker, and disconnected at once if it is connected;
	// enabling it again lets it connect. (Enforced when the operator
	// authenticates devices: --device-auth=sas, the default.)
	// +optional
	// +kubebuilder:default=enabled
	Status DeviceStatus `json:"status,omitempty"`

	// authentication is how the device proves its identity: symmetric keys,
	// generated by the operator into the Secret <twin name>-device-key
	// (with the device's connection string) unless secretRef names a
	// Secret that holds them. Rotate a key by editing the Secret holding
	// it: the operator keeps what you write, fills in a missing key, and
	// keeps the connection string on the primary key. Devices whose token
	// is signed with a key that is no longer there are refused at their
	// next connect, and disconnected at once on the embedded broker.
	// +optional
	Authentication *Authentication `json:"authentication,omitempty"`
}

// Disabled reports whether spec.status is disabled.
func (s *DeviceTwinSpec) Disabled() bool { return s.Status == DeviceDisabled }

// KeySecretName is the name of the Secret that holds a twin's keys and
// connection string: <twin name>-device-key.
func KeySecretName(twinName string) string { return twinName + KeySecretSuffix }

// TwinMetadata is the twin's $metadata: for every object and leaf of a
// section, when it last changed.
type TwinMetadata struct {
	// desired mirrors spec.desired: each object and leaf holds
	// {"$lastUpdated": RFC 3339 time, "$lastUpdatedVersion": desired version}
	// and nested members under their own keys.
	// +optional
	// +kubebuilder:pruning:PreserveUnknownFields
	// +kubebuilder:validation:Schemaless
	// +kubebuilder:validation:Type=object
	Desired *apiextensionsv1.JSON `json:"desired,omitempty"`

	// reported mirrors status.reported: each object and leaf holds
	// {"$lastUpdated": RFC 3339 time} and nested members under their own keys.
	// +optional
	// +kubebuilder:pruning:PreserveUnknownFields
	// +kubebuilder:validation:Schemaless
	// +kubebuilder:validation:Type=object
	Reported *apiextensionsv1.JSON `json:"reported,omitempty"`
}

// DeviceTwinStatus is what the device and the operator own: the reported
// properties, versions, metadata, presence and conditions.
//
// It is atomic for server-side apply: the operator is its only writer, and
// per-field ownership made the operator's managedFields entry list every
// status field (every reported leaf and its $metadata too), which the API
// server stores, decodes, compares and encodes again on every status write.
// +structType=atomic
type DeviceTwinStatus struct {
	// deviceId is the device id in effect (spec.deviceId, else metadata.name).
	// +optional
	// +kubebuilder:validation:MaxLength=128
	DeviceID string `json:"deviceId,omitempty"`

	// reported holds the properties the device reported: the merge of every
	// accepted reported patch (null deletes a key).
	// +optional
	// +kubebuilder:pruning:PreserveUnknownFields
	// +kubebuilder:validation:Schemaless
	// +kubebuilder:validation:Type=object
	Reported *apiextensionsv1.JSON `json:"reported,omitempty"`

	// reportedVersion is the reported $version: it grows by one with every
	// accepted reported patch.
	// +optional
	ReportedVersion int64 `json:"reportedVersion,omitempty"`

	// desiredVersion is the desired $version: it grows by one with every
	// change of spec.desired that has been sent to the device.
	// +optional
	DesiredVersion int64 `json:"desiredVersion,omitempty"`

	// deviceDesiredVersion is the newest desired $version the device is known
	// to have: from its twin GET, or its acknowledgement of a notification.
	// Devices speaking IoT Hub's MQTT dialect do not acknowledge: for them it
	// is the newest version sent to them (a notification or a GET answer).
	// +optional
	DeviceDesiredVersion int64 `json:"deviceDesiredVersion,omitempty"`

	// publishedDesired is the desired document as last sent to the device
	// (equal to spec.desired once a change has gone out). The next
	// notification is the patch from it to spec.desired.
	// +optional
	// +kubebuilder:pruning:PreserveUnknownFields
	// +kubebuilder:validation:Schemaless
	// +kubebuilder:validation:Type=object
	PublishedDesired *apiextensionsv1.JSON `json:"publishedDesired,omitempty"`

	// delta holds every desired leaf whose reported value differs or is
	// missing, with its desired value. Empty when the device has converged.
	// +optional
	// +kubebuilder:pruning:PreserveUnknownFields
	// +kubebuilder:validation:Schemaless
	// +kubebuilder:validation:Type=object
	Delta *apiextensionsv1.JSON `json:"delta,omitempty"`

	// deltaCount is the number of leaves in delta.
	// +optional
	DeltaCount int32 `json:"deltaCount,omitempty"`

	// metadata is the twin's $metadata: when each desired and reported
	// property last changed.
	// +optional
	Metadata *TwinMetadata `json:"metadata,omitempty"`

	// connectionState is Connected or Disconnected.
	// +optional
	// +kubebuilder:validation:Enum=Connected;Disconnected
	ConnectionState string `json:"connectionState,omitempty"`

	// connectionStateUpdatedTime is when connectionState last changed.
	// +optional
	ConnectionStateUpdatedTime *metav1.Time `json:"connectionStateUpdatedTime,omitempty"`

	// lastActivityTime is when the device was last heard from. It is kept
	// to a resolution of a minute so that activity alone costs at most one
	// write a minute per device.
	// +optional
	LastActivityTime *metav1.Time `json:"lastActivityTime,omitempty"`

	// observedGeneration is the metadata.generation this status reflects.
	// +optional
	ObservedGeneration int64 `json:"observedGeneration,omitempty"`

	// conditions are Connected, InSync and (with device authentication)
	// CredentialsReady.
	// +optional
	// +listType=map
	// +listMapKey=type
	// +kubebuilder:validation:MaxItems=8
	Conditions []metav1.Condition `json:"conditions,omitempty"`
}

// DeviceTwin is one device's twin: tags and desired properties in spec,
// reported properties, versions and presence in status.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:shortName={twin,dt},categories=iot
// +kubebuilder:selectablefield:JSONPath=`.status.deviceId`
// +kubebuilder:selectablefield:JSONPath=`.status.connectionState`
// +kubebuilder:printcolumn:name="Device",type=string,JSONPath=`.status.deviceId`
// +kubebuilder:printcolumn:name="Status",type=string,JSONPath=`.spec.status`,priority=1,description="enabled or disabled"
// +kubebuilder:printcolumn:name="Connected",type=string,JSONPath=`.status.conditions[?(@.type=="Connected")].status`
// +kubebuilder:printcolumn:name="InSync",type=string,JSONPath=`.status.conditions[?(@.type=="InSync")].status`
// +kubebuilder:printcolumn:name="Desired",type=integer,JSONPath=`.status.desiredVersion`,description="desired $version"
// +kubebuilder:printcolumn:name="Reported",type=integer,JSONPath=`.status.reportedVersion`,description="reported $version"
// +kubebuilder:printcolumn:name="Delta",type=integer,JSONPath=`.status.deltaCount`,priority=1,description="desired leaves not yet reported"
// +kubebuilder:printcolumn:name="Last-Activity",type=date,JSONPath=`.status.lastActivityTime`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
// +kubebuilder:validation:XValidation:rule="(has(oldSelf.spec) && has(oldSelf.spec.deviceId)) ? (has(self.spec) && has(self.spec.deviceId) && self.spec.deviceId == oldSelf.spec.deviceId) : (!has(self.spec) || !has(self.spec.deviceId) || self.spec.deviceId == self.metadata.name)",message="spec.deviceId is immutable (it may only be set to metadata.name when it was unset)"
type DeviceTwin struct {
	metav1.TypeMeta `json:",inline"`
	// metadata is the object's standard metadata.
	// +optional
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// spec holds the device id, tags and desired properties.
	// +optional
	Spec DeviceTwinSpec `json:"spec,omitempty"`

	// status holds the reported properties, versions, presence and conditions.
	// +optional
	Status DeviceTwinStatus `json:"status,omitempty"`
}

// EffectiveDeviceID is the device id in effect: spec.deviceId, else metadata.name.
func (t *DeviceTwin) EffectiveDeviceID() string {
	if t.Spec.DeviceID != "" {
		return t.Spec.DeviceID
	}
	return t.Name
}

// DeviceTwinList is a list of DeviceTwins.
//
// +kubebuilder:object:root=true
type DeviceTwinList struct {
	metav1.TypeMeta `json:",inline"`
	// metadata is the list's standard metadata.
	// +optional
	metav1.ListMeta `json:"metadata,omitempty"`
	// items are the DeviceTwins.
	Items []DeviceTwin `json:"items"`
}
