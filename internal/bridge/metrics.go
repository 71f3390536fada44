package bridge

import (
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"
)

const subsystem = "kubetwin_bridge"

var (
	messagesReceived = prometheus.NewCounterVec(prometheus.CounterOpts{
		Subsystem: subsystem, Name: "messages_received_total",
		Help: "Device messages received, by kind (get, reported, ack, presence).",
	}, []string{"kind"})
	reportsRefused = prometheus.NewCounter(prometheus.CounterOpts{
		Subsystem: subsystem, Name: "messages_refused_total",
		Help: "Device messages refused because they broke the protocol or the twin rules.",
	})
	reportsThrottled = prometheus.NewCounter(prometheus.CounterOpts{
		Subsystem: subsystem, Name: "reports_throttled_total",
		Help: "Reported patches refused with 429 because too many of the device's reports were waiting to be stored.",
	})
	reportsPersisted = prometheus.NewCounter(prometheus.CounterOpts{
		Subsystem: subsystem, Name: "messages_persisted_total",
		Help: "Device messages whose effect was written to the Kubernetes API and acknowledged.",
	})
	reportLatency = prometheus.NewHistogram(prometheus.HistogramOpts{
		Subsystem: subsystem, Name: "persist_latency_seconds",
		Help:    "Time from a device message's arrival to its acknowledgement after persistence.",
		Buckets: prometheus.ExponentialBuckets(0.001, 2, 15),
	})
	desiredNotifications = prometheus.NewCounter(prometheus.CounterOpts{
		Subsystem: subsystem, Name: "desired_notifications_total",
		Help: "Desired-property change notifications published to devices.",
	})
	connectedDevices = prometheus.NewGauge(prometheus.GaugeOpts{
		Subsystem: subsystem, Name: "connected_devices",
		Help: "Devices currently connected (from birth and last-will messages, or the embedded broker's own events).",
	})
	reportsCoalesced = prometheus.NewCounter(prometheus.CounterOpts{
		Subsystem: subsystem, Name: "reports_coalesced_total",
		Help: "Reported patches that shared a status write with an earlier one (reports persisted minus the writes that carried them).",
	})
	pendingMessages = prometheus.NewGauge(prometheus.GaugeOpts{
		Subsystem: subsystem, Name: "pending_reports",
		Help: "Device messages (reports, and at most one presence and one ack message per device) waiting to be stored, over all devices; bounded per device by --max-pending-reports.",
	})
	pendingBytes = prometheus.NewGauge(prometheus.GaugeOpts{
		Subsystem: subsystem, Name: "pending_report_bytes",
		Help: "Payload bytes of the device messages waiting to be stored, over all devices; bounded per device by --max-pending-report-bytes.",
	})
	reportsTooLarge = prometheus.NewCounter(prometheus.CounterOpts{
		Subsystem: subsystem, Name: "reports_too_large_total",
		Help: "Reported patches refused with 400 for size: the patch itself, or the reported section it would make (also counted in messages_refused_total).",
	})
	twinsInMemory = prometheus.NewGauge(prometheus.GaugeOpts{
		Subsystem: subsystem, Name: "twins_in_memory",
		Help: "Twins whose working state the bridge holds in memory; the state of idle twins is dropped after --bridge-idle-state-ttl.",
	})
	idleStatesDropped = prometheus.NewCounter(prometheus.CounterOpts{
		Subsystem: subsystem, Name: "idle_states_dropped_total",
		Help: "Working states of idle twins dropped from memory (after --bridge-idle-state-ttl unused).",
	})
	idleStatesReloaded = prometheus.NewCounter(prometheus.CounterOpts{
		Subsystem: subsystem, Name: "idle_states_reloaded_total",
		Help: "Working states loaded again from the cached status after they were dropped; close to the drops, the TTL is too short.",
	})
	// StatusWrites counts status patches the operator sent, by result.
	StatusWrites = prometheus.NewCounterVec(prometheus.CounterOpts{
		Subsystem: subsystem, Name: "status_writes_total",
		Help: "DeviceTwin status patches sent to the API server, by result (ok, error).",
	}, []string{"result"})
	// StatusWriteSeconds is how long status writes take the API server to
	// answer (with the wait for a connection and client-side throttling):
	// near capacity, the part of the persist latency that is the API
	// server's.
	StatusWriteSeconds = prometheus.NewHistogram(prometheus.HistogramOpts{
		Subsystem: subsystem, Name: "status_write_duration_seconds",
		Help:    "Time a DeviceTwin status write took, request to answer (ok or not).",
		Buckets: prometheus.ExponentialBuckets(0.001, 2, 15),
	})
)

func init() {
	metrics.Registry.MustRegister(messagesReceived, reportsRefused, reportsThrottled, connectedDevices, reportsCoalesced, reportsPersisted, reportLatency, desiredNotifications, StatusWrites,
		StatusWriteSeconds, pendingMessages, pendingBytes, reportsTooLarge,
		twinsInMemory, idleStatesDropped, idleStatesReloaded)
}
