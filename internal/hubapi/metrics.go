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

	// queriesInFlight is kubetwin_service_queries_in_flight: queries
	// running (at most Options.MaxConcurrentQueries).
	queriesInFlight = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "kubetwin", Subsystem: "service", Name: "queries_in_flight",
		Help: "IoT Hub queries being answered, from reading the request to sending the page.",
	})

	// queriesThrottled is kubetwin_service_queries_throttled_total:
	// queries refused with 429 because MaxConcurrentQueries were running.
	queriesThrottled = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "kubetwin", Subsystem: "service", Name: "queries_throttled_total",
		Help: "IoT Hub queries refused with 429 ThrottlingException because the most allowed were running.",
	})

	// queryPagesCut is kubetwin_service_query_pages_cut_total: pages that
	// ended before x-ms-max-item-count items because the next item would
	// have taken them past MaxQueryPageBytes.
	queryPagesCut = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "kubetwin", Subsystem: "service", Name: "query_pages_cut_total",
		Help: "IoT Hub query pages that ended early at the page byte limit (the client follows the continuation token).",
	})

	// queriesTooLarge is kubetwin_service_queries_too_large_total:
	// queries of groups refused because their groups held more than
	// groupBytesPerPage × MaxQueryPageBytes.
	queriesTooLarge = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "kubetwin", Subsystem: "service", Name: "queries_too_large_total",
		Help: "IoT Hub queries of groups refused with 400 because their groups held more than 8 times the page byte limit.",
	})

	// unauthorizedTotal is kubetwin_service_unauthorized_total{reason}:
	// requests refused with 401, by why (noToken, malformedToken,
	// deviceToken, otherHub, expired, lifetimeTooLong, unknownPolicy,
	// invalidPolicy, badSignature, outOfScope, missingRight). The client
	// is told only "Unauthorized"; the log line has the details.
	unauthorizedTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "kubetwin", Subsystem: "service", Name: "unauthorized_total",
		Help: "Requests to the IoT Hub service API refused with 401, by reason.",
	}, []string{"reason"})

	// policyReads is kubetwin_service_policy_reads_total{result}: reads of
	// the shared access policies Secret, by result ("ok", "error"; a read
	// that times out is an error).
	policyReads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "kubetwin", Subsystem: "service", Name: "policy_reads_total",
		Help: "Reads of the shared access policies Secret from the API server, by result (ok, error).",
	}, []string{"result"})
)

func init() {
	metrics.Registry.MustRegister(requestsTotal, requestDuration, queryDuration, queriesInFlight, queriesThrottled,
		queryPagesCut, queriesTooLarge, policyReads, unauthorizedTotal)
}
