'use strict';
// A query read page by page through the service SDK. Only the connection
// string comes from outside (IOTHUB_CONNECTION_STRING); the query and the
// page size are the arguments.
var iothub = require('azure-iothub');

var registry = iothub.Registry.fromConnectionString(process.env.IOTHUB_CONNECTION_STRING);
var query = registry.createQuery(process.argv[2], parseInt(process.argv[3], 10));

function nextPage(page) {
  query.nextAsTwin(function (err, twins) {
    if (err) {
      console.log('query failed: ' + err.constructor.name + ': ' + err.message);
      process.exit(1);
    }
    console.log('page ' + page + ': ' + twins.map(function (t) { return t.deviceId; }).join(','));
    if (query.hasMoreResults) {
      nextPage(page + 1);
    } else {
      console.log('done');
    }
  });
}
nextPage(1);
