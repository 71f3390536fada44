'use strict';
// A long-running device: it opens a client, gets its twin, prints every
// desired-property change it is sent, and reports what it is told to on
// stdin, one command per line:
//   report <json>   report a reported-properties patch
//   exit            close the client and exit
// Only the connection string comes from outside (DEVICE_CONNECTION_STRING).
var readline = require('readline');
var Client = require('azure-iot-device').Client;
var Protocol = require('azure-iot-device-mqtt').Mqtt;

var client = Client.fromConnectionString(process.env.DEVICE_CONNECTION_STRING, Protocol);

client.on('connect', function () { console.log('connected'); });
client.on('disconnect', function () { console.log('disconnected (the retry policy gave up)'); });
client.on('error', function (err) { console.log('client error: ' + err.message); });

client.open(function (err) {
  if (err) {
    console.error('could not open IotHub client: ' + err.message);
    process.exit(1);
  }
  console.log('client opened');
  client.getTwin(function (err, twin) {
    if (err) {
      console.error('could not get twin: ' + err.message);
      process.exit(1);
    }
    console.log('twin: desired version ' + twin.properties.desired.$version + ', reported version ' + twin.properties.reported.$version);
    twin.on('properties.desired', function (delta) {
      console.log('desired: ' + JSON.stringify(delta));
    });
    var rl = readline.createInterface({ input: process.stdin });
    rl.on('line', function (line) {
      var space = line.indexOf(' ');
      var cmd = space < 0 ? line : line.substring(0, space);
      var arg = space < 0 ? '' : line.substring(space + 1);
      if (cmd === 'report') {
        twin.properties.reported.update(JSON.parse(arg), function (err) {
          if (err) {
            console.log('report failed: ' + err.constructor.name + ': ' + err.message);
          } else {
            console.log('reported ' + arg);
          }
        });
      } else if (cmd === 'exit') {
        client.close(function () { process.exit(0); });
      }
    });
    console.log('ready');
  });
});
