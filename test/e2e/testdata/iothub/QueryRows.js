'use strict';
// A projection or aggregate query read page by page through the service
// SDK with query.next(callback), as IoT Hub's guide pages raw rows. Only
// the connection string comes from outside (IOTHUB_CONNECTION_STRING);
// the query and the page size are the arguments.
var iothub = require('azure-iothub');

var registry = iothub.Registry.fromConnectionString(process.env.IOTHUB_CONNECTION_STRING);
var query = registry.createQuery(process.argv[2], parseInt(process.argv[3], 10));
var maxPages = 50;

function nextPage(page) {
  query.next(function (err, rows) {
    if (err) {
      console.log('query failed: ' + err.constructor.name + ': ' + err.message);
      process.exit(1);
    }
    console.log('page ' + page + ': ' + JSON.stringify(rows));
    if (!query.hasMoreResults) {
      console.log('done');
    } else if (page >= maxPages) {
      console.log('still more results after ' + maxPages + ' pages');
      process.exit(1);
    } else {
      nextPage(page + 1);
    }
  });
}
nextPage(1);
