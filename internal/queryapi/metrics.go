package queryapi

import (
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

// Metrics of the query API, on controller-runtime's metrics.Registry.
var (
	// requestsTotal is kubetwin_queryapi_requests_total{code}: requests
	// (discovery and queries) by HTTP status code.
	requestsTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "kubetwin", Subsystem: "queryapi", Name: "requests_total",
		Help: "Requests to the query.kubetwin.io aggregated API, by HTTP status code.",
	}, []string{"code"})

	// queryDuration is kubetwin_queryapi_query_duration_seconds: the time
	// to answer one admitted query from the cache (listing, evaluating,
	// sorting, encoding).
	queryDuration = prometheus.NewHistogram(prometheus.HistogramOpts{
		Namespace: "kubetwin", Subsystem: "queryapi", Name: "query_duration_seconds",
		Help:    "Time to answer one query of the query.kubetwin.io API from the operator's cache.",
		Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
	})

	// queriesInFlight is kubetwin_queryapi_queries_in_flight (at most
	// --query-api-max-concurrent-queries).
	queriesInFlight = prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: "kubetwin", Subsystem: "queryapi", Name: "queries_in_flight",
		Help: "Queries of the query.kubetwin.io API being answered.",
	})

	// queriesThrottled is kubetwin_queryapi_queries_throttled_total:
	// queries refused with 429 because the most allowed were running.
	queriesThrottled = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "kubetwin", Subsystem: "queryapi", Name: "queries_throttled_total",
		Help: "Queries of the query.kubetwin.io API refused with 429 because --query-api-max-concurrent-queries were running.",
	})

	// responsesTooLarge is kubetwin_queryapi_responses_too_large_total:
	// answers refused for exceeding --query-api-max-response-bytes (or
	// whose groups held more while they were computed).
	responsesTooLarge = prometheus.NewCounter(prometheus.CounterOpts{
		Namespace: "kubetwin", Subsystem: "queryapi", Name: "responses_too_large_total",
		Help: "Queries of the query.kubetwin.io API refused because the answer, or its groups while they were computed, exceeded --query-api-max-response-bytes.",
	})
)

func init() {
	metrics.Registry.MustRegister(requestsTotal, queryDuration, queriesInFlight, queriesThrottled, responsesTooLarge)
}
