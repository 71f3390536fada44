'use strict';
// Device registry operations through the service SDK: create a device
// with generated keys, get it, list the devices, delete it, and get it
// again (DeviceNotFoundError); or, with a second argument "create", only
// create it. Only the connection string comes from outside
// (IOTHUB_CONNECTION_STRING); the device id is the first argument.
var iothub = require('azure-iothub');

var registry = iothub.Registry.fromConnectionString(process.env.IOTHUB_CONNECTION_STRING);
var deviceId = process.argv[2];

function fail(what, err) {
  console.log(what + ' failed: ' + err.constructor.name + ': ' + err.message);
  process.exit(1);
}

if (process.argv[3] === 'create') {
  // Only create the device, and print its primary key for its device program.
  registry.create({ deviceId: deviceId }, function (err, device) {
    if (err) fail('create', err);
    console.log('created ' + device.deviceId + ' ' + device.authentication.symmetricKey.primaryKey);
  });
  return;
}

registry.create({ deviceId: deviceId }, function (err, device) {
  if (err) fail('create', err);
  var keys = device.authentication.symmetricKey;
  console.log('created ' + device.deviceId + ' status ' + device.status + ' keys ' +
    (Buffer.from(keys.primaryKey, 'base64').length) + '/' + (Buffer.from(keys.secondaryKey, 'base64').length) + ' bytes');
  registry.create({ deviceId: deviceId }, function (err) {
    console.log('create again: ' + (err ? err.constructor.name : 'no error'));
    registry.get(deviceId, function (err, got) {
      if (err) fail('get', err);
      console.log('got ' + got.deviceId + ' same primary key ' + (got.authentication.symmetricKey.primaryKey === keys.primaryKey));
      registry.list(function (err, devices) {
        if (err) fail('list', err);
        console.log('listed ' + devices.some(function (d) { return d.deviceId === deviceId; }));
        registry.delete(deviceId, function (err) {
          if (err) fail('delete', err);
          console.log('deleted ' + deviceId);
          registry.get(deviceId, function (err) {
            console.log('get after delete: ' + (err ? err.constructor.name : 'no error'));
          });
        });
      });
    });
  });
});
