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
//	GET    /devices/          every device of the namespace (at most MaxListDevices)
//	DELETE /devices/{id}      delete the device and its twin
//	PUT, GET, DELETE /configurations/{id}, GET /configurations, POST /configurations/testQueries,
//	POST /devices/{id}/applyConfigurationContent   fleet configurations (TwinConfigurations, see configurations.go)
//
// Every path takes ?api-version=...; the value is not checked, so SDKs of
// other API versions work as long as the shapes they use are the same.
// Device ids are URL-encoded path segments and are decoded from the raw
// path, so ids holding '+', '#', '?', '%' or ';' survive.
//
// # Scope
//
// The API serves one namespace, Options.Namespace (--registry-namespace):
// a hub is the DeviceTwins there. Every operation, with every policy,
// reads and writes only those twins; a device whose twin is in another
// namespace is DeviceNotFound, and GET /devices and queries list only
// that namespace. Device ids are unique per hub installation (see
// internal/deviceid), so creating a device whose id a twin elsewhere
// holds is 409 DeviceAlreadyExists, without naming that twin.
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
// registry RegistryRead, changing it RegistryWrite. A token whose expiry is
// further than Options.MaxTokenLifetime (--max-sas-token-lifetime) from now
// is refused.
//
// A token's resource (sr) is the hub host name (hub-wide: every operation
// its policy's rights allow), or a device scope below it, compared with the
// route's decoded path segments, never as a prefix of the path:
//
//	sr=<hub>/devices/<id>   GET, PATCH, PUT /twins/<id>; GET, PUT, DELETE /devices/<id>
//	sr=<hub>/twins/<id>     GET, PATCH, PUT /twins/<id>
//
// (each still needs the right the operation needs). A device-scoped token
// never lists devices nor runs queries, which reach the whole fleet: the
// token for "<hub>/devices/query" covers the device named "query", not
// POST /devices/query. Ids are compared decoded: "<hub>/devices/x" does not
// cover /devices/x%2Fy. Any other resource below the hub covers nothing.
//
// Every refusal is 401 with IoT Hub's body, "ErrorCode:IotHubUnauthorizedAccess;Unauthorized":
// the caller learns nothing of which policies exist, which key failed or
// which policy is broken. The reason goes to the log (rate-limited, see
// internal/ratelog) and to kubetwin_service_unauthorized_total{reason}.
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
// spec.desired, the device's keys the Secret <twin name>-device-key. The
// API returns keys only from that Secret, and only when it carries the
// label kubetwin.io/device-keys=true and is controlled by the twin; never
// from the Secret spec.authentication.secretRef names (the operator
// copies an allowed one's keys into the managed Secret). A device's etag
// covers the twin and its keys (both resourceVersions), so PUT
// /devices/{id} with If-Match fails with 412 when either changed, and of
// two key rotations from the same etag one fails. Reads
// come from the manager's cache; writes go to the API server with
// resourceVersion preconditions (the etag is the resourceVersion, see
// internal/hubtwin), and a write's reply waits (briefly) until the cache
// has caught up, so a client reads its own writes.
package hubapi
