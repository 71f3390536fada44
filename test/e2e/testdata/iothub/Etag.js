'use strict';
// Optimistic concurrency and missing devices through the service SDK:
// update a twin with its etag, update it again with the now stale etag
// (InvalidEtagError), update with "*", and get a twin that does not
// exist (DeviceNotFoundError). Only the connection string comes from
// outside (IOTHUB_CONNECTION_STRING); the device id is the first argument.
var iothub = require('azure-iothub');

var registry = iothub.Registry.fromConnectionString(process.env.IOTHUB_CONNECTION_STRING);
var deviceId = process.argv[2];

registry.getTwin(deviceId, function (err, twin) {
  if (err) {
    console.log('getTwin failed: ' + err.constructor.name + ': ' + err.message);
    process.exit(1);
  }
  console.log('read: telemetryInterval ' + twin.properties.desired.telemetryInterval + ', desired version ' + twin.properties.desired.$version);
  var stale = twin.etag;
  registry.updateTwin(deviceId, { properties: { desired: { telemetryInterval: 30 } } }, stale, function (err, updated) {
    if (err) {
      console.log('update failed: ' + err.constructor.name + ': ' + err.message);
      process.exit(1);
    }
    console.log('updated: desired version ' + updated.properties.desired.$version + ', etag changed ' + (updated.etag !== stale));
    registry.updateTwin(deviceId, { properties: { desired: { telemetryInterval: 60 } } }, stale, function (err) {
      console.log('stale etag: ' + (err ? err.constructor.name : 'no error'));
      registry.updateTwin(deviceId, { tags: { owner: 'ops' } }, '*', function (err, forced) {
        if (err) {
          console.log('update with * failed: ' + err.constructor.name + ': ' + err.message);
          process.exit(1);
        }
        console.log('any etag: tags ' + JSON.stringify(forced.tags));
        registry.getTwin(deviceId + '-missing', function (err) {
          console.log('missing device: ' + (err ? err.constructor.name : 'no error'));
        });
      });
    });
  });
});
