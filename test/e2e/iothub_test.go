package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	. "github.com/onsi/gomega"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

// The Azure IoT SDK tests run Node programs written against the SDKs'
// public APIs, in the style of IoT Hub's getting-started guides, in
// testdata/iothub. They use the real npm packages (package-lock.json pins
// them; make test installs them with hack/deps.sh, and the test does if
// they are missing) and differ from what runs against IoT Hub only in
// their connection strings and the CA they trust (NODE_EXTRA_CA_CERTS).

const (
	sdkDir = "testdata/iothub"
	// serviceAPIAddr is where the operator serves IoT Hub's service REST
	// API in these tests: the service SDK always connects to port 443 of
	// the HostName of its connection string.
	serviceAPIAddr = "127.0.0.1:443"
	nodeWait       = 60 * time.Second
)

// hubFixture is an operator serving both IoT Hub endpoints, and what the
// SDK programs need to reach it.
type hubFixture struct {
	ns     string
	op     *operator
	caFile string
	// tlsPort is the port of the embedded broker's TLS listener.
	tlsPort string
	// serviceCS is the iothubowner connection string.
	serviceCS string
}

// requireNodeSDKs makes sure node runs and the SDK packages are installed.
func requireNodeSDKs(t *testing.T) string {
	t.Helper()
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatalf("the Azure IoT SDK tests need Node.js (node is not in PATH): apt-get install nodejs npm")
	}
	dir, err := filepath.Abs(sdkDir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "node_modules", "azure-iothub", "package.json")); err != nil {
		npm, err := exec.LookPath("npm")
		if err != nil {
			t.Fatalf("the SDK packages are not installed in %s and npm is not in PATH", dir)
		}
		t.Logf("installing the SDK packages: npm ci in %s", dir)
		cmd := exec.Command(npm, "ci", "--no-audit", "--no-fund")
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("npm ci in %s: %v\n%s", dir, err, out)
		}
	}
	return node
}

// startHub runs a secure operator (embedded broker on TLS, SAS devices)
// with the service API on 127.0.0.1:443 and "localhost" as the hub host
// name, in a namespace of its own.
func startHub(t *testing.T) *hubFixture {
	t.Helper()
	g := NewWithT(t)
	if l, err := net.Listen("tcp", serviceAPIAddr); err != nil {
		t.Fatalf("the service API must listen on %s (the service SDK always uses port 443): %v", serviceAPIAddr, err)
	} else {
		_ = l.Close()
	}
	h := &hubFixture{ns: newNamespace(t)}
	dir := t.TempDir()
	adminPW := randomSuffix() + randomSuffix()
	pwFile := filepath.Join(dir, "admin-password")
	if err := os.WriteFile(pwFile, []byte(adminPW+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	tlsAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	h.op = newOperator(t, embeddedBroker, h.ns, "")
	h.op.secure = true
	h.op.probeUser, h.op.probePassword = "kubetwin-admin", adminPW
	h.op.extraArgs = []string{
		"--mqtt-tls-bind-address=" + tlsAddr,
		"--hub-hostname=localhost",
		"--mqtt-tls-secret-namespace=" + h.ns,
		"--mqtt-admin-password-file=" + pwFile,
		"--service-api-bind-address=" + serviceAPIAddr,
		"--service-policies-namespace=" + h.ns,
	}
	h.op.start()
	h.tlsPort = tlsAddr[strings.LastIndexByte(tlsAddr, ':')+1:]

	cm := &corev1.ConfigMap{}
	g.Eventually(func() error {
		return k8s.Get(context.Background(), client.ObjectKey{Namespace: h.ns, Name: "kubetwin-mqtt-ca"}, cm)
	}, wait, tick).Should(Succeed())
	h.caFile = filepath.Join(dir, "ca.crt")
	if err := os.WriteFile(h.caFile, []byte(cm.Data["ca.crt"]), 0o644); err != nil {
		t.Fatal(err)
	}
	// The service connection string, as a user gets it: from the plugin.
	r := runPlugin(t, "service-connection-string", "-n", h.ns)
	h.serviceCS = strings.TrimSpace(r)
	g.Expect(h.serviceCS).To(MatchRegexp(`^HostName=localhost;SharedAccessKeyName=iothubowner;SharedAccessKey=[A-Za-z0-9+/]+=*$`))
	return h
}

// deviceCS is the connection string of the twin's device, with the port
// of the test's MQTT listener in its HostName (devices of a real hub use
// 8883, which the SDK takes when the HostName has no port).
func (h *hubFixture) deviceCS(t *testing.T, twinName string) string {
	t.Helper()
	cs := string(secret(t, h.ns, v1alpha1.KeySecretName(twinName)).Data[v1alpha1.ConnectionStringKey])
	if !strings.HasPrefix(cs, "HostName=localhost;") {
		t.Fatalf("connection string of %s: %q, want HostName=localhost", twinName, cs)
	}
	return strings.Replace(cs, "HostName=localhost;", "HostName=localhost:"+h.tlsPort+";", 1)
}

// nodeProc is one SDK program running.
type nodeProc struct {
	t      *testing.T
	name   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	mu     sync.Mutex
	out    bytes.Buffer
	exited chan struct{}
}

// startNode runs testdata/iothub/<program> with the given environment.
func (h *hubFixture) startNode(t *testing.T, env map[string]string, program string, args ...string) *nodeProc {
	t.Helper()
	node := requireNodeSDKs(t)
	p := &nodeProc{t: t, name: program, exited: make(chan struct{})}
	p.cmd = exec.Command(node, append([]string{program}, args...)...)
	p.cmd.Dir = sdkDir
	p.cmd.Env = append(filteredEnv(), "NODE_EXTRA_CA_CERTS="+h.caFile)
	for k, v := range env {
		p.cmd.Env = append(p.cmd.Env, k+"="+v)
	}
	w := &lockedWriter{mu: &p.mu, w: &p.out}
	p.cmd.Stdout, p.cmd.Stderr = w, w
	var err error
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting node %s: %v", program, err)
	}
	go func() { _ = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("node %s %s output:\n%s", program, strings.Join(args, " "), p.output())
		}
	})
	return p
}

func (p *nodeProc) output() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.out.String()
}

func (p *nodeProc) kill() {
	select {
	case <-p.exited:
	default:
		_ = p.cmd.Process.Signal(syscall.SIGKILL)
		<-p.exited
	}
}

// waitOutput waits until the program has printed want.
func (p *nodeProc) waitOutput(want string) {
	p.t.Helper()
	deadline := time.Now().Add(nodeWait)
	for !strings.Contains(p.output(), want) {
		select {
		case <-p.exited:
			if strings.Contains(p.output(), want) {
				return
			}
			p.t.Fatalf("node %s exited (%v) before printing %q:\n%s", p.name, p.cmd.ProcessState, want, p.output())
		default:
		}
		if time.Now().After(deadline) {
			p.t.Fatalf("node %s did not print %q within %s:\n%s", p.name, want, nodeWait, p.output())
		}
		time.Sleep(tick)
	}
}

// send writes a command line to the program's stdin.
func (p *nodeProc) send(line string) {
	p.t.Helper()
	if _, err := io.WriteString(p.stdin, line+"\n"); err != nil {
		p.t.Fatalf("writing to node %s: %v", p.name, err)
	}
}

// lines returns the program's output lines.
func (p *nodeProc) lines() []string {
	return strings.Split(strings.TrimRight(p.output(), "\n"), "\n")
}

// run runs a program to its end and returns its output lines; it must
// exit with status 0.
func (h *hubFixture) run(t *testing.T, env map[string]string, program string, args ...string) []string {
	t.Helper()
	p := h.startNode(t, env, program, args...)
	select {
	case <-p.exited:
	case <-time.After(nodeWait):
		t.Fatalf("node %s did not finish within %s:\n%s", program, nodeWait, p.output())
	}
	if !p.cmd.ProcessState.Success() {
		t.Fatalf("node %s: %v:\n%s", program, p.cmd.ProcessState, p.output())
	}
	return p.lines()
}

// service is the environment of a back-end program.
func (h *hubFixture) service() map[string]string {
	return map[string]string{"IOTHUB_CONNECTION_STRING": h.serviceCS}
}

// TestIoTHubSDKs runs unmodified Azure IoT SDK programs against the
// operator: the device SDK over MQTT on the embedded broker, the service
// SDK over HTTPS on the service API, and checks that they see the same
// twins as kubectl.
func TestIoTHubSDKs(t *testing.T) {
	requireNodeSDKs(t)
	h := startHub(t)
	createTwin(t, h.ns, "mydeviceid", "myDeviceId", "")

	t.Run("getting started scenario", func(t *testing.T) { testGettingStarted(t, h) })
	t.Run("desired properties and reconnects", func(t *testing.T) { testDesiredAndReconnect(t, h) })
	t.Run("registry", func(t *testing.T) { testRegistry(t, h) })
	t.Run("etags and missing devices", func(t *testing.T) { testEtags(t, h) })
	t.Run("query pages", func(t *testing.T) { testQueryPages(t, h) })
	t.Run("policy rights", func(t *testing.T) { testPolicyRights(t, h) })
}

// testPolicyRights: the registryRead policy may query but not read or
// write twins; the SDK gets UnauthorizedError, which names no policy.
func testPolicyRights(t *testing.T, h *hubFixture) {
	g := NewWithT(t)
	cs := strings.TrimSpace(runPlugin(t, "service-connection-string", "-n", h.ns, "--policy", "registryRead"))
	g.Expect(cs).To(HavePrefix("HostName=localhost;SharedAccessKeyName=registryRead;SharedAccessKey="))
	env := map[string]string{"IOTHUB_CONNECTION_STRING": cs}
	out := h.run(t, env, "AddTagsAndQuery.js", "query")
	g.Expect(out).To(ConsistOf(
		"Devices in Redmond43: myDeviceId",
		"Devices in Redmond43 using cellular network: myDeviceId",
	))
	p := h.startNode(t, env, "AddTagsAndQuery.js")
	select {
	case <-p.exited:
	case <-time.After(nodeWait):
		t.Fatalf("AddTagsAndQuery.js did not finish:\n%s", p.output())
	}
	g.Expect(p.cmd.ProcessState.Success()).To(BeFalse())
	g.Expect(p.output()).To(HavePrefix("UnauthorizedError: "))
	// The caller learns only that it is unauthorized, as from IoT Hub: no
	// policy names or rights (the operator logs the reason).
	g.Expect(p.output()).NotTo(ContainSubstring("ServiceConnect"))
	g.Expect(p.output()).NotTo(ContainSubstring("registryRead"))
}

// testGettingStarted is the getting-started scenario (the one make demo
// runs) with the SDKs: the back end tags the
// twin and queries; the device reports cellular; the queries find it.
func testGettingStarted(t *testing.T, h *hubFixture) {
	g := NewWithT(t)
	out := h.run(t, h.service(), "AddTagsAndQuery.js")
	g.Expect(out).To(ConsistOf(
		"myDeviceId twin updated successfully",
		"Devices in Redmond43: myDeviceId",
		"Devices in Redmond43 using cellular network: ",
	))
	// The tags the SDK wrote are the DeviceTwin's spec.tags.
	tw := getTwin(g, h.ns, "mydeviceid")
	g.Expect(doc(tw.Spec.Tags)).To(Equal(map[string]any{"location": map[string]any{"region": "US", "plant": "Redmond43"}}))
	// ... and the labels kubectl selects on.
	var list v1alpha1.DeviceTwinList
	g.Expect(k8s.List(context.Background(), &list, client.InNamespace(h.ns), client.MatchingLabels{"location.plant": "Redmond43"})).To(Succeed())
	g.Expect(list.Items).To(HaveLen(1))

	out = h.run(t, map[string]string{"DEVICE_CONNECTION_STRING": h.deviceCS(t, "mydeviceid")}, "ReportConnectivity.js")
	g.Expect(out).To(Equal([]string{"client opened", "twin state reported"}))
	// The report is in status.reported once the device got its 204.
	tw = getTwin(g, h.ns, "mydeviceid")
	g.Expect(doc(tw.Status.Reported)).To(Equal(map[string]any{"connectivity": map[string]any{"type": "cellular"}}))

	out = h.run(t, h.service(), "AddTagsAndQuery.js", "query")
	g.Expect(out).To(ConsistOf(
		"Devices in Redmond43: myDeviceId",
		"Devices in Redmond43 using cellular network: myDeviceId",
	))

	// The same device over MQTT over WebSockets (the SDK's MqttWs, for
	// networks that let only HTTPS out): wss://<hub>:443/$iothub/websocket
	// on the service API's port, so the HostName carries no port.
	createTwin(t, h.ns, "ws-device", "ws-device", "")
	wsCS := string(secret(t, h.ns, v1alpha1.KeySecretName("ws-device")).Data[v1alpha1.ConnectionStringKey])
	out = h.run(t, map[string]string{"DEVICE_CONNECTION_STRING": wsCS}, "ReportConnectivity.js", "ws")
	g.Expect(out).To(Equal([]string{"client opened", "twin state reported"}))
	g.Expect(doc(getTwin(g, h.ns, "ws-device").Status.Reported)).To(Equal(map[string]any{"connectivity": map[string]any{"type": "cellular"}}))
}

// testDesiredAndReconnect: a device gets desired changes made with kubectl
// (a merge patch of spec.desired), reports, and after the operator
// restarts (the broker loses its sessions) reconnects by itself and still
// gets responses and changes.
func testDesiredAndReconnect(t *testing.T, h *hubFixture) {
	g := NewWithT(t)
	createTwin(t, h.ns, "thermostat-1", "Thermostat:1", `{"targetTemperature":21}`)
	dev := h.startNode(t, map[string]string{"DEVICE_CONNECTION_STRING": h.deviceCS(t, "thermostat-1")}, "DesiredDevice.js")
	dev.waitOutput("twin: desired version 1, reported version 0")
	dev.waitOutput("ready")
	// The whole desired document first (the SDK fires it for a new listener).
	dev.waitOutput(`desired: {"targetTemperature":21,"$version":1}`)

	patchTwin(t, h.ns, "thermostat-1", `{"spec":{"desired":{"targetTemperature":23,"mode":"eco"}}}`)
	dev.waitOutput(`desired: {"mode":"eco","targetTemperature":23,"$version":2}`)
	// The device was sent version 2 (IoT Hub devices do not acknowledge:
	// delivery counts); it converges once it reports the desired values.
	g.Eventually(func() int64 { return getTwin(g, h.ns, "thermostat-1").Status.DeviceDesiredVersion }, wait, tick).Should(BeEquivalentTo(2))
	g.Expect(cond(getTwin(g, h.ns, "thermostat-1"), v1alpha1.ConditionInSync).Reason).To(Equal(v1alpha1.ReasonConverging))

	dev.send(`report {"targetTemperature":23,"mode":"eco","temperature":22.5}`)
	dev.waitOutput(`reported {"targetTemperature":23,"mode":"eco","temperature":22.5}`)
	tw := getTwin(g, h.ns, "thermostat-1")
	g.Expect(doc(tw.Status.Reported)).To(HaveKeyWithValue("temperature", num("22.5")))
	g.Expect(tw.Status.ConnectionState).To(Equal("Connected"))
	g.Eventually(func() metav1.ConditionStatus {
		return cond(getTwin(g, h.ns, "thermostat-1"), v1alpha1.ConditionInSync).Status
	}, wait, tick).Should(Equal(metav1.ConditionTrue))

	// A report that breaks a twin rule: the SDK gets the error IoT Hub
	// gives (errorCode 400004 and a message naming the path) and nothing
	// changes.
	before := getTwin(g, h.ns, "thermostat-1").Status.ReportedVersion
	dev.send(`report {"modes":["eco","boost"]}`)
	dev.waitOutput("report failed: Error: reported.modes: arrays are not allowed in device twins")
	g.Consistently(func() int64 { return getTwin(g, h.ns, "thermostat-1").Status.ReportedVersion }, time.Second, tick).Should(Equal(before))

	// The operator (and its broker, sessions and all) restarts. The SDK
	// reconnects with its retry policy (clean=false, no new SUBSCRIBE);
	// the broker, which lost the session, gives it its twin subscriptions
	// back as it connects, so a change made then reaches it although it
	// has sent nothing since.
	connects := strings.Count(dev.output(), "connected\n")
	h.op.stop()
	h.op.start()
	g.Eventually(func() int { return strings.Count(dev.output(), "connected\n") }, nodeWait, tick).Should(BeNumerically(">", connects))
	patchTwin(t, h.ns, "thermostat-1", `{"spec":{"desired":{"mode":null}}}`)
	dev.waitOutput(`desired: {"mode":null,"$version":3}`)

	// Its reports are still answered.
	dev.send(`report {"temperature":23}`)
	dev.waitOutput(`reported {"temperature":23}`)
	g.Expect(strings.Count(dev.output(), "report failed")).To(Equal(1), "only the bad report failed")
	g.Eventually(func() map[string]any {
		return doc(getTwin(g, h.ns, "thermostat-1").Status.Reported)
	}, wait, tick).Should(HaveKeyWithValue("temperature", num("23")))
	dev.send("exit")
	select {
	case <-dev.exited:
	case <-time.After(nodeWait):
		t.Fatalf("DesiredDevice.js did not exit:\n%s", dev.output())
	}
	g.Eventually(func() string { return getTwin(g, h.ns, "thermostat-1").Status.ConnectionState }, wait, tick).Should(Equal("Disconnected"))
}

// testRegistry: create (generated keys), create again (409), get, list,
// delete and get again (404), each visible as a DeviceTwin.
func testRegistry(t *testing.T, h *hubFixture) {
	g := NewWithT(t)
	id := "Sensor+Hall#3"
	out := h.run(t, h.service(), "Registry.js", id)
	g.Expect(out).To(Equal([]string{
		"created " + id + " status enabled keys 32/32 bytes",
		"create again: DeviceAlreadyExistsError",
		"got " + id + " same primary key true",
		"listed true",
		"deleted " + id,
		"get after delete: DeviceNotFoundError",
	}))
	// Deleted through the SDK: no DeviceTwin claims the id any more.
	g.Eventually(func() []string {
		var list v1alpha1.DeviceTwinList
		g.Expect(k8s.List(context.Background(), &list, client.InNamespace(h.ns))).To(Succeed())
		var ids []string
		for _, tw := range list.Items {
			if tw.DeletionTimestamp.IsZero() {
				ids = append(ids, tw.EffectiveDeviceID())
			}
		}
		return ids
	}, wait, tick).ShouldNot(ContainElement(id))

	// A device created through the registry is a DeviceTwin with a key
	// Secret holding the key the SDK got, and connects with it.
	id = "Lab:Sensor.7"
	out = h.run(t, h.service(), "Registry.js", id, "create")
	g.Expect(out).To(HaveLen(1))
	fields := strings.Fields(out[0])
	g.Expect(fields).To(HaveLen(3))
	g.Expect(fields[:2]).To(Equal([]string{"created", id}))
	key := fields[2]
	var tw *v1alpha1.DeviceTwin
	g.Eventually(func() *v1alpha1.DeviceTwin {
		var list v1alpha1.DeviceTwinList
		g.Expect(k8s.List(context.Background(), &list, client.InNamespace(h.ns))).To(Succeed())
		for i := range list.Items {
			if list.Items[i].Spec.DeviceID == id {
				tw = &list.Items[i]
			}
		}
		return tw
	}, wait, tick).ShouldNot(BeNil())
	g.Expect(tw.Name).To(MatchRegexp(`^lab-sensor-7-[0-9a-f]{10}$`))
	g.Expect(primaryKey(t, h.ns, tw.Name)).To(Equal(key))
	cs := "HostName=localhost:" + h.tlsPort + ";DeviceId=" + id + ";SharedAccessKey=" + key
	out = h.run(t, map[string]string{"DEVICE_CONNECTION_STRING": cs}, "ReportConnectivity.js")
	g.Expect(out).To(Equal([]string{"client opened", "twin state reported"}))
	g.Expect(doc(getTwin(g, h.ns, tw.Name).Status.Reported)).To(Equal(map[string]any{"connectivity": map[string]any{"type": "cellular"}}))
}

// testEtags: a stale etag is refused with InvalidEtagError and changes
// nothing; "*" always applies; a missing device is DeviceNotFoundError.
func testEtags(t *testing.T, h *hubFixture) {
	g := NewWithT(t)
	createTwin(t, h.ns, "etag-dev", "etag-dev", `{"telemetryInterval":10}`)
	waitObserved(t, h.ns, "etag-dev")
	out := h.run(t, h.service(), "Etag.js", "etag-dev")
	g.Expect(out).To(Equal([]string{
		"read: telemetryInterval 10, desired version 1",
		"updated: desired version 2, etag changed true",
		"stale etag: InvalidEtagError",
		`any etag: tags {"owner":"ops"}`,
		"missing device: DeviceNotFoundError",
	}))
	tw := getTwin(g, h.ns, "etag-dev")
	g.Expect(doc(tw.Spec.Desired)).To(Equal(map[string]any{"telemetryInterval": num("30")}), "the stale update changed nothing")
	g.Expect(doc(tw.Spec.Tags)).To(Equal(map[string]any{"owner": "ops"}))
}

// testQueryPages: a query read 3 rows at a time returns every matching
// twin (or row) once, in device id order, with x-ms-continuation between
// pages, and the SDK's paging ends.
func testQueryPages(t *testing.T, h *hubFixture) {
	g := NewWithT(t)
	var ids []string
	for i := range 8 {
		id := fmt.Sprintf("pager-%02d", i)
		ids = append(ids, id)
		tw := &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: h.ns, Name: id}}
		tw.Spec.Tags = rawJSON(t, `{"batch":"pages"}`)
		if err := k8s.Create(context.Background(), tw); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	slices.Sort(ids)
	q := "SELECT * FROM devices WHERE tags.batch = 'pages'"
	var out []string
	g.Eventually(func() []string {
		out = h.run(t, h.service(), "QueryPages.js", q, "3")
		return out
	}, wait, time.Second).Should(Equal([]string{
		"page 1: " + strings.Join(ids[0:3], ","),
		"page 2: " + strings.Join(ids[3:6], ","),
		"page 3: " + strings.Join(ids[6:8], ","),
		"done",
	}))

	// Raw rows (projections, GROUP BY, aggregates) paged with query.next:
	// every row once, and the paging ends.
	rows := func(ids []string, row string) string {
		var b []string
		for _, id := range ids {
			b = append(b, fmt.Sprintf(row, id))
		}
		return "[" + strings.Join(b, ",") + "]"
	}
	for _, tc := range []struct{ query, row string }{
		{"SELECT deviceId FROM devices WHERE tags.batch = 'pages'", `{"deviceId":%q}`},
		{"SELECT deviceId, COUNT() AS n FROM devices WHERE tags.batch = 'pages' GROUP BY deviceId", `{"deviceId":%q,"n":1}`},
	} {
		g.Expect(h.run(t, h.service(), "QueryRows.js", tc.query, "3")).To(Equal([]string{
			"page 1: " + rows(ids[0:3], tc.row),
			"page 2: " + rows(ids[3:6], tc.row),
			"page 3: " + rows(ids[6:8], tc.row),
			"done",
		}), tc.query)
	}
	g.Expect(h.run(t, h.service(), "QueryRows.js", "SELECT COUNT() AS total FROM devices WHERE tags.batch = 'pages'", "3")).
		To(Equal([]string{`page 1: [{"total":8}]`, "done"}))
}

// runPlugin runs kubectl-twin against the test's control plane and returns
// what it printed; it must succeed.
func runPlugin(t *testing.T, args ...string) string {
	t.Helper()
	cmd := exec.Command(pluginBin, args...)
	cmd.Env = append(filteredEnv(), "KUBECONFIG="+kubeconfigPath)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("kubectl-twin %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String()
}
