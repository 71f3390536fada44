'use strict';
// Automatic device configurations through the service SDK, as IoT Hub's
// "configure devices at scale" guide uses them. With "create": add a
// configuration targeting Redmond43 (again: DeviceAlreadyExistsError), get
// it, list them, update it with its etag (then with the stale etag:
// InvalidEtagError, then forced), and apply content to one device. With
// "remove": remove it (then get: not found). Only the connection string
// comes from outside (IOTHUB_CONNECTION_STRING); the device id of the
// apply is the second argument.
var iothub = require('azure-iothub');

var registry = iothub.Registry.fromConnectionString(process.env.IOTHUB_CONNECTION_STRING);
var mode = process.argv[2];
var deviceId = process.argv[3];
var id = 'telemetry-30s';

function fail(what) {
  return function (err) {
    console.log(what + ' failed: ' + err.constructor.name + ': ' + err.message);
    process.exit(1);
  };
}

async function create() {
  var configuration = {
    id: id,
    content: { deviceContent: { 'properties.desired.telemetry.interval': 30 } },
    labels: { team: 'ops' },
    targetCondition: "tags.location.plant='Redmond43'",
    priority: 10,
    metrics: { queries: { inSync: 'SELECT deviceId FROM devices WHERE properties.reported.telemetry.interval = 30' } }
  };
  var added = (await registry.addConfiguration(configuration).catch(fail('addConfiguration'))).responseBody;
  console.log('added ' + added.id + ' schemaVersion ' + added.schemaVersion + ' etag ' + (added.etag ? 'set' : 'missing'));
  await registry.addConfiguration(configuration).then(function () {
    console.log('add again: no error');
  }, function (err) {
    console.log('add again: ' + err.constructor.name);
  });
  var got = (await registry.getConfiguration(id).catch(fail('getConfiguration'))).responseBody;
  console.log('got priority ' + got.priority + ' content ' + JSON.stringify(got.content.deviceContent) +
    ' targetCondition ' + got.targetCondition + ' labels ' + JSON.stringify(got.labels));
  var list = (await registry.getConfigurations().catch(fail('getConfigurations'))).responseBody;
  console.log('listed ' + list.map(function (c) { return c.id; }).join(','));

  var stale = got.etag;
  got.priority = 20;
  var updated = (await registry.updateConfiguration(got).catch(fail('updateConfiguration'))).responseBody;
  console.log('updated priority ' + updated.priority + ', etag changed ' + (updated.etag !== stale));
  got.priority = 25;
  await registry.updateConfiguration(got).then(function () {
    console.log('stale etag: no error');
  }, function (err) {
    console.log('stale etag: ' + err.constructor.name);
  });
  got.priority = 30;
  var forced = (await registry.updateConfiguration(got, true).catch(fail('updateConfiguration forced'))).responseBody;
  console.log('forced priority ' + forced.priority);

  await registry.applyConfigurationContentOnDevice(deviceId, { deviceContent: { 'properties.desired.mode': 'eco' } })
    .catch(fail('applyConfigurationContentOnDevice'));
  console.log('applied to ' + deviceId);
}

async function remove() {
  await registry.removeConfiguration(id).catch(fail('removeConfiguration'));
  console.log('removed ' + id);
  await registry.getConfiguration(id).then(function () {
    console.log('get after remove: no error');
  }, function (err) {
    console.log('get after remove: ' + err.message);
  });
}

(mode === 'remove' ? remove() : create()).catch(fail(mode));
