// Package hubapi serves the service side of Azure IoT Hub's REST API
// (api-version 2021-04-12) from the operator, over HTTPS, so that
// unmodified IoT Hub service SDKs (azure-iothub for Node, and the others
// that speak the same protocol) can read and write DeviceTwins, query the
// fleet and manage the device registry:
//
//	GET    /twins/{id}        the twin document (internal/hubtwin)
//	PATCH  /twins/{id}        merge tags and desired properties (If-Match: etag or *)
//	PUT    /twins/{id}        replace tags and desired properties
//	POST   /devices/query     run an IoT Hub query, in pages (x-ms-max-item-count, x-ms-continuation)
//	PUT    /devices/{id}      create a device (no If-Match) or update its status and keys (If-Match)
//	GET    /devices/{id}      the device identity, with its keys
//	GET    /devices/          every device (at most MaxListDevices)
//	DELETE /devices/{id}      delete the device and its twin
//
// Every path takes ?api-version=...; the value is not checked, so SDKs of
// other API versions work as long as the shapes they use are the same.
// Device ids are URL-encoded path segments and are decoded from the raw
// path, so ids holding '+', '#', '?', '%' or ';' survive.
//
// # Authorization
//
// Requests carry IoT Hub's service token in the Authorization header:
//
//	SharedAccessSignature sr=<hub host>&sig=<signature>&skn=<policy>&se=<expiry>
//
// signed with a key of a shared access policy. Policies live in one Secret
// (see [EnsurePolicies] for its layout and the four default policies) that
// the [Handler] re-reads at most every Options.PolicyTTL, and at once when
// a signature does not verify, so a rotated key takes effect within a
// second. One read runs at a time, bounded by Options.PolicyReadTimeout,
// and requests are served with the last good copy meanwhile (and while the
// API server fails). Each operation needs a right: reading and writing twins
// ServiceConnect, queries ServiceConnect or RegistryRead, reading the
// registry RegistryRead, changing it RegistryWrite.
//
// # Errors
//
// Errors have IoT Hub's status codes and body,
//
//	{"Message":"ErrorCode:DeviceNotFound;device \"myDevice\" is not registered","ExceptionMessage":"Tracking ID:...-TimeStamp:..."}
//
// which the SDKs turn into their typed errors (DeviceNotFoundError,
// InvalidEtagError...). The SDKs end the message at the first ';', so a
// ';' inside the text (a device id may hold one) is written as %3B.
//
// # Storage
//
// A device is a DeviceTwin: tags are spec.tags, desired properties
// spec.desired, the device's keys the Secret <twin name>-device-key. Reads
// come from the manager's cache; writes go to the API server with
// resourceVersion preconditions (the etag is the resourceVersion, see
// internal/hubtwin), and a write's reply waits (briefly) until the cache
// has caught up, so a client reads its own writes.
package hubapi
