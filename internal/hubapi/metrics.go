package hubapi

import (
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

// Metrics of the service API, registered on controller-runtime's
// metrics.Registry (served on the manager's metrics endpoint).
var (
	// requestsTotal is kubetwin_service_requests_total{operation,code}:
	// requests served, by operation (twinGet, twinUpdate, twinReplace,
	// query, deviceGet, deviceList, deviceCreate, deviceUpdate,
	// deviceDelete, or unknown for a request that matched no API) and HTTP
	// status code of the reply ("200", "401", "412"...).
	requestsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "kubetwin", Subsystem: "service", Name: "requests_total",
		Help: "Requests to the IoT Hub service API, by operation and HTTP status code.",
	}, []string{"operation", "code"})

	// requestDuration is
	// kubetwin_service_request_duration_seconds{operation}: the time from
	// a request's arrival to its reply, authentication, API server calls
	// and waiting for the cache included.
	requestDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: "kubetwin", Subsystem: "service", Name: "request_duration_seconds",
		Help:    "Time to serve a request to the IoT Hub service API, by operation.",
		Buckets: prometheus.ExponentialBuckets(0.001, 2, 15),
	}, []string{"operation"})

	// queryDuration is kubetwin_query_duration_seconds: the time the server
	// spends answering one page of a query (listing the cached twins,
	// rendering and evaluating them, paging), one observation per page.
	queryDuration = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "kubetwin", Subsystem: "query", Name: "duration_seconds",
		Help:    "Server-side time to answer one page of an IoT Hub query.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
	})
)

func init() {
	metrics.Registry.MustRegister(requestsTotal, requestDuration, queryDuration)
}
