'use strict';
// The back-end half of IoT Hub's "get started with device twins" scenario:
// tag a device's twin with its location, then find it by queries.
// Only the connection string comes from outside (IOTHUB_CONNECTION_STRING).
var iothub = require('azure-iothub');

var connectionString = process.env.IOTHUB_CONNECTION_STRING;
var deviceId = process.env.DEVICE_ID || 'myDeviceId';
var registry = iothub.Registry.fromConnectionString(connectionString);

function queryTwins(done) {
  var query = registry.createQuery("SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'", 100);
  query.nextAsTwin(function (err, results) {
    if (err) {
      console.error('Failed to fetch the results: ' + err.message);
      process.exit(1);
    }
    console.log('Devices in Redmond43: ' + results.map(function (twin) { return twin.deviceId; }).join(','));

    query = registry.createQuery("SELECT * FROM devices WHERE tags.location.plant = 'Redmond43' AND properties.reported.connectivity.type = 'cellular'", 100);
    query.nextAsTwin(function (err, results) {
      if (err) {
        console.error('Failed to fetch the results: ' + err.message);
        process.exit(1);
      }
      console.log('Devices in Redmond43 using cellular network: ' + results.map(function (twin) { return twin.deviceId; }).join(','));
      done();
    });
  });
}

if (process.argv[2] === 'query') {
  queryTwins(function () {});
} else {
  registry.getTwin(deviceId, function (err, twin) {
    if (err) {
      console.error(err.constructor.name + ': ' + err.message);
      process.exit(1);
    }
    var patch = {
      tags: {
        location: {
          region: 'US',
          plant: 'Redmond43'
        }
      }
    };
    twin.update(patch, function (err) {
      if (err) {
        console.error('Could not update twin: ' + err.constructor.name + ': ' + err.message);
        process.exit(1);
      }
      console.log(twin.deviceId + ' twin updated successfully');
      queryTwins(function () {});
    });
  });
}
