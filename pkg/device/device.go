// Package device is the device side of kubetwin's MQTT topic protocol (see
// package protocol and docs/protocol.md): a small library for firmware and
// tools that keeps a local copy of a device's desired properties in step with
// its DeviceTwin and reports the device's state back.
//
// A Client follows the device flow of the twin contract:
//
//  1. Connect with a persistent session (clean session false) and a retained
//     last will {"online":false} on the presence topic.
//  2. On every connect and reconnect: subscribe to responses and desired
//     changes, publish the retained birth {"online":true}, then GET the twin,
//     so a device that was offline ends up with the latest desired state.
//     It also watches its own presence topic and republishes the birth if
//     the broker sends an old connection's will after it.
//  3. Apply desired changes in version order. A notification whose $version
//     is not newer than the local copy is ignored; a patch that skips a
//     version means a notification was missed, so the client GETs the twin
//     instead of applying it. Each applied version is handed to
//     Options.OnDesired and then acknowledged on the ack topic.
//  4. Report state with Client.Report, which returns once the operator has
//     stored the patch in the Kubernetes API.
//
// A minimal device:
//
//	c, err := device.Connect(ctx, device.Options{
//		BrokerURL: "tcp://broker:1883",
//		DeviceID:  "myDeviceId",
//		OnDesired: func(u device.Update) { applyConfig(u.Desired) },
//	})
//	if err != nil {
//		return err
//	}
//	defer c.Close()
//	_, err = c.Report(ctx, map[string]any{"connectivity": map[string]any{"type": "cellular"}})
//
// A device of the kubetwin operator's embedded broker authenticates with
// its keys, like an Azure IoT Hub device: build the Options from its
// connection string (the connectionString of the Secret <twin>-device-key)
// and trust the broker's CA (ca.crt of the ConfigMap kubetwin-mqtt-ca):
//
//	o, err := device.ConnectionStringOptions(connectionString, "ssl://broker:8883")
//	o.TLSConfig = &tls.Config{RootCAs: pool}
//
// Numbers in desired and reported documents are json.Number values.
package device

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
	"github.com/go-logr/logr"

	"github.com/kubetwin/kubetwin/pkg/protocol"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// DefaultRequestTimeout is the Options.RequestTimeout used when it is zero.
const DefaultRequestTimeout = 10 * time.Second

// DefaultTokenValidity is the Options.TokenValidity used when it is zero.
const DefaultTokenValidity = time.Hour

// APIVersion is the api-version the client puts in its username when it
// authenticates with a SharedAccessKey, as IoT Hub device SDKs do.
const APIVersion = "2021-04-12"

// Backoff bounds for retrying a twin GET after reconnecting and requests the
// operator answered with 429 or 5xx.
const (
	minRetryBackoff = 250 * time.Millisecond
	maxRetryBackoff = 30 * time.Second
)

// ErrClosed is returned by requests made on, or interrupted by, a closed Client.
var ErrClosed = errors.New("device client closed")

// ErrNoResponse is wrapped by the error of a request the operator did not
// answer in time.
var ErrNoResponse = errors.New("no response from the kubetwin operator")

// Options configures Connect.
type Options struct {
	// BrokerURL is the MQTT broker, e.g. "tcp://127.0.0.1:1883",
	// "ssl://broker:8883" or "ws://broker:80/mqtt". Required.
	BrokerURL string
	// DeviceID is the device id of the DeviceTwin. Required.
	DeviceID string
	// ClientID is the MQTT client id; it defaults to DeviceID, which is what
	// broker ACLs such as Mosquitto's "%c" patterns expect.
	ClientID string
	// Username and Password authenticate to the broker (optional). With
	// SharedAccessKey they are not used.
	Username, Password string
	// SharedAccessKey (base64, as in the device's connection string)
	// authenticates the device the way Azure IoT Hub devices do, which is
	// what the kubetwin operator's embedded broker checks: for every
	// connection attempt the client signs a fresh SAS token with it (valid
	// for TokenValidity) and connects with username
	// "<HubHostname>/<DeviceID>/?api-version=..." and the token as the
	// password. The broker disconnects the device when the token expires;
	// the client then reconnects with a new one. See
	// ConnectionStringOptions.
	SharedAccessKey string
	// HubHostname is the hub the tokens are for: the HostName of the
	// device's connection string. Required with SharedAccessKey.
	HubHostname string
	// TokenValidity is how long each SAS token is valid;
	// DefaultTokenValidity if zero.
	TokenValidity time.Duration
	// TLSConfig is used for ssl://, tls:// and wss:// brokers (optional).
	TLSConfig *tls.Config
	// OnDesired is called for every desired version the client applies, one
	// call at a time, in version order, on the client's own goroutine and
	// outside its locks; the version is acknowledged to the operator once
	// OnDesired returns. It may call Report and Get but must not call Close.
	// Desired changes that arrive meanwhile wait. Optional.
	OnDesired func(Update)
	// Logger receives connection events and problems (optional; the zero
	// value discards). V(1) adds per-message detail.
	Logger logr.Logger
	// RequestTimeout is how long to wait for the operator's response before
	// resending a request; the first twin GET in Connect fails after it.
	// Defaults to DefaultRequestTimeout.
	RequestTimeout time.Duration
}

// Update is one desired version the client applied.
type Update struct {
	// Version is the desired $version now applied.
	Version int64
	// Patch is the merge patch that produced this version (null members
	// delete), or nil when the whole document was received (the twin GET or
	// the retained desired document).
	Patch map[string]any
	// Desired is the whole desired document after applying, without $version.
	Desired map[string]any
}

// Client is a connected device. Its methods are safe for concurrent use.
type Client struct {
	opts  Options
	log   logr.Logger
	mqtt  mqtt.Client
	store *resumeStore

	// ctx ends when the client is closed.
	ctx    context.Context
	cancel context.CancelFunc

	resPrefix     string // kubetwin/v1/<id>/res/
	desiredTopic  string
	patchTopic    string
	presenceTopic string
	ridPrefix     string
	ridSeq        atomic.Uint64

	waitMu  sync.Mutex
	waiters map[string]chan protocol.Response

	qMu   sync.Mutex
	queue []event
	wake  chan struct{}

	mu      sync.Mutex
	desired map[string]any
	version int64

	first      chan error    // result of the first twin sync, for Connect
	workerDone chan struct{} // closed when run returns
	closeOnce  sync.Once
	closeErr   error

	// Owned by the worker goroutine (run).
	needSubscribe bool
	needSync      bool
	birthSent     bool // on the current connection
	birthEchoed   bool // the birth came back on the presence topic
	connections   int  // connections seen (evConnected events)
	haveTwin      bool
	firstReported bool
	nextSync      time.Time
	backoff       time.Duration
}

// Connect connects to the broker as o.DeviceID, subscribes, publishes the
// birth message and GETs the twin. It returns once the first GET succeeded,
// so Desired is populated, or with an error that says what failed: the
// broker connection (e.g. connection refused or not authorized), the
// subscription, the operator's answer (a *RequestError, e.g. status 404 when
// no DeviceTwin has this device id) or no answer within RequestTimeout
// (ErrNoResponse). After a lost connection the client reconnects by itself
// and repeats the subscribe, birth and GET.
func Connect(ctx context.Context, o Options) (*Client, error) {
	if o.BrokerURL == "" {
		return nil, errors.New("device: Options.BrokerURL is required")
	}
	if o.DeviceID == "" {
		return nil, errors.New("device: Options.DeviceID is required")
	}
	if o.ClientID == "" {
		o.ClientID = o.DeviceID
	}
	if o.RequestTimeout <= 0 {
		o.RequestTimeout = DefaultRequestTimeout
	}
	if o.TokenValidity <= 0 {
		o.TokenValidity = DefaultTokenValidity
	}
	if o.SharedAccessKey != "" {
		if o.HubHostname == "" {
			return nil, errors.New("device: Options.HubHostname is required with SharedAccessKey")
		}
		if _, err := sas.DecodeKey(o.SharedAccessKey); err != nil {
			return nil, fmt.Errorf("device: Options.SharedAccessKey: %w", err)
		}
	}
	c := &Client{
		opts:          o,
		log:           o.Logger.WithValues("deviceID", o.DeviceID),
		resPrefix:     protocol.ResponseTopic(o.DeviceID, ""),
		desiredTopic:  protocol.DesiredTopic(o.DeviceID),
		patchTopic:    protocol.DesiredPatchTopic(o.DeviceID),
		presenceTopic: protocol.PresenceTopic(o.DeviceID),
		ridPrefix:     randomHex(4),
		waiters:       map[string]chan protocol.Response{},
		wake:          make(chan struct{}, 1),
		desired:       map[string]any{},
		first:         make(chan error, 1),
		store:         newResumeStore(),
		workerDone:    make(chan struct{}),
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())

	mo := mqtt.NewClientOptions().
		AddBroker(o.BrokerURL).
		SetClientID(o.ClientID).
		SetUsername(o.Username).
		SetPassword(o.Password).
		SetCleanSession(false).
		SetStore(c.store).
		SetBinaryWill(c.presenceTopic, presencePayload(false), 1, true).
		SetAutoReconnect(true).
		SetConnectRetry(false).
		SetMaxReconnectInterval(maxRetryBackoff).
		SetConnectTimeout(o.RequestTimeout).
		SetKeepAlive(30 * time.Second).
		SetOrderMatters(true). // onMessage never blocks; order keeps desired patches in sequence
		SetDefaultPublishHandler(c.onMessage).
		SetOnConnectHandler(func(mqtt.Client) { c.push(event{kind: evConnected}) }).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) {
			c.log.Info("connection to broker lost; reconnecting", "broker", o.BrokerURL, "error", err.Error())
		})
	if o.TLSConfig != nil {
		mo.SetTLSConfig(o.TLSConfig)
	}
	if o.SharedAccessKey != "" {
		mo.SetCredentialsProvider(c.sasCredentials)
	}
	c.mqtt = mqtt.NewClient(mo)

	go c.run()

	tok := c.mqtt.Connect()
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			c.stop()
			return nil, fmt.Errorf("device %s: connect to MQTT broker %s: %w", o.DeviceID, o.BrokerURL, err)
		}
	case <-ctx.Done():
		c.stop()
		c.mqtt.Disconnect(0)
		return nil, fmt.Errorf("device %s: connect to MQTT broker %s: %w", o.DeviceID, o.BrokerURL, ctx.Err())
	}
	c.log.V(1).Info("connected to broker", "broker", o.BrokerURL, "clientID", o.ClientID)

	select {
	case err := <-c.first:
		if err != nil {
			_ = c.Close()
			return nil, fmt.Errorf("device %s: %w", o.DeviceID, err)
		}
	case <-ctx.Done():
		_ = c.Close()
		return nil, fmt.Errorf("device %s: waiting for the twin GET: %w", o.DeviceID, ctx.Err())
	}
	return c, nil
}

// sasCredentials returns the username and a fresh SAS token, for each
// connection attempt.
func (c *Client) sasCredentials() (username, password string) {
	o := c.opts
	tok, err := sas.SignDevice(o.HubHostname, o.DeviceID, o.SharedAccessKey, time.Now().Add(o.TokenValidity))
	if err != nil { // the key was checked in Connect
		c.log.Error(err, "signing a SAS token")
	}
	return o.HubHostname + "/" + o.DeviceID + "/?api-version=" + APIVersion, tok
}

// ConnectionStringOptions returns Options for the device of an IoT Hub
// connection string (HostName=...;DeviceId=...;SharedAccessKey=..., as in
// the key Secret the kubetwin operator keeps for every twin), connecting
// to brokerURL, or, when it is empty, to ssl://<HostName>:8883 (a HostName
// with a port is used as it is).
func ConnectionStringOptions(connectionString, brokerURL string) (Options, error) {
	cs, err := sas.ParseConnectionString(connectionString)
	if err != nil {
		return Options{}, err
	}
	if brokerURL == "" {
		host := cs.HostName
		if _, _, err := net.SplitHostPort(host); err != nil {
			host = net.JoinHostPort(host, "8883")
		}
		brokerURL = "ssl://" + host
	}
	return Options{BrokerURL: brokerURL, DeviceID: cs.DeviceID, SharedAccessKey: cs.SharedAccessKey, HubHostname: cs.HostName}, nil
}

// DeviceID returns the device id the client was connected with.
func (c *Client) DeviceID() string { return c.opts.DeviceID }

// Desired returns a copy of the local desired document (without $version)
// and its version.
func (c *Client) Desired() (map[string]any, int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return deepCopyMap(c.desired), c.version
}

// IsConnected reports whether the client currently has a broker connection.
func (c *Client) IsConnected() bool { return c.mqtt.IsConnectionOpen() }

// Close publishes the retained presence {"online":false}, disconnects from
// the broker and stops the client. Pending requests end with ErrClosed; a
// running OnDesired call is waited for. Closing again does nothing and
// returns the first result.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.stop()
		if c.mqtt.IsConnectionOpen() {
			tok := c.mqtt.Publish(c.presenceTopic, 1, true, presencePayload(false))
			if !tok.WaitTimeout(c.opts.RequestTimeout) {
				c.closeErr = fmt.Errorf("device %s: publish offline presence: %w", c.opts.DeviceID, ErrNoResponse)
			} else if err := tok.Error(); err != nil {
				c.closeErr = fmt.Errorf("device %s: publish offline presence: %w", c.opts.DeviceID, err)
			}
		}
		c.mqtt.Disconnect(250)
	})
	return c.closeErr
}

// stop ends the worker and pending requests and waits for the worker.
func (c *Client) stop() {
	c.cancel()
	<-c.workerDone
}

// publishAsync publishes with QoS 1 without waiting; a failure is logged.
// Paho keeps the message while it reconnects.
func (c *Client) publishAsync(topic string, payload []byte, retained bool) {
	tok := c.mqtt.Publish(topic, 1, retained, payload)
	go func() {
		select {
		case <-tok.Done():
			if err := tok.Error(); err != nil {
				c.log.Error(err, "publish failed", "topic", topic)
			}
		case <-c.ctx.Done():
		}
	}()
}

func presencePayload(online bool) []byte {
	b, _ := json.Marshal(protocol.Presence{Online: online})
	return b
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
