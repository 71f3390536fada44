package hubapi

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/manager"
)

// Timeouts of the HTTPS server.
const (
	readHeaderTimeout = 10 * time.Second
	readTimeout       = 30 * time.Second
	writeTimeout      = requestTimeout + 15*time.Second
	idleTimeout       = 120 * time.Second
	maxHeaderBytes    = 64 << 10
	// DefaultShutdownTimeout is how long requests in flight may take to
	// finish once the server is told to stop.
	DefaultShutdownTimeout = 15 * time.Second
)

// ServerOptions configures a [Server].
type ServerOptions struct {
	// Addr is the address to listen on, e.g. ":8443" or "127.0.0.1:0".
	Addr string
	// TLSConfig is the server's TLS configuration (with a certificate, or
	// GetCertificate); required: the API is served over HTTPS only. It is
	// cloned, and limited to HTTP/1.1 (the service SDKs use HTTP/1.1) and
	// TLS 1.2 or newer.
	TLSConfig *tls.Config
	// Handler serves the requests (a *Handler).
	Handler http.Handler
	// Logger receives the server's own messages.
	Logger logr.Logger
	// ShutdownTimeout bounds the graceful shutdown
	// (DefaultShutdownTimeout).
	ShutdownTimeout time.Duration
}

// Server serves a Handler over HTTPS. It is a manager.Runnable that runs
// on every replica (not only the leader): the API reads from the cache and
// writes with preconditions, so replicas can serve side by side.
type Server struct {
	opts ServerOptions

	mu      sync.Mutex
	addr    net.Addr
	serving bool
	ready   chan struct{}
}

var (
	_ manager.Runnable               = (*Server)(nil)
	_ manager.LeaderElectionRunnable = (*Server)(nil)
	_ healthz.Checker                = (*Server)(nil).ReadyCheck
)

// NewServer returns a Server; Addr, TLSConfig and Handler are required.
func NewServer(o ServerOptions) (*Server, error) {
	switch {
	case o.Addr == "":
		return nil, errors.New("hubapi: server address is required")
	case o.TLSConfig == nil:
		return nil, errors.New("hubapi: a TLS configuration is required (the service API is served over HTTPS only)")
	case o.Handler == nil:
		return nil, errors.New("hubapi: a handler is required")
	}
	if o.ShutdownTimeout <= 0 {
		o.ShutdownTimeout = DefaultShutdownTimeout
	}
	if o.Logger.GetSink() == nil {
		o.Logger = logr.Discard()
	}
	return &Server{opts: o, ready: make(chan struct{})}, nil
}

// NeedLeaderElection returns false: every replica serves the API.
func (s *Server) NeedLeaderElection() bool { return false }

// Start listens and serves until ctx ends, then shuts down gracefully:
// it stops accepting connections and waits (at most ShutdownTimeout) for
// the requests in flight.
func (s *Server) Start(ctx context.Context) error {
	cfg := s.opts.TLSConfig.Clone()
	cfg.NextProtos = []string{"http/1.1"}
	if cfg.MinVersion < tls.VersionTLS12 {
		cfg.MinVersion = tls.VersionTLS12
	}
	ln, err := net.Listen("tcp", s.opts.Addr)
	if err != nil {
		return fmt.Errorf("hubapi: listening on %s: %w", s.opts.Addr, err)
	}
	srv := &http.Server{
		Handler:           s.opts.Handler,
		ReadHeaderTimeout: readHeaderTimeout,
		ReadTimeout:       readTimeout,
		WriteTimeout:      writeTimeout,
		IdleTimeout:       idleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		// A non-nil, empty map turns HTTP/2 off.
		TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
		ErrorLog:     log.New(logWriter{s.opts.Logger}, "", 0),
		BaseContext:  func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	s.mu.Lock()
	s.addr, s.serving = ln.Addr(), true
	close(s.ready)
	s.mu.Unlock()
	s.opts.Logger.Info("serving the IoT Hub service API", "address", ln.Addr().String())

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(tls.NewListener(ln, cfg)) }()
	select {
	case err := <-errc:
		s.stopped()
		return fmt.Errorf("hubapi: serving: %w", err)
	case <-ctx.Done():
	}
	s.stopped()
	sctx, cancel := context.WithTimeout(context.Background(), s.opts.ShutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		_ = srv.Close()
		return fmt.Errorf("hubapi: shutting down: %w", err)
	}
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("hubapi: serving: %w", err)
	}
	return nil
}

func (s *Server) stopped() {
	s.mu.Lock()
	s.serving = false
	s.mu.Unlock()
}

// Ready is closed once the server listens.
func (s *Server) Ready() <-chan struct{} { return s.ready }

// Addr returns the address the server listens on ("" before it does):
// the actual port when Addr asked for port 0.
func (s *Server) Addr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.addr == nil {
		return ""
	}
	return s.addr.String()
}

// ReadyCheck is a healthz.Checker for the manager's readiness endpoint
// (mgr.AddReadyzCheck("service-api", srv.ReadyCheck)): it fails until the
// server listens and after it has stopped.
func (s *Server) ReadyCheck(*http.Request) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.serving {
		return errors.New("the IoT Hub service API is not listening")
	}
	return nil
}

// logWriter passes net/http's server messages (TLS handshake errors and
// the like) to a logr.Logger at V(1).
type logWriter struct{ log logr.Logger }

func (w logWriter) Write(p []byte) (int, error) {
	w.log.V(1).Info("https server", "message", strings.TrimSpace(string(p)))
	return len(p), nil
}
