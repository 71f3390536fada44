package e2e

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/kubetwin/kubetwin/internal/testutil/mosquitto"
	"github.com/kubetwin/kubetwin/internal/testutil/operatorproc"

	paho "github.com/eclipse/paho.mqtt.golang"

	"github.com/kubetwin/kubetwin/pkg/protocol"
)

// Timeouts. They are generous: the suite runs on small CI machines next to
// a kube-apiserver and etcd.
const (
	wait        = 30 * time.Second // for something the operator does
	tick        = 100 * time.Millisecond
	readyWait   = 90 * time.Second // for an operator process to serve
	stopWait    = 30 * time.Second // for an operator process to exit after SIGTERM
	commandWait = 20 * time.Second // for one mosquitto_pub
)

// brokerKind says which MQTT broker a test runs against.
type brokerKind string

const (
	// embeddedBroker is the operator's own broker (--mqtt-bind-address).
	embeddedBroker brokerKind = "embedded"
	// mosquittoBroker is a Mosquitto the test starts (--broker-url).
	mosquittoBroker brokerKind = "mosquitto"
)

var brokerKinds = []brokerKind{embeddedBroker, mosquittoBroker}

// operator is the operator binary running as a separate process, so that it
// can be stopped, restarted and killed. It watches one namespace only, so
// that tests cannot disturb each other.
type operator struct {
	t          *testing.T
	kind       brokerKind
	namespace  string
	brokerAddr string // host:port the devices connect to
	healthAddr string
	logPath    string

	// secure runs the operator with device authentication (its default);
	// otherwise it runs with --device-auth=none and, embedded, no TLS
	// listener, as the tests that are not about security need.
	secure bool
	// extraArgs are added to the operator's flags.
	extraArgs []string
	// probeUser and probePassword are the MQTT credentials of the
	// readiness probe (secure operators refuse anonymous clients).
	probeUser, probePassword string

	proc      operatorproc.Proc
	starts    int
	everReady bool // ports are fixed once it has served
}

// newOperator prepares (but does not start) an operator for namespace ns.
// With the embedded broker it listens for devices on a free port that it
// keeps across restarts; with Mosquitto it connects to brokerAddr.
func newOperator(t *testing.T, kind brokerKind, ns, brokerAddr string) *operator {
	t.Helper()
	o := &operator{
		t:          t,
		kind:       kind,
		namespace:  ns,
		brokerAddr: brokerAddr,
		logPath:    filepath.Join(t.TempDir(), "operator.log"),
	}
	o.pickPorts()
	t.Cleanup(func() {
		if o.running() {
			o.signalAndWait(syscall.SIGKILL, stopWait)
		}
		if t.Failed() {
			o.printLog()
		}
	})
	return o
}

// brokerURL is the URL devices use.
func (o *operator) brokerURL() string { return "tcp://" + o.brokerAddr }

func (o *operator) args() []string {
	a := []string{
		"--namespace=" + o.namespace,
		// One hub per test: device ids are unique per claims namespace.
		"--claims-namespace=" + o.namespace,
		"--health-probe-bind-address=" + o.healthAddr,
		"--metrics-bind-address=0",
		"--zap-log-level=info",
		// The service API only where a test asks for it (extraArgs).
		"--service-api-bind-address=",
	}
	if !o.secure {
		a = append(a, "--device-auth=none")
	}
	if o.kind == embeddedBroker {
		a = append(a, "--mqtt-bind-address="+o.brokerAddr)
		if !o.secure {
			a = append(a, "--mqtt-tls-bind-address=")
		}
	} else {
		a = append(a, "--broker-url=tcp://"+o.brokerAddr, "--broker-client-id=kubetwin-operator-"+o.namespace)
	}
	return append(a, o.extraArgs...)
}

// start starts the operator process and waits until it answers devices.
// If its first start fails because a port was taken meanwhile, it tries
// again on other ports; later starts keep the ports (devices reconnect to
// the same address).
func (o *operator) start() {
	o.t.Helper()
	for attempt := 1; ; attempt++ {
		err := o.startOnce()
		if err == nil {
			o.everReady = true
			return
		}
		o.signalAndWait(syscall.SIGKILL, stopWait)
		if !o.everReady && attempt < 3 && o.lastStartHitPortInUse() {
			o.t.Logf("operator: %v; a port was taken, trying other ports", err)
			o.pickPorts()
			continue
		}
		o.t.Fatalf("operator start #%d: %v (its log is below)", o.starts, err)
	}
}

// pickPorts chooses the free ports the operator listens on.
func (o *operator) pickPorts() {
	o.healthAddr = fmt.Sprintf("127.0.0.1:%d", freePort(o.t))
	if o.kind == embeddedBroker {
		o.brokerAddr = fmt.Sprintf("127.0.0.1:%d", freePort(o.t))
	}
}

// lastStartHitPortInUse reports whether the log of the last start says a
// port was in use.
func (o *operator) lastStartHitPortInUse() bool {
	b, _ := os.ReadFile(o.logPath)
	marker := fmt.Sprintf("===== e2e: operator start #%d ", o.starts)
	i := strings.LastIndex(string(b), marker)
	return i >= 0 && strings.Contains(string(b[i:]), "address already in use")
}

func (o *operator) startOnce() error {
	if o.proc.Started() {
		return errors.New("operator already running")
	}
	o.starts++
	n := o.starts
	args := o.args()
	exited, err := o.proc.Start(operatorproc.Spec{
		Bin:     managerBin,
		Args:    args,
		Env:     append(filteredEnv(), "KUBECONFIG="+kubeconfigPath),
		LogPath: o.logPath,
		Header:  fmt.Sprintf("===== e2e: operator start #%d at %s: %s %s\n", n, time.Now().Format(time.RFC3339Nano), managerBin, strings.Join(args, " ")),
		Footer: func(err error) string {
			return fmt.Sprintf("===== e2e: operator #%d exited at %s: %v\n", n, time.Now().Format(time.RFC3339Nano), err)
		},
	})
	if err != nil {
		return err
	}
	return o.waitReady(exited)
}

// filteredEnv is the test's environment without what would point the
// operator at another cluster.
func filteredEnv() []string { return operatorproc.Environ() }

// running reports whether the process is running.
func (o *operator) running() bool { return o.proc.Running() }

// stop sends SIGTERM and waits for a graceful exit.
func (o *operator) stop() {
	o.t.Helper()
	if !o.signalAndWait(syscall.SIGTERM, stopWait) {
		o.t.Errorf("operator did not exit within %s of SIGTERM; killed it", stopWait)
	}
}

// kill sends SIGKILL: the operator dies without closing anything.
func (o *operator) kill() {
	o.t.Helper()
	o.signalAndWait(syscall.SIGKILL, stopWait)
}

// signalAndWait signals the process and waits for it; if it does not exit
// within d it is killed and signalAndWait returns false.
func (o *operator) signalAndWait(sig syscall.Signal, d time.Duration) bool {
	return o.proc.SignalAndWait(sig, d)
}

// printLog logs the operator's output (the end of it, if it is long).
func (o *operator) printLog() {
	b, err := operatorproc.LogTail(o.logPath, 256<<10, 0)
	if err != nil {
		o.t.Logf("operator log: %v", err)
		return
	}
	o.t.Logf("operator log (%s broker, namespace %s):\n%s", o.kind, o.namespace, b)
}

// waitReady waits until the process serves /readyz and answers a twin GET
// over MQTT (a 404 for a device id that has no twin): then its cache has
// synced, and its broker (or broker connection) and subscriptions are up.
func (o *operator) waitReady(exited <-chan struct{}) error {
	deadline := time.Now().Add(readyWait)
	hc := &http.Client{Timeout: 2 * time.Second}
	for {
		select {
		case <-exited:
			return errors.New("the operator exited while starting")
		default:
		}
		if resp, err := hc.Get("http://" + o.healthAddr + "/readyz"); err == nil {
			_ = resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the operator did not serve /readyz on %s within %s", o.healthAddr, readyWait)
		}
		time.Sleep(tick)
	}
	if err := probeMQTT(o.brokerAddr, o.probeUser, o.probePassword, time.Until(deadline), exited); err != nil {
		return fmt.Errorf("the operator does not answer devices on %s: %w", o.brokerAddr, err)
	}
	return nil
}

// probeMQTT GETs the twin of a device id that has none until the operator
// answers, connecting (with user and password, if set) as often as needed.
func probeMQTT(addr, user, password string, d time.Duration, exited <-chan struct{}) error {
	id := "e2e-probe-" + randomSuffix()
	got := make(chan protocol.Response, 1)
	opts := paho.NewClientOptions().
		AddBroker("tcp://" + addr).
		SetClientID(id).
		SetUsername(user).
		SetPassword(password).
		SetProtocolVersion(4).
		SetCleanSession(true).
		SetAutoReconnect(false).
		SetConnectTimeout(2 * time.Second).
		SetDefaultPublishHandler(func(_ paho.Client, m paho.Message) {
			var r protocol.Response
			if json.Unmarshal(m.Payload(), &r) == nil {
				select {
				case got <- r:
				default:
				}
			}
		})
	deadline := time.Now().Add(d)
	var c paho.Client
	defer func() {
		if c != nil {
			c.Disconnect(0)
		}
	}()
	lastErr := errors.New("not tried")
	for n := 1; time.Now().Before(deadline); n++ {
		select {
		case <-exited:
			return errors.New("the operator exited")
		default:
		}
		if c == nil || !c.IsConnectionOpen() {
			if c != nil {
				c.Disconnect(0)
				c = nil
			}
			nc := paho.NewClient(opts)
			tok := nc.Connect()
			if !tok.WaitTimeout(3*time.Second) || tok.Error() != nil {
				lastErr = fmt.Errorf("connect: %v", tok.Error())
				time.Sleep(200 * time.Millisecond)
				continue
			}
			c = nc
			st := c.Subscribe(protocol.ResponseFilter(id), 1, nil)
			if !st.WaitTimeout(3*time.Second) || st.Error() != nil {
				lastErr = fmt.Errorf("subscribe: %v", st.Error())
				continue
			}
		}
		c.Publish(protocol.GetTopic(id, fmt.Sprintf("probe%d", n)), 1, false, []byte{})
		lastErr = errors.New("no response to the probe GET")
		select {
		case r := <-got:
			if r.Status != protocol.StatusNotFound {
				return fmt.Errorf("probe GET answered with status %d (%s), want %d", r.Status, r.Error, protocol.StatusNotFound)
			}
			return nil
		case <-time.After(500 * time.Millisecond):
		}
	}
	return fmt.Errorf("no answer within %s: %w", d, lastErr)
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) int { return mosquitto.FreePort(t) }

func randomSuffix() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// startMosquitto runs a Mosquitto broker on a free port of 127.0.0.1 for
// the rest of the test and returns its address.
func startMosquitto(t *testing.T) string {
	t.Helper()
	return mosquitto.Start(t, "allow_anonymous true\n")
}

// startMosquittoConf runs a Mosquitto broker like startMosquitto, with
// conf added to its configuration.
func startMosquittoConf(t *testing.T, conf string) string {
	t.Helper()
	return mosquitto.Start(t, conf)
}

// setup is the start of every test: its own namespace, its broker and its
// operator, running.
func setup(t *testing.T, kind brokerKind) (ns string, op *operator) {
	t.Helper()
	ns = newNamespace(t)
	var addr string
	if kind == mosquittoBroker {
		addr = startMosquitto(t)
	}
	op = newOperator(t, kind, ns, addr)
	op.start()
	return ns, op
}

// forEachBroker runs f as a subtest per broker kind.
func forEachBroker(t *testing.T, f func(t *testing.T, kind brokerKind)) {
	for _, kind := range brokerKinds {
		t.Run(string(kind), func(t *testing.T) { f(t, kind) })
	}
}
