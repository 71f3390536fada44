'use strict';
// The device half of IoT Hub's "get started with device twins" scenario:
// connect, get the twin, report the connectivity type.
// Only the connection string comes from outside (DEVICE_CONNECTION_STRING).
var Client = require('azure-iot-device').Client;
// MQTT, or with the argument "ws" MQTT over WebSockets (wss://<hub>:443/$iothub/websocket).
var Protocol = process.argv[2] === 'ws' ? require('azure-iot-device-mqtt').MqttWs : require('azure-iot-device-mqtt').Mqtt;

var connectionString = process.env.DEVICE_CONNECTION_STRING;
var client = Client.fromConnectionString(connectionString, Protocol);

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
    var patch = {
      connectivity: {
        type: 'cellular'
      }
    };
    twin.properties.reported.update(patch, function (err) {
      if (err) {
        console.error('could not update twin: ' + err.message);
        process.exit(1);
      }
      console.log('twin state reported');
      process.exit();
    });
  });
});
