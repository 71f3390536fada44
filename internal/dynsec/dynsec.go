// Package dynsec provisions devices in Mosquitto's dynamic-security plugin,
// so that an external Mosquitto enforces the same device identities and
// per-device topics as the embedded broker.
//
// For every device it keeps, through the plugin's control topic
// ($CONTROL/dynamic-security/v1):
//
//   - a role kubetwin-device-<device id> whose ACLs allow publishing on the
//     device's request, ack and presence topics and subscribing to (and
//     receiving) its responses, desired document and presence
//     (protocol.DevicePublishFilters, protocol.DeviceSubscribeFilters);
//   - a client with username = client id = the device id, the device's
//     primary key (the base64 text, as in its Secret) as password, and that
//     role; disabled while the twin is disabled.
//
// Mosquitto stores only a hash of the password, so it cannot check SAS
// tokens: a device sends its primary key itself (see docs/security.md).
// The client's text description holds a fingerprint of what was
// provisioned (an HMAC of the device id, key and role under a secret of the
// installation, never the key), so an operator restart changes nothing
// (modifyClient would disconnect the device). At start the Client reads
// every client of the plugin (listClients, in pages) once: a device found
// unchanged there costs no command at all, and kubetwin's clients whose
// device has no twin any more are removed. Clients and roles kubetwin did
// not create (their textname is not ManagedTextName) are never modified or
// deleted.
package dynsec

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"sigs.k8s.io/controller-runtime/pkg/metrics"

	"github.com/kubetwin/kubetwin/internal/deviceauth"
	"github.com/kubetwin/kubetwin/pkg/protocol"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// Control topics of the plugin.
const (
	ControlTopic  = "$CONTROL/dynamic-security/v1"
	ResponseTopic = ControlTopic + "/response"
)

// ManagedTextName is the textname of the clients and roles kubetwin keeps.
const ManagedTextName = "kubetwin device"

// RolePrefix starts the name of every device's role.
const RolePrefix = "kubetwin-device-"

// DefaultTimeout bounds one request to the plugin.
const DefaultTimeout = 10 * time.Second

// DefaultPageSize is how many clients one listClients at start asks for.
const DefaultPageSize = 1000

// MinFingerprintKeyBytes is the shortest secret the fingerprints accept.
const MinFingerprintKeyBytes = 16

// commandsSent counts the commands sent to the plugin, by command: at an
// operator restart on an unchanged fleet, only the listClients pages.
var commandsSent = prometheus.NewCounterVec(prometheus.CounterOpts{
	Name: "kubetwin_dynsec_commands_total",
	Help: "Commands sent to Mosquitto's dynamic-security plugin, by command.",
}, []string{"command"})

func init() { metrics.Registry.MustRegister(commandsSent) }

// Options configure a Client.
type Options struct {
	// BrokerURL, Username, Password and TLSConfig reach the broker, as for
	// the operator's bus; the user needs the plugin's admin role.
	BrokerURL, Username, Password string
	TLSConfig                     *tls.Config
	// ClientID of this connection (it must differ from the bus's).
	ClientID string
	// Logger receives connection events.
	Logger logr.Logger
	// Timeout bounds one request (default DefaultTimeout).
	Timeout time.Duration
	// FingerprintKey returns the installation's secret (at least
	// MinFingerprintKeyBytes) under which clients are fingerprinted. It
	// must be the same at every start, or every device is provisioned
	// again (and disconnected) once. Required.
	FingerprintKey func(ctx context.Context) ([]byte, error)
	// Devices returns the id of every device that has a twin, once the
	// twins are all known; kubetwin's clients of other devices are removed
	// at start. Nil: none is removed at start.
	Devices func(ctx context.Context) (map[string]bool, error)
	// PageSize of listClients at start (default DefaultPageSize).
	PageSize int
}

// Client talks to the plugin. It is a manager.Runnable that runs on the
// leader, and a deviceauth.Provisioner.
type Client struct {
	opts   Options
	log    logr.Logger
	client paho.Client
	seq    atomic.Uint64
	prefix string

	mu      sync.Mutex
	waiting map[string]chan []Response

	// ready is closed once key is set and known read (start-up done).
	ready chan struct{}
	key   []byte
	// known are kubetwin's clients as listed at start, until each device's
	// first Provision (guarded by mu).
	known map[string]knownClient
	sent  atomic.Uint64
}

// knownClient is what start-up read of one of kubetwin's clients.
type knownClient struct {
	mark     string
	disabled bool
	hasRole  bool
}

var _ deviceauth.Provisioner = (*Client)(nil)

// Command is one command of the plugin, e.g.
// Command{"command": "getClient", "username": "x"}.
type Command map[string]any

// Response is the plugin's answer to one command.
type Response struct {
	Command         string          `json:"command"`
	Error           string          `json:"error,omitempty"`
	Data            json.RawMessage `json:"data,omitempty"`
	CorrelationData string          `json:"correlationData,omitempty"`
}

// New returns a Client; it connects in Start.
func New(o Options) (*Client, error) {
	u, err := url.Parse(o.BrokerURL)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return nil, fmt.Errorf("dynsec: broker URL %q is not a URL like tcp://host:1883", o.BrokerURL)
	}
	if o.ClientID == "" {
		return nil, errors.New("dynsec: ClientID is required")
	}
	if o.FingerprintKey == nil {
		return nil, errors.New("dynsec: FingerprintKey is required")
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.PageSize <= 0 {
		o.PageSize = DefaultPageSize
	}
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	c := &Client{
		opts:    o,
		log:     o.Logger.WithValues("broker", u.Redacted(), "clientID", o.ClientID),
		prefix:  hex.EncodeToString(b),
		waiting: map[string]chan []Response{},
		ready:   make(chan struct{}),
	}
	co := paho.NewClientOptions().
		AddBroker(o.BrokerURL).
		SetClientID(o.ClientID).
		SetUsername(o.Username).
		SetPassword(o.Password).
		SetProtocolVersion(4).
		SetCleanSession(true).
		SetAutoReconnect(true).
		SetConnectRetry(true).
		SetConnectRetryInterval(time.Second).
		SetMaxReconnectInterval(30 * time.Second).
		SetConnectTimeout(o.Timeout).
		SetOrderMatters(false).
		SetOnConnectHandler(c.onConnect).
		SetConnectionLostHandler(func(_ paho.Client, err error) {
			c.log.Error(err, "connection to the dynamic-security plugin's broker lost; reconnecting")
		})
	if o.TLSConfig != nil {
		co.SetTLSConfig(o.TLSConfig)
	}
	c.client = paho.NewClient(co)
	return c, nil
}

// NeedLeaderElection is true: only the leader provisions.
func (c *Client) NeedLeaderElection() bool { return true }

// Start connects (retrying until it can), reads the plugin's clients and
// removes stale ones (retrying until it can), and stays connected until
// ctx ends.
func (c *Client) Start(ctx context.Context) error {
	c.client.Connect() // with ConnectRetry, paho retries in the background
	defer c.client.Disconnect(250)
	for wait := time.Second; ; wait = min(2*wait, 30*time.Second) {
		err := c.startup(ctx)
		if err == nil {
			break
		}
		c.log.Error(err, "reading the dynamic-security plugin's clients failed; retrying", "retryIn", wait)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
	}
	<-ctx.Done()
	return nil
}

// startup loads the key, lists kubetwin's clients and removes those of
// devices without a twin, before any Provision runs (so none races with
// the removal).
func (c *Client) startup(ctx context.Context) error {
	key, err := c.opts.FingerprintKey(ctx)
	if err != nil {
		return fmt.Errorf("dynsec: fingerprint key: %w", err)
	}
	if len(key) < MinFingerprintKeyBytes {
		return fmt.Errorf("dynsec: fingerprint key is %d bytes long, want at least %d", len(key), MinFingerprintKeyBytes)
	}
	before := c.sent.Load()
	known, err := c.listClients(ctx)
	if err != nil {
		return err
	}
	removed := 0
	if c.opts.Devices != nil {
		devices, err := c.opts.Devices(ctx)
		if err != nil {
			return fmt.Errorf("dynsec: listing the devices: %w", err)
		}
		if removed, err = c.removeStale(ctx, known, devices); err != nil {
			return err
		}
	}
	c.mu.Lock()
	c.key, c.known = key, known
	c.mu.Unlock()
	close(c.ready)
	c.log.Info("dynamic-security clients read", "clients", len(known), "removed", removed, "commands", c.sent.Load()-before)
	return nil
}

// listClients reads kubetwin's clients, a page at a time.
func (c *Client) listClients(ctx context.Context) (map[string]knownClient, error) {
	known := map[string]knownClient{}
	for offset := 0; ; {
		rs, err := c.Do(ctx, Command{"command": "listClients", "verbose": true, "count": c.opts.PageSize, "offset": offset})
		if err != nil {
			return nil, err
		}
		if rs[0].Error != "" {
			return nil, fmt.Errorf("dynsec: listClients: %s", rs[0].Error)
		}
		var page struct {
			TotalCount int `json:"totalCount"`
			Clients    []struct {
				Username string `json:"username"`
				clientFields
			} `json:"clients"`
		}
		if err := json.Unmarshal(rs[0].Data, &page); err != nil {
			return nil, fmt.Errorf("dynsec: listClients at offset %d: %w", offset, err)
		}
		for _, cl := range page.Clients {
			if cl.TextName == ManagedTextName {
				known[cl.Username] = knownClient{mark: cl.TextDescription, disabled: cl.Disabled, hasRole: cl.hasRole(cl.Username)}
			}
		}
		offset += len(page.Clients)
		if len(page.Clients) == 0 || offset >= page.TotalCount {
			return known, nil
		}
	}
}

// removeStale deletes kubetwin's clients (and their roles) of devices
// without a twin, a batch of commands per request, and drops them from
// known.
func (c *Client) removeStale(ctx context.Context, known map[string]knownClient, devices map[string]bool) (int, error) {
	const batch = 100
	var cmds []Command
	var ids []string
	flush := func() error {
		if len(cmds) == 0 {
			return nil
		}
		rs, err := c.Do(ctx, cmds...)
		if err != nil {
			return err
		}
		for i, r := range rs {
			// Gone meanwhile is as good as deleted.
			if r.Error != "" && r.Error != errClientNotFound && r.Error != errRoleNotFound {
				return fmt.Errorf("dynsec: removing a stale device: %v: %s", cmds[i]["command"], r.Error)
			}
		}
		for _, id := range ids {
			delete(known, id)
		}
		cmds, ids = cmds[:0], ids[:0]
		return nil
	}
	removed := 0
	for id, k := range known {
		if devices[id] {
			continue
		}
		cmds = append(cmds, Command{"command": "deleteClient", "username": id})
		if k.hasRole {
			cmds = append(cmds, Command{"command": "deleteRole", "rolename": RoleName(id)})
		}
		ids = append(ids, id)
		removed++
		if len(cmds) >= batch {
			if err := flush(); err != nil {
				return removed, err
			}
		}
	}
	return removed, flush()
}

// waitReady waits for start-up, at most a request's timeout: the
// reconciler retries rather than hold a worker.
func (c *Client) waitReady(ctx context.Context) error {
	t := time.NewTimer(c.opts.Timeout)
	defer t.Stop()
	select {
	case <-c.ready:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return errors.New("dynsec: still reading the plugin's clients (see the operator's log)")
	}
}

// unchanged reports whether start-up found the device's client exactly as
// it would be provisioned now. Each device is looked up there once: later
// calls are for changes, which ask the plugin.
func (c *Client) unchanged(deviceID, mark, legacy string, disabled bool) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	k, ok := c.known[deviceID]
	if !ok {
		return false
	}
	delete(c.known, deviceID)
	if len(c.known) == 0 {
		c.known = nil // a map does not shrink: let the start-up's go
	}
	return (k.mark == mark || k.mark == legacy) && k.disabled == disabled && k.hasRole
}

// CommandsSent is how many commands this Client sent to the plugin.
func (c *Client) CommandsSent() uint64 { return c.sent.Load() }

func (c *Client) onConnect(cl paho.Client) {
	tok := cl.Subscribe(ResponseTopic, 1, c.onResponse)
	if !tok.WaitTimeout(c.opts.Timeout) || tok.Error() != nil {
		c.log.Error(tok.Error(), "subscribing to the dynamic-security responses failed; provisioning will time out", "topic", ResponseTopic)
		return
	}
	if st, ok := tok.(*paho.SubscribeToken); ok && st.Result()[ResponseTopic] > 2 {
		c.log.Error(errors.New("SUBACK 0x80"), "the broker refused the subscription to the dynamic-security responses: does the operator's user have the plugin's admin role?", "topic", ResponseTopic)
		return
	}
	c.log.Info("connected to the dynamic-security plugin")
}

func (c *Client) onResponse(_ paho.Client, m paho.Message) {
	var msg struct {
		Responses []Response `json:"responses"`
	}
	if err := json.Unmarshal(m.Payload(), &msg); err != nil || len(msg.Responses) == 0 {
		return
	}
	id, _, _ := strings.Cut(msg.Responses[0].CorrelationData, ":")
	c.mu.Lock()
	ch := c.waiting[id]
	delete(c.waiting, id)
	c.mu.Unlock()
	if ch != nil {
		ch <- msg.Responses
	}
}

// Do sends commands in one request and returns the plugin's responses, one
// per command, in order. A response's Error is the plugin's refusal of
// that command; the error is for the request (not connected, timed out).
func (c *Client) Do(ctx context.Context, cmds ...Command) ([]Response, error) {
	if len(cmds) == 0 {
		return nil, nil
	}
	// Just after start the connection may still be coming up.
	for wait := 0; !c.client.IsConnectionOpen(); wait++ {
		if wait >= 40 || ctx.Err() != nil {
			return nil, errors.New("dynsec: not connected to the broker")
		}
		time.Sleep(50 * time.Millisecond)
	}
	id := c.prefix + "-" + strconv.FormatUint(c.seq.Add(1), 10)
	for i, cmd := range cmds {
		cmd["correlationData"] = id + ":" + strconv.Itoa(i)
	}
	payload, err := json.Marshal(map[string]any{"commands": cmds})
	if err != nil {
		return nil, err
	}
	for _, cmd := range cmds {
		commandsSent.WithLabelValues(fmt.Sprint(cmd["command"])).Inc()
	}
	c.sent.Add(uint64(len(cmds)))
	ch := make(chan []Response, 1)
	c.mu.Lock()
	c.waiting[id] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.waiting, id)
		c.mu.Unlock()
	}()
	ctx, cancel := context.WithTimeout(ctx, c.opts.Timeout)
	defer cancel()
	tok := c.client.Publish(ControlTopic, 1, false, payload)
	select {
	case <-tok.Done():
		if err := tok.Error(); err != nil {
			return nil, fmt.Errorf("dynsec: publishing to %s: %w", ControlTopic, err)
		}
	case <-ctx.Done():
		return nil, fmt.Errorf("dynsec: publishing to %s: %w", ControlTopic, ctx.Err())
	}
	select {
	case rs := <-ch:
		out := make([]Response, len(cmds))
		for _, r := range rs {
			_, n, _ := strings.Cut(r.CorrelationData, ":")
			if i, err := strconv.Atoi(n); err == nil && i >= 0 && i < len(out) {
				out[i] = r
			}
		}
		for i := range out {
			if out[i].Command == "" {
				return nil, fmt.Errorf("dynsec: no response to %v", cmds[i]["command"])
			}
		}
		return out, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("dynsec: no response from the plugin (is it loaded, and may the operator's user use %s?): %w", ControlTopic, ctx.Err())
	}
}

// RoleName is the role of a device.
func RoleName(deviceID string) string { return RolePrefix + deviceID }

// deviceACLs are the ACLs of a device's role.
func deviceACLs(deviceID string) []map[string]any {
	var acls []map[string]any
	add := func(typ string, topics []string) {
		for _, t := range topics {
			acls = append(acls, map[string]any{"acltype": typ, "topic": t, "allow": true, "priority": 0})
		}
	}
	add("publishClientSend", protocol.DevicePublishFilters(deviceID))
	add("subscribePattern", protocol.DeviceSubscribeFilters(deviceID))
	add("publishClientReceive", protocol.DeviceSubscribeFilters(deviceID))
	return acls
}

// marker fingerprints what is provisioned for a client (its password and
// role), for its textdescription: an HMAC under the installation's key, so
// that whoever reads the plugin's configuration cannot test guesses of a
// key against it.
func marker(key []byte, deviceID, password string) string {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("kubetwin/v2\x00" + deviceID + "\x00" + password + "\x00" + RoleName(deviceID)))
	return "kubetwin2:" + hex.EncodeToString(m.Sum(nil)[:16])
}

// legacyMarker is the fingerprint operators before kubetwin2 wrote; a
// client carrying it for the same key is unchanged (rewriting it would
// disconnect every device once, at the upgrade).
func legacyMarker(deviceID, password string) string {
	h := sha256.Sum256([]byte("kubetwin/v1\x00" + deviceID + "\x00" + password))
	return "kubetwin:" + hex.EncodeToString(h[:16])
}

// clientFields are the fields of a client that getClient and listClients
// (verbose) return.
type clientFields struct {
	TextName        string `json:"textname"`
	TextDescription string `json:"textdescription"`
	Disabled        bool   `json:"disabled"`
	Roles           []struct {
		RoleName string `json:"rolename"`
	} `json:"roles"`
}

// hasRole reports whether the client has the device's role.
func (f clientFields) hasRole(deviceID string) bool {
	for _, r := range f.Roles {
		if r.RoleName == RoleName(deviceID) {
			return true
		}
	}
	return false
}

type clientInfo struct {
	Client clientFields `json:"client"`
}

type roleInfo struct {
	Role struct {
		TextName string `json:"textname"`
	} `json:"role"`
}

const (
	errClientNotFound = "Client not found"
	errRoleNotFound   = "Role not found"
)

// Provision creates or updates the device's role and client. A device
// without a valid primary key is kept disabled.
func (c *Client) Provision(ctx context.Context, d deviceauth.Device) error {
	if err := c.waitReady(ctx); err != nil {
		return err
	}
	password := d.PrimaryKey
	disabled := d.Disabled
	if _, err := sas.DecodeKey(password); err != nil {
		password, disabled = "", true
	}
	mark := marker(c.key, d.ID, password)
	if c.unchanged(d.ID, mark, legacyMarker(d.ID, password), disabled) {
		return nil
	}
	rs, err := c.Do(ctx, Command{"command": "getRole", "rolename": RoleName(d.ID)}, Command{"command": "getClient", "username": d.ID})
	if err != nil {
		return err
	}
	var cmds []Command
	switch {
	case rs[0].Error == errRoleNotFound:
		cmds = append(cmds, Command{"command": "createRole", "rolename": RoleName(d.ID), "textname": ManagedTextName,
			"textdescription": "kubetwin: topics of device " + d.ID, "acls": deviceACLs(d.ID)})
	case rs[0].Error != "":
		return fmt.Errorf("dynsec: getRole %s: %s", RoleName(d.ID), rs[0].Error)
	default:
		var ri roleInfo
		if err := json.Unmarshal(rs[0].Data, &ri); err != nil || ri.Role.TextName != ManagedTextName {
			return fmt.Errorf("dynsec: role %s exists and kubetwin does not manage it (textname %q); rename or delete it", RoleName(d.ID), ri.Role.TextName)
		}
	}
	roles := []map[string]any{{"rolename": RoleName(d.ID)}}
	switch {
	case rs[1].Error == errClientNotFound:
		cc := Command{"command": "createClient", "username": d.ID, "clientid": d.ID, "textname": ManagedTextName,
			"textdescription": mark, "roles": roles}
		if password != "" {
			cc["password"] = password
		}
		cmds = append(cmds, cc)
		if disabled {
			cmds = append(cmds, Command{"command": "disableClient", "username": d.ID})
		}
	case rs[1].Error != "":
		return fmt.Errorf("dynsec: getClient %s: %s", d.ID, rs[1].Error)
	default:
		var ci clientInfo
		if err := json.Unmarshal(rs[1].Data, &ci); err != nil || ci.Client.TextName != ManagedTextName {
			return fmt.Errorf("dynsec: Mosquitto client %q exists and kubetwin does not manage it (textname %q)", d.ID, ci.Client.TextName)
		}
		if disabled && !ci.Client.Disabled {
			// First, so a device with keys rotated out is not let in again
			// in between.
			cmds = append(cmds, Command{"command": "disableClient", "username": d.ID})
		}
		if ci.Client.TextDescription != mark || !ci.Client.hasRole(d.ID) {
			// modifyClient disconnects the device: only when something changed.
			mc := Command{"command": "modifyClient", "username": d.ID, "clientid": d.ID, "textdescription": mark, "roles": roles}
			if password != "" {
				mc["password"] = password
			}
			cmds = append(cmds, mc)
		}
		if !disabled && ci.Client.Disabled {
			cmds = append(cmds, Command{"command": "enableClient", "username": d.ID})
		}
	}
	return c.doAll(ctx, cmds)
}

// Deprovision deletes the device's client and role (the client is
// disconnected).
func (c *Client) Deprovision(ctx context.Context, deviceID string) error {
	if err := c.waitReady(ctx); err != nil {
		return err
	}
	c.mu.Lock()
	delete(c.known, deviceID)
	c.mu.Unlock()
	rs, err := c.Do(ctx, Command{"command": "getRole", "rolename": RoleName(deviceID)}, Command{"command": "getClient", "username": deviceID})
	if err != nil {
		return err
	}
	var cmds []Command
	var ci clientInfo
	if rs[1].Error == "" && json.Unmarshal(rs[1].Data, &ci) == nil && ci.Client.TextName == ManagedTextName {
		cmds = append(cmds, Command{"command": "deleteClient", "username": deviceID})
	}
	var ri roleInfo
	if rs[0].Error == "" && json.Unmarshal(rs[0].Data, &ri) == nil && ri.Role.TextName == ManagedTextName {
		cmds = append(cmds, Command{"command": "deleteRole", "rolename": RoleName(deviceID)})
	}
	return c.doAll(ctx, cmds)
}

// doAll runs commands and fails on the first refused one.
func (c *Client) doAll(ctx context.Context, cmds []Command) error {
	rs, err := c.Do(ctx, cmds...)
	if err != nil {
		return err
	}
	for i, r := range rs {
		if r.Error != "" {
			return fmt.Errorf("dynsec: %v: %s", cmds[i]["command"], r.Error)
		}
	}
	if len(cmds) > 0 {
		names := make([]string, len(cmds))
		for i, cmd := range cmds {
			names[i] = fmt.Sprint(cmd["command"])
		}
		c.log.V(1).Info("dynamic-security commands done", "commands", strings.Join(names, ","))
	}
	return nil
}
