// Command device-sim simulates one or many kubetwin devices over MQTT using
// the pkg/device library: each device connects, gets its twin, optionally
// reports a patch, mirrors desired properties into reported ones, and
// periodically reports a changing value for load.
//
// Examples:
//
//	device-sim --id myDeviceId --report '{"connectivity":{"type":"cellular"}}'
//	device-sim --id myDeviceId --apply-desired
//	device-sim --count 1000 --prefix sim- --interval 5s --report-field telemetry.counter --quiet --duration 10m
//	device-sim --connection-string "$(kubectl get secret mydeviceid-device-key -o jsonpath='{.data.connectionString}' | base64 -d)" \
//	    --broker ssl://127.0.0.1:8883 --ca-file ca.crt --apply-desired
//
// With --connection-string (or --sas-key and --hub-hostname) a device
// authenticates as an IoT Hub device does: with a SAS token signed with its
// key as the MQTT password (what the operator's embedded broker requires).
//
// It exits non-zero if a device cannot connect (or a report is refused), and
// closes every device cleanly on SIGINT or SIGTERM.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"

	"github.com/kubetwin/kubetwin/pkg/device"
)

// config is the parsed command line.
type config struct {
	broker         string
	username       string
	password       string
	sasKey         string
	hubHostname    string
	tokenValidity  time.Duration
	tlsConfig      *tls.Config
	id             string
	count          int
	prefix         string
	report         map[string]any
	applyDesired   bool
	interval       time.Duration
	reportField    []string
	reportValue    string
	duration       time.Duration
	quiet          bool
	parallel       int
	requestTimeout time.Duration
	verbosity      int
}

func main() {
	cfg, err := parseFlags(os.Args[1:], os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "device-sim:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, cfg, os.Stdout, os.Stderr))
}

func parseFlags(args []string, errOut io.Writer) (config, error) {
	var cfg config
	var report, field, connectionString, caFile string
	fs := flag.NewFlagSet("device-sim", flag.ContinueOnError)
	fs.SetOutput(errOut)
	fs.StringVar(&cfg.broker, "broker", "tcp://127.0.0.1:1883", "MQTT broker URL (tcp://, ssl://, ws://)")
	fs.StringVar(&cfg.username, "username", "", "MQTT user name")
	fs.StringVar(&cfg.password, "password", os.Getenv("DEVICE_SIM_PASSWORD"), "MQTT password (default $DEVICE_SIM_PASSWORD)")
	fs.StringVar(&connectionString, "connection-string", os.Getenv("DEVICE_SIM_CONNECTION_STRING"),
		"the device's IoT Hub connection string HostName=...;DeviceId=...;SharedAccessKey=... (default $DEVICE_SIM_CONNECTION_STRING): "+
			"sets --id, --sas-key, --hub-hostname and, unless given, --broker ssl://<HostName>:8883")
	fs.StringVar(&cfg.sasKey, "sas-key", os.Getenv("DEVICE_SIM_SAS_KEY"),
		"authenticate with SAS tokens signed with this device key (base64; default $DEVICE_SIM_SAS_KEY); needs --hub-hostname")
	fs.StringVar(&cfg.hubHostname, "hub-hostname", "", "the hub host name the SAS tokens are for (the operator's --hub-hostname)")
	fs.DurationVar(&cfg.tokenValidity, "token-validity", device.DefaultTokenValidity, "how long each SAS token is valid; the device reconnects with a new one when it expires")
	fs.StringVar(&caFile, "ca-file", "", "PEM CA bundle to verify an ssl:// broker (e.g. ca.crt of the ConfigMap kubetwin-mqtt-ca); default: the system's")
	fs.StringVar(&cfg.id, "id", "", "simulate the single device with this id")
	fs.IntVar(&cfg.count, "count", 0, "simulate this many devices, named <prefix>0000, <prefix>0001, ...")
	fs.StringVar(&cfg.prefix, "prefix", "sim-", "device id prefix for --count")
	fs.StringVar(&report, "report", "", "a reported JSON merge patch each device sends once after connecting")
	fs.BoolVar(&cfg.applyDesired, "apply-desired", false, "report desired properties back as they change, so the twin converges")
	fs.DurationVar(&cfg.interval, "interval", 0, "report --report-field every interval (0: never)")
	fs.StringVar(&field, "report-field", "", "dotted path of the reported property --interval changes, e.g. telemetry.counter")
	fs.StringVar(&cfg.reportValue, "report-value", "counter", "value --interval reports: counter (1, 2, ...) or time (RFC 3339)")
	fs.DurationVar(&cfg.duration, "duration", 0, "stop after this long (0: run until SIGINT/SIGTERM)")
	fs.BoolVar(&cfg.quiet, "quiet", false, "print only errors and the final summary")
	fs.IntVar(&cfg.parallel, "parallel", 32, "devices connecting at the same time")
	fs.DurationVar(&cfg.requestTimeout, "request-timeout", device.DefaultRequestTimeout, "wait this long for the operator's response before resending")
	fs.IntVar(&cfg.verbosity, "v", 0, "log verbosity of the device library on stderr (1: per-message detail)")
	fs.Usage = func() {
		fmt.Fprintln(errOut, "Usage: device-sim (--id ID | --count N [--prefix P]) [flags]")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if err := cfg.security(fs, connectionString, caFile); err != nil {
		return cfg, err
	}
	switch {
	case cfg.id != "" && cfg.count > 0:
		return cfg, errors.New("use either --id or --count, not both")
	case cfg.id == "" && cfg.count <= 0:
		return cfg, errors.New("say which devices to simulate: --id ID or --count N")
	}
	if report != "" {
		m, err := decodeObject(report)
		if err != nil {
			return cfg, fmt.Errorf("--report: %w", err)
		}
		cfg.report = m
	}
	if field != "" {
		cfg.reportField = strings.Split(field, ".")
		for _, k := range cfg.reportField {
			if k == "" {
				return cfg, fmt.Errorf("--report-field %q has an empty path element", field)
			}
		}
	}
	if cfg.interval < 0 {
		return cfg, errors.New("--interval must not be negative")
	}
	if cfg.interval > 0 && cfg.reportField == nil {
		return cfg, errors.New("--interval needs --report-field")
	}
	if cfg.reportValue != "counter" && cfg.reportValue != "time" {
		return cfg, fmt.Errorf("--report-value must be counter or time, not %q", cfg.reportValue)
	}
	if cfg.parallel < 1 {
		cfg.parallel = 1
	}
	return cfg, nil
}

// security applies --connection-string, --sas-key and --ca-file.
func (cfg *config) security(fs *flag.FlagSet, connectionString, caFile string) error {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if connectionString != "" {
		o, err := device.ConnectionStringOptions(connectionString, "")
		if err != nil {
			return fmt.Errorf("--connection-string: %w", err)
		}
		if cfg.id != "" && cfg.id != o.DeviceID {
			return fmt.Errorf("--id %s differs from the connection string's DeviceId %s", cfg.id, o.DeviceID)
		}
		cfg.id, cfg.sasKey, cfg.hubHostname = o.DeviceID, o.SharedAccessKey, o.HubHostname
		if !set["broker"] {
			cfg.broker = o.BrokerURL
		}
	}
	if cfg.sasKey != "" {
		switch {
		case cfg.hubHostname == "":
			return errors.New("--sas-key needs --hub-hostname")
		case cfg.count > 0:
			return errors.New("--sas-key and --connection-string are for one device (--id): every device has its own key")
		}
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return fmt.Errorf("--ca-file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("--ca-file %s holds no PEM certificate", caFile)
		}
		cfg.tlsConfig = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool}
	}
	return nil
}

// decodeObject parses a JSON object, keeping numbers as json.Number.
func decodeObject(s string) (map[string]any, error) {
	dec := json.NewDecoder(strings.NewReader(s))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, fmt.Errorf("not a JSON object: %w", err)
	}
	if m == nil {
		return nil, errors.New("not a JSON object: null")
	}
	if dec.More() {
		return nil, errors.New("trailing data after the JSON object")
	}
	return m, nil
}

// deviceIDs lists the simulated device ids.
func (cfg config) deviceIDs() []string {
	if cfg.id != "" {
		return []string{cfg.id}
	}
	width := max(4, len(strconv.Itoa(cfg.count-1)))
	ids := make([]string, cfg.count)
	for i := range ids {
		ids[i] = fmt.Sprintf("%s%0*d", cfg.prefix, width, i)
	}
	return ids
}

// sim holds what all devices share.
type sim struct {
	cfg    config
	log    logr.Logger
	outMu  sync.Mutex
	out    io.Writer
	errOut io.Writer

	connected atomic.Int64
	reports   atomic.Int64
	failed    atomic.Int64
	updates   atomic.Int64
}

// say prints a progress line unless --quiet.
func (s *sim) say(format string, args ...any) {
	if s.cfg.quiet {
		return
	}
	s.outMu.Lock()
	defer s.outMu.Unlock()
	fmt.Fprintf(s.out, format+"\n", args...)
}

// complain prints an error line.
func (s *sim) complain(format string, args ...any) {
	s.outMu.Lock()
	defer s.outMu.Unlock()
	fmt.Fprintf(s.errOut, format+"\n", args...)
}

func run(ctx context.Context, cfg config, out, errOut io.Writer) int {
	s := &sim{cfg: cfg, out: out, errOut: errOut}
	s.log = funcr.New(func(prefix, args string) {
		s.outMu.Lock()
		defer s.outMu.Unlock()
		fmt.Fprintln(errOut, args)
	}, funcr.Options{Verbosity: cfg.verbosity})

	if cfg.duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, cfg.duration)
		defer cancel()
	}
	ctx, cancelAll := context.WithCancelCause(ctx)
	defer cancelAll(nil)

	start := time.Now()
	ids := cfg.deviceIDs()
	sem := make(chan struct{}, cfg.parallel)
	var wg sync.WaitGroup
	for _, id := range ids {
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Go(func() {
			s.device(ctx, id, sem, cancelAll)
		})
	}
	wg.Wait()

	code := 0
	if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) && !errors.Is(cause, context.DeadlineExceeded) {
		s.complain("device-sim: %v", cause)
		code = 1
	}
	if s.failed.Load() > 0 && code == 0 {
		code = 1
	}
	if len(ids) > 1 || cfg.quiet {
		s.outMu.Lock()
		fmt.Fprintf(out, "device-sim: %d/%d devices connected, %d reports stored, %d failed, %d desired updates, %s\n",
			s.connected.Load(), len(ids), s.reports.Load(), s.failed.Load(), s.updates.Load(), time.Since(start).Round(time.Millisecond))
		s.outMu.Unlock()
	}
	return code
}

// device runs one simulated device until ctx ends. A connection failure
// stops the whole simulation through fail.
func (s *sim) device(ctx context.Context, id string, sem chan struct{}, fail context.CancelCauseFunc) {
	updates := make(chan device.Update, 16)
	c, err := device.Connect(ctx, device.Options{
		BrokerURL:       s.cfg.broker,
		DeviceID:        id,
		Username:        s.cfg.username,
		Password:        s.cfg.password,
		SharedAccessKey: s.cfg.sasKey,
		HubHostname:     s.cfg.hubHostname,
		TokenValidity:   s.cfg.tokenValidity,
		TLSConfig:       s.cfg.tlsConfig,
		Logger:          s.log,
		RequestTimeout:  s.cfg.requestTimeout,
		OnDesired: func(u device.Update) {
			// Hand over to the device loop; waiting here holds back later
			// desired versions (and their acks) until it has caught up.
			select {
			case updates <- u:
			case <-ctx.Done():
			}
		},
	})
	<-sem
	if err != nil {
		if ctx.Err() == nil {
			fail(err)
		}
		return
	}
	defer func() {
		if err := c.Close(); err != nil {
			s.complain("%s: close: %v", id, err)
		}
		s.say("%s: disconnected", id)
	}()
	s.connected.Add(1)
	desired, version := c.Desired()
	s.say("%s: connected, desired v%d %s", id, version, compact(desired))

	if s.cfg.report != nil {
		s.report(ctx, c, s.cfg.report)
	}

	var tick <-chan time.Time
	if s.cfg.interval > 0 {
		t := time.NewTicker(s.cfg.interval)
		defer t.Stop()
		tick = t.C
	}
	var counter int64
	for {
		select {
		case <-ctx.Done():
			return
		case u := <-updates:
			s.updates.Add(1)
			if u.Version > version { // the connect state was printed already
				if u.Patch != nil {
					s.say("%s: desired v%d patch %s", id, u.Version, compact(u.Patch))
				} else {
					s.say("%s: desired v%d document %s", id, u.Version, compact(u.Desired))
				}
				version = u.Version
			}
			if s.cfg.applyDesired {
				// A patch is mirrored as is (its nulls delete the same
				// reported keys); a whole document is reported whole.
				patch := u.Patch
				if patch == nil {
					patch = u.Desired
				}
				if len(patch) > 0 {
					s.report(ctx, c, patch)
				}
			}
		case now := <-tick:
			counter++
			var v any = counter
			if s.cfg.reportValue == "time" {
				v = now.UTC().Format(time.RFC3339Nano)
			}
			s.report(ctx, c, nest(s.cfg.reportField, v))
		}
	}
}

// report sends one reported patch and prints the outcome.
func (s *sim) report(ctx context.Context, c *device.Client, patch map[string]any) {
	v, err := c.Report(ctx, patch)
	switch {
	case err == nil:
		s.reports.Add(1)
		s.say("%s: reported %s -> reported v%d", c.DeviceID(), compact(patch), v)
	case ctx.Err() != nil:
		// Shutting down; the outcome is unknown, not a failure.
	default:
		s.failed.Add(1)
		s.complain("%s: report %s failed: %v", c.DeviceID(), compact(patch), err)
	}
}

// nest builds {"a":{"b":v}} from the path a.b.
func nest(path []string, v any) map[string]any {
	m := map[string]any{path[len(path)-1]: v}
	for i := len(path) - 2; i >= 0; i-- {
		m = map[string]any{path[i]: m}
	}
	return m
}

// compact renders a document as one line of JSON.
func compact(m map[string]any) string {
	if m == nil {
		m = map[string]any{}
	}
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(m); err != nil {
		return fmt.Sprintf("%v", m)
	}
	return strings.TrimSuffix(buf.String(), "\n")
}
