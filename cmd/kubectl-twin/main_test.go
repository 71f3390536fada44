package main

// The plugin against a real API server (envtest: kube-apiserver and etcd
// from KUBEBUILDER_ASSETS, the DeviceTwin CRD of config/crd/bases). There is
// no operator here: fixtures are created as the operator would leave them,
// with their tags mirrored into labels (twin.MirrorLabels) and their status
// written through the status subresource. The plugin runs in-process through
// its cobra root with a kubeconfig file, and once as a built binary through
// kubectl's plugin mechanism.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/yaml"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/kubectltwin"
	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/query/querytest"
	"github.com/kubetwin/kubetwin/internal/queryapi/queryapitest"
	"github.com/kubetwin/kubetwin/internal/twin"
)

var (
	testEnv    *envtest.Environment
	k8s        client.Client
	kubeconfig string // admin kubeconfig; its current context's namespace is "fleet"
)

// Namespaces of the fixtures.
const (
	fleetNS    = "fleet"    // the example fleet of internal/query/testdata/examples.json
	otherNS    = "other"    // a second namespace, for -n and -A
	scenarioNS = "scenario" // the getting-started scenario
)

func TestMain(m *testing.M) {
	os.Exit(runSuite(m))
}

func runSuite(m *testing.M) int {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		fmt.Fprintln(os.Stderr, "KUBEBUILDER_ASSETS is not set: run the tests with make test (it builds the control plane),\n"+
			"or KUBEBUILDER_ASSETS=$(hack/controlplane.sh) go test ./cmd/kubectl-twin")
		return 1
	}
	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join("..", "..", "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
	}
	// A front proxy, so that TestQueryAPI can install the query API.
	fp, err := queryapitest.Configure(env)
	if err != nil {
		fmt.Fprintf(os.Stderr, "front proxy: %v\n", err)
		return 1
	}
	defer func() { _ = fp.Cleanup() }()
	testEnv = env
	cfg, err := env.Start()
	if err != nil {
		fmt.Fprintf(os.Stderr, "starting envtest: %v\n", err)
		return 1
	}
	defer func() { _ = env.Stop() }()

	scheme := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(scheme)
	_ = v1alpha1.AddToScheme(scheme)
	if k8s, err = client.New(cfg, client.Options{Scheme: scheme}); err != nil {
		fmt.Fprintf(os.Stderr, "client: %v\n", err)
		return 1
	}

	dir, err := os.MkdirTemp("", "kubectl-twin-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() { _ = os.RemoveAll(dir) }()
	if kubeconfig, err = writeKubeconfig(env, dir); err != nil {
		fmt.Fprintf(os.Stderr, "kubeconfig: %v\n", err)
		return 1
	}
	if err := createFixtures(context.Background()); err != nil {
		fmt.Fprintf(os.Stderr, "fixtures: %v\n", err)
		return 1
	}
	return m.Run()
}

// writeKubeconfig writes an admin kubeconfig whose current context works
// in namespace fleet, plus a context "elsewhere" in namespace other.
func writeKubeconfig(env *envtest.Environment, dir string) (string, error) {
	user, err := env.ControlPlane.AddUser(envtest.User{Name: "twin-admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return "", err
	}
	data, err := user.KubeConfig()
	if err != nil {
		return "", err
	}
	kc, err := clientcmd.Load(data)
	if err != nil {
		return "", err
	}
	cur := kc.Contexts[kc.CurrentContext]
	cur.Namespace = fleetNS
	elsewhere := cur.DeepCopy()
	elsewhere.Namespace = otherNS
	kc.Contexts["elsewhere"] = elsewhere
	path := filepath.Join(dir, "kubeconfig")
	return path, clientcmd.WriteToFile(*kc, path)
}

// device is a fixture twin.
type device struct {
	ns, id   string
	tags     string // JSON
	desired  string // JSON
	reported string // JSON
	state    string // status.connectionState
	activity string // RFC 3339, "" for never
}

// fleet is the example fleet of internal/query/testdata/examples.json in
// namespace fleet (myDeviceId is in Redmond43 and reports cellular; the
// others vary), plus a twin in another namespace that only -A or -n other
// sees. myDeviceId also gets a desired document, which no example's answer
// depends on.
var fleet, examples = loadExamples()

// example is a query of examples.json with its answer: the deviceIds of a
// SELECT *, in order, or the rows (JSON) of a projection or aggregate.
type example = querytest.Example

func loadExamples() ([]device, []example) {
	f, err := querytest.Load("../../internal/query/testdata/examples.json")
	if err != nil {
		panic(err)
	}
	var devices []device
	for _, d := range f.Fleet {
		dev := device{ns: fleetNS, id: d.DeviceID, tags: string(d.Tags), reported: string(d.Reported), state: d.ConnectionState, activity: d.LastActivityTime}
		if d.DeviceID == "myDeviceId" {
			dev.desired = `{"telemetryConfig":{"sendFrequencyInSecs":300}}`
		}
		devices = append(devices, dev)
	}
	devices = append(devices, device{
		ns: otherNS, id: "other-pilot",
		tags:     `{"location":{"region":"US","plant":"Austin1"},"group":"pilot"}`,
		reported: `{"connectivity":{"type":"wired"}}`,
		state:    "Connected",
		activity: "2024-05-02T11:00:00Z",
	})
	return devices, f.Examples
}

// name is the DeviceTwin name of a device id.
func name(id string) string { return strings.ToLower(id) }

func createFixtures(ctx context.Context) error {
	for _, ns := range []string{fleetNS, otherNS, scenarioNS} {
		if err := k8s.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
			return err
		}
	}
	for _, d := range fleet {
		if err := createTwin(ctx, d); err != nil {
			return fmt.Errorf("%s: %w", d.id, err)
		}
	}
	return nil
}

// createTwin creates a DeviceTwin with mirrored labels, then writes its
// status as the operator would.
func createTwin(ctx context.Context, d device) error {
	return createTwinNamed(ctx, d, name(d.id))
}

// createTwinNamed is createTwin with the object's name.
func createTwinNamed(ctx context.Context, d device, objectName string) error {
	t := &v1alpha1.DeviceTwin{
		ObjectMeta: metav1.ObjectMeta{Namespace: d.ns, Name: objectName},
		Spec:       v1alpha1.DeviceTwinSpec{DeviceID: d.id},
	}
	if d.tags != "" {
		tags, err := twin.Decode([]byte(d.tags))
		if err != nil {
			return err
		}
		t.Labels = twin.MirrorLabels(tags)
		t.Spec.Tags = &apiextensionsv1.JSON{Raw: []byte(d.tags)}
	}
	if d.desired != "" {
		t.Spec.Desired = &apiextensionsv1.JSON{Raw: []byte(d.desired)}
	}
	if err := k8s.Create(ctx, t); err != nil {
		return err
	}
	t.Status = status(d)
	return k8s.Status().Update(ctx, t)
}

// status is what the operator writes for a device.
func status(d device) v1alpha1.DeviceTwinStatus {
	s := v1alpha1.DeviceTwinStatus{DeviceID: d.id, ConnectionState: d.state, ObservedGeneration: 1}
	if d.desired != "" {
		s.DesiredVersion = 1
		s.DeviceDesiredVersion = 1
		s.Metadata = &v1alpha1.TwinMetadata{Desired: &apiextensionsv1.JSON{Raw: []byte(
			`{"$lastUpdated":"2024-05-01T07:00:00.000000000Z","$lastUpdatedVersion":1,` +
				`"telemetryConfig":{"$lastUpdated":"2024-05-01T07:00:00.000000000Z","$lastUpdatedVersion":1,` +
				`"sendFrequencyInSecs":{"$lastUpdated":"2024-05-01T07:00:00.000000000Z","$lastUpdatedVersion":1}}}`)}}
		s.Conditions = []metav1.Condition{{
			Type: v1alpha1.ConditionInSync, Status: metav1.ConditionTrue, Reason: v1alpha1.ReasonInSync,
			LastTransitionTime: metav1.Now(),
		}}
	}
	if d.reported != "" {
		s.Reported = &apiextensionsv1.JSON{Raw: []byte(d.reported)}
		s.ReportedVersion = 1
	}
	if d.activity != "" {
		at, err := time.Parse(time.RFC3339, d.activity)
		if err != nil {
			panic(err)
		}
		mt := metav1.NewTime(at)
		s.LastActivityTime = &mt
		s.ConnectionStateUpdatedTime = &mt
	}
	return s
}

// result is one run of the plugin.
type result struct {
	stdout, stderr string
	code           int
}

// twinctl runs the plugin in-process, as `kubectl twin args...` with the
// test kubeconfig.
func twinctl(t *testing.T, args ...string) result {
	t.Helper()
	var out, errOut bytes.Buffer
	streams := genericiooptions.IOStreams{In: strings.NewReader(""), Out: &out, ErrOut: &errOut}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	code := kubectltwin.Main(ctx, append([]string{"--kubeconfig", kubeconfig}, args...), streams)
	return result{stdout: out.String(), stderr: errOut.String(), code: code}
}

// ok runs the plugin and fails the test unless it succeeds.
func ok(t *testing.T, args ...string) result {
	t.Helper()
	r := twinctl(t, args...)
	if r.code != 0 {
		t.Fatalf("kubectl twin %q: exit %d, stderr:\n%s", args, r.code, r.stderr)
	}
	return r
}

// items decodes a JSON array of objects.
func items(t *testing.T, out string) []map[string]any {
	t.Helper()
	var got []map[string]any
	dec := json.NewDecoder(strings.NewReader(out))
	dec.UseNumber()
	if err := dec.Decode(&got); err != nil {
		t.Fatalf("output is not a JSON array of objects: %v\n%s", err, out)
	}
	return got
}

// deviceIDs returns the deviceId of each twin of a JSON array.
func deviceIDs(t *testing.T, out string) []string {
	t.Helper()
	ids := []string{}
	for _, it := range items(t, out) {
		id, _ := it["deviceId"].(string)
		ids = append(ids, id)
	}
	return ids
}

// canon re-encodes a JSON array of objects canonically.
func canon(t *testing.T, s string) string {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("bad JSON %v: %s", err, s)
	}
	data, _ := json.Marshal(v)
	return string(data)
}

// TestExamples runs every example query of examples.json through the
// plugin against the API server, in the current context's namespace
// (fleet), in one request and in pages of two.
func TestExamples(t *testing.T) {
	for _, chunk := range []string{"500", "2"} {
		for _, ex := range examples {
			t.Run(ex.Name+"/chunk-size="+chunk, func(t *testing.T) {
				r := ok(t, "query", "-o", "json", "--chunk-size", chunk, ex.Query)
				if ex.DeviceIDs != nil {
					if got := deviceIDs(t, r.stdout); !slices.Equal(got, ex.DeviceIDs) {
						t.Errorf("got %v, want %v", got, ex.DeviceIDs)
					}
					return
				}
				if got, want := canon(t, r.stdout), canon(t, string(ex.Rows)); got != want {
					t.Errorf("got  %s\nwant %s", got, want)
				}
			})
		}
	}
}

// TestTables checks the table output: a row per device for SELECT *, the
// query's columns for projections and aggregates.
func TestTables(t *testing.T) {
	r := ok(t, "query", "SELECT * FROM devices WHERE tags.location.region = 'US'")
	lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
	if want := []string{"DEVICE", "CONNECTION", "LAST", "ACTIVITY", "DESIRED", "REPORTED"}; !slices.Equal(strings.Fields(lines[0]), want) {
		t.Errorf("header %q, want %v", lines[0], want)
	}
	wantRows := [][]string{
		{"device-new", "Disconnected", "<never>", "0", "0"},
		{"device-wired", "Disconnected", "*", "0", "1"},
		{"myDeviceId", "Connected", "*", "1", "1"},
	}
	checkRows(t, lines[1:], wantRows)

	r = ok(t, "query", "-o", "wide", "--no-headers", "SELECT * FROM devices WHERE tags.[[group]] = 'pilot' OR deviceId = 'myDeviceId'")
	wantRows = [][]string{
		{"device-eu2", "Connected", "*", "0", "1", "<none>", "2", "enabled", "device-eu2", `{"group":"pilot","location":{"plant":"Paris2","region":"EU"}}`},
		{"myDeviceId", "Connected", "*", "1", "1", "True", "2", "enabled", "mydeviceid", `{"location":{"plant":"Redmond43","region":"US"}}`},
	}
	checkRows(t, strings.Split(strings.TrimSpace(r.stdout), "\n"), wantRows)

	r = ok(t, "query", "SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS numberOfDevices FROM devices GROUP BY properties.reported.telemetryConfig.status")
	checkRows(t, strings.Split(strings.TrimSpace(r.stdout), "\n"), [][]string{
		{"status", "numberOfDevices"},
		{"Failed", "1"},
		{"<none>", "1"},
		{"Success", "2"},
		{"Pending", "1"},
	})

	r = ok(t, "query", "SELECT COUNT() AS totalNumberOfDevices FROM devices")
	checkRows(t, strings.Split(strings.TrimSpace(r.stdout), "\n"), [][]string{{"totalNumberOfDevices"}, {"5"}})

	// An empty answer: nothing on stdout, kubectl's message on stderr.
	r = ok(t, "query", "SELECT * FROM devices WHERE tags.location.plant = 'Nowhere'")
	if r.stdout != "" || strings.TrimSpace(r.stderr) != "No devices found in fleet namespace." {
		t.Errorf("empty table: stdout %q, stderr %q", r.stdout, r.stderr)
	}
	r = ok(t, "query", "-o", "json", "SELECT * FROM devices WHERE tags.location.plant = 'Nowhere'")
	if strings.TrimSpace(r.stdout) != "[]" {
		t.Errorf("empty JSON: %q", r.stdout)
	}
}

// checkRows compares table lines with rows of cells split on runs of
// spaces; a cell "*" matches anything.
func checkRows(t *testing.T, lines []string, want [][]string) {
	t.Helper()
	if len(lines) != len(want) {
		t.Fatalf("%d rows, want %d:\n%s", len(lines), len(want), strings.Join(lines, "\n"))
	}
	cellSep := regexp.MustCompile(`\s{2,}`) // columns are 3 or more spaces apart; a cell may hold single spaces
	for i, line := range lines {
		got := cellSep.Split(strings.TrimRight(line, " "), -1)
		if len(got) != len(want[i]) {
			t.Errorf("row %d = %q, want %q", i, got, want[i])
			continue
		}
		for j := range got {
			if want[i][j] != "*" && got[j] != want[i][j] {
				t.Errorf("row %d = %q, want %q", i, got, want[i])
				break
			}
		}
	}
}

// TestScenario follows the getting-started scenario (README.md, make demo):
// both queries before and after the device reports cellular.
func TestScenario(t *testing.T) {
	const (
		byPlant    = "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'"
		byCellular = byPlant + " AND properties.reported.connectivity.type = 'cellular'"
	)
	ctx := context.Background()
	d := device{ns: scenarioNS, id: "myDeviceId", tags: `{"location":{"region":"US","plant":"Redmond43"}}`}
	if err := createTwin(ctx, d); err != nil {
		t.Fatal(err)
	}
	check := func(q string, want []string) {
		t.Helper()
		if got := deviceIDs(t, ok(t, "query", "-n", scenarioNS, "-o", "json", q).stdout); !slices.Equal(got, want) {
			t.Errorf("%s: got %v, want %v", q, got, want)
		}
	}
	check(byPlant, []string{"myDeviceId"})
	check(byCellular, []string{})
	r := ok(t, "query", "-n", scenarioNS, byCellular)
	if r.stdout != "" || !strings.Contains(r.stderr, "No devices found in scenario namespace.") {
		t.Errorf("table before the report: stdout %q, stderr %q", r.stdout, r.stderr)
	}

	// The device connects and reports {"connectivity": {"type": "cellular"}}.
	var tw v1alpha1.DeviceTwin
	if err := k8s.Get(ctx, client.ObjectKey{Namespace: scenarioNS, Name: "mydeviceid"}, &tw); err != nil {
		t.Fatal(err)
	}
	d.reported, d.state, d.activity = `{"connectivity":{"type":"cellular"}}`, "Connected", time.Now().UTC().Format(time.RFC3339)
	tw.Status = status(d)
	if err := k8s.Status().Update(ctx, &tw); err != nil {
		t.Fatal(err)
	}
	check(byPlant, []string{"myDeviceId"})
	check(byCellular, []string{"myDeviceId"})
	r = ok(t, "query", "-n", scenarioNS, byCellular)
	checkRows(t, strings.Split(strings.TrimSpace(r.stdout), "\n"), [][]string{
		{"DEVICE", "CONNECTION", "LAST ACTIVITY", "DESIRED", "REPORTED"},
		{"myDeviceId", "Connected", "*", "0", "1"},
	})
}

// TestLanguageRules checks the reserved-word, case and quoting rules and
// that pushing a condition down never changes the answer, through the
// plugin.
func TestLanguageRules(t *testing.T) {
	for _, tc := range []struct {
		query string
		ids   []string
	}{
		// Keywords in any case, double quotes.
		{`select * from DEVICES where tags.location.region = "EU"`, []string{"device-eu2", "device-wifi"}},
		// Root names in any case; tag keys are case-sensitive.
		{`SELECT * FROM devices WHERE Tags.location.region = 'EU' AND DeviceID = 'device-eu2'`, []string{"device-eu2"}},
		{`SELECT * FROM devices WHERE tags.location.Region = 'EU'`, []string{}},
		// A reserved word as a key, escaped.
		{`SELECT * FROM devices WHERE tags.[[group]] = 'pilot'`, []string{"device-eu2"}},
		// Escapes in strings.
		{`SELECT * FROM devices WHERE tags.location.plant = 'Red\u006dond43'`, []string{"myDeviceId"}},
		// The tag 3 and the tag "3" share the label floor=3: the selector
		// lists both, the residual keeps the number.
		{`SELECT * FROM devices WHERE tags.floor = 3`, []string{"device-wired"}},
		{`SELECT * FROM devices WHERE tags.floor = '3'`, []string{"device-wifi"}},
		// != and NIN leave out devices without the property, though the
		// label selector floor!=3 keeps them.
		{`SELECT * FROM devices WHERE tags.floor != 4`, []string{"device-wired"}},
		{`SELECT * FROM devices WHERE tags.location.plant NIN ['Redmond43', 'Paris2']`, []string{"device-wifi", "device-wired"}},
		{`SELECT * FROM devices WHERE NOT (tags.location.region = 'US')`, []string{"device-eu2", "device-wifi"}},
		// Field selectors: deviceId and connectionState (a twin that never
		// connected is Disconnected).
		{`SELECT * FROM devices WHERE deviceId = 'myDeviceId'`, []string{"myDeviceId"}},
		{`SELECT * FROM devices WHERE connectionState = 'Disconnected'`, []string{"device-new", "device-wifi", "device-wired"}},
		{`SELECT TOP 2 * FROM devices WHERE STARTSWITH(deviceId, 'device-')`, []string{"device-eu2", "device-new"}},
	} {
		if got := deviceIDs(t, ok(t, "query", "-o", "json", tc.query).stdout); !slices.Equal(got, tc.ids) {
			t.Errorf("%s: got %v, want %v", tc.query, got, tc.ids)
		}
	}
}

// TestMalformedQueries: a pointed error on stderr, exit status 1, nothing
// on stdout, for every command that takes a query.
func TestMalformedQueries(t *testing.T) {
	for _, tc := range []struct {
		query, err, caret string
	}{
		{
			"SELECT * FROM devices WHERE tags.region =",
			"error: line 1, column 42: expected a value after '='",
			"  SELECT * FROM devices WHERE tags.region =\n                                           ^",
		},
		{
			"SELECT * FROM devices WHERE tags.group = 'pilot'",
			"error: line 1, column 34: 'group' is a reserved word: write it as [[group]]",
			"",
		},
		{
			"SELEC * FROM devices",
			"error: line 1, column 1: expected SELECT at the start of the query, got 'SELEC'",
			"",
		},
		{
			"SELECT *\nFROM devices\nWHERE tags.x IN ['a', 'b'",
			"error: line 3, column 26: ",
			"  WHERE tags.x IN ['a', 'b'\n                           ^",
		},
	} {
		for _, cmd := range []string{"query", "explain-query"} {
			r := twinctl(t, cmd, tc.query)
			if r.code != 1 || r.stdout != "" {
				t.Errorf("%s %q: exit %d, stdout %q", cmd, tc.query, r.code, r.stdout)
			}
			if !strings.HasPrefix(r.stderr, tc.err) {
				t.Errorf("%s %q: stderr\n%s\nwant it to begin with %q", cmd, tc.query, r.stderr, tc.err)
			}
			if tc.caret != "" && !strings.Contains(r.stderr, tc.caret) {
				t.Errorf("%s %q: stderr\n%s\nwant it to point with\n%s", cmd, tc.query, r.stderr, tc.caret)
			}
		}
	}

	// Other command line mistakes.
	for _, tc := range []struct {
		args []string
		err  string
	}{
		{[]string{"query"}, "error: a query is required"},
		{[]string{"query", "-o", "xml", "SELECT * FROM devices"}, `error: unable to match a printer suitable for the output format "xml"`},
		{[]string{"query", "--bogus", "SELECT * FROM devices"}, "error: unknown flag: --bogus"},
		{[]string{"get"}, "error: exactly one NAME"},
		{[]string{"get", "no-such-twin"}, `Error from server (NotFound): devicetwins.kubetwin.io "no-such-twin" not found`},
		{[]string{"frobnicate"}, `error: unknown command "frobnicate"`},
	} {
		r := twinctl(t, tc.args...)
		if r.code != 1 || !strings.HasPrefix(r.stderr, tc.err) {
			t.Errorf("%q: exit %d, stderr %q, want it to begin with %q", tc.args, r.code, r.stderr, tc.err)
		}
	}
}

// TestExplainQuery: the selectors sent to the server, the residual, and
// the kubectl command that lists the same twins.
func TestExplainQuery(t *testing.T) {
	const q = "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43' AND properties.reported.connectivity.type = 'cellular'"
	r := ok(t, "explain-query", q)
	for _, want := range []string{
		"Namespace:  fleet",
		"Label selector:  location.plant=Redmond43",
		"Field selector:  <none>",
		"GET /apis/kubetwin.io/v1alpha1/namespaces/fleet/devicetwins?labelSelector=location.plant%3DRedmond43&limit=500",
		"kubectl:         kubectl get devicetwins -n fleet -l location.plant=Redmond43\n",
		"WHERE tags.location.plant = 'Redmond43' AND properties.reported.connectivity.type = 'cellular'",
	} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("explain-query output lacks %q:\n%s", want, r.stdout)
		}
	}

	r = ok(t, "explain-query", "-A", "-o", "json", explainQ2)
	var e map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &e); err != nil {
		t.Fatalf("%v\n%s", err, r.stdout)
	}
	want := map[string]any{
		"namespace":     "",
		"labelSelector": "location.plant!=Seattle01,location.region in (EU,US)",
		"fieldSelector": "status.connectionState!=Connected,status.deviceId!=device-wired",
		"residual":      "connectionState = 'Disconnected' AND tags.location.region IN ['US', 'EU'] AND tags.location.plant != 'Seattle01' AND deviceId != 'device-wired'",
		"kubectl":       "kubectl get devicetwins -A -l 'location.plant!=Seattle01,location.region in (EU,US)' --field-selector 'status.connectionState!=Connected,status.deviceId!=device-wired'",
		"itemType":      "raw",
	}
	for k, v := range want {
		if e[k] != v {
			t.Errorf("%s = %q, want %q", k, e[k], v)
		}
	}
	// The server lists device-new and device-wifi; device-new has no plant,
	// so the residual leaves it out.
	if got := canon(t, ok(t, "query", "-A", "-o", "json", explainQ2).stdout); got != `[{"deviceId":"device-wifi"}]` {
		t.Errorf("query answer %s", got)
	}
}

// explainQ2 pushes label and field selectors of every kind.
const explainQ2 = "SELECT deviceId FROM devices WHERE connectionState = 'Disconnected' AND tags.location.region IN ['US', 'EU'] " +
	"AND tags.location.plant != 'Seattle01' AND deviceId != 'device-wired'"

// TestNamespaces: the context's namespace by default, -n, --context and -A.
func TestNamespaces(t *testing.T) {
	const q = "SELECT * FROM devices WHERE tags.[[group]] = 'pilot'"
	for _, tc := range []struct {
		args []string
		ids  []string
	}{
		{nil, []string{"device-eu2"}}, // the current context's namespace: fleet
		{[]string{"-n", fleetNS}, []string{"device-eu2"}},
		{[]string{"--namespace", otherNS}, []string{"other-pilot"}},
		{[]string{"--context", "elsewhere"}, []string{"other-pilot"}},
		{[]string{"-n", "default"}, []string{}},
		{[]string{"-A"}, []string{"device-eu2", "other-pilot"}},
		{[]string{"-A", "-n", otherNS}, []string{"device-eu2", "other-pilot"}}, // -A wins, as in kubectl
	} {
		args := append(append([]string{"query", "-o", "json"}, tc.args...), q)
		if got := deviceIDs(t, ok(t, args...).stdout); !slices.Equal(got, tc.ids) {
			t.Errorf("%v: got %v, want %v", tc.args, got, tc.ids)
		}
	}

	// With -A the table says where each twin lives.
	r := ok(t, "query", "-A", q)
	checkRows(t, strings.Split(strings.TrimSpace(r.stdout), "\n"), [][]string{
		{"NAMESPACE", "DEVICE", "CONNECTION", "LAST ACTIVITY", "DESIRED", "REPORTED"},
		{fleetNS, "device-eu2", "Connected", "*", "0", "1"},
		{otherNS, "other-pilot", "Connected", "*", "0", "1"},
	})
	r = ok(t, "query", "-n", "default", q)
	if !strings.Contains(r.stderr, "No devices found in default namespace.") {
		t.Errorf("stderr %q", r.stderr)
	}
	r = ok(t, "query", "-A", "SELECT * FROM devices WHERE tags.location.plant = 'Nowhere'")
	if strings.TrimSpace(r.stderr) != "No devices found." {
		t.Errorf("stderr %q", r.stderr)
	}
	// Aggregates count what is in scope.
	for _, tc := range []struct {
		args []string
		n    string
	}{{nil, "5"}, {[]string{"-n", otherNS}, "1"}} {
		args := append(append([]string{"query", "-o", "json"}, tc.args...), "SELECT COUNT() AS n FROM devices WHERE deviceId != 'x'")
		if got := canon(t, ok(t, args...).stdout); got != `[{"n":`+tc.n+`}]` {
			t.Errorf("%v: %s", tc.args, got)
		}
	}
}

// TestGet: the twin as IoT Hub's JSON document.
func TestGet(t *testing.T) {
	r := ok(t, "get", "mydeviceid")
	var doc map[string]any
	dec := json.NewDecoder(strings.NewReader(r.stdout))
	dec.UseNumber()
	if err := dec.Decode(&doc); err != nil {
		t.Fatalf("%v\n%s", err, r.stdout)
	}
	var tw v1alpha1.DeviceTwin
	if err := k8s.Get(context.Background(), client.ObjectKey{Namespace: fleetNS, Name: "mydeviceid"}, &tw); err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]any{
		"deviceId":                   "myDeviceId",
		"etag":                       hubtwin.ETag(tw.ResourceVersion),
		"version":                    json.Number("2"), // generation 1 + reported version 1
		"status":                     "enabled",
		"connectionState":            "Connected",
		"lastActivityTime":           "2024-05-02T10:00:00Z",
		"connectionStateUpdatedTime": "2024-05-02T10:00:00Z",
	} {
		if doc[k] != v {
			t.Errorf("%s = %#v, want %#v", k, doc[k], v)
		}
	}
	if got := canon(t, mustJSON(t, doc["tags"])); got != `{"location":{"plant":"Redmond43","region":"US"}}` {
		t.Errorf("tags = %s", got)
	}
	props, _ := doc["properties"].(map[string]any)
	desired, _ := props["desired"].(map[string]any)
	reported, _ := props["reported"].(map[string]any)
	if desired == nil || reported == nil {
		t.Fatalf("properties = %v", doc["properties"])
	}
	if desired["$version"] != json.Number("1") || reported["$version"] != json.Number("1") {
		t.Errorf("$version: desired %v, reported %v", desired["$version"], reported["$version"])
	}
	dm, _ := desired["$metadata"].(map[string]any)
	if dm["$lastUpdated"] != "2024-05-01T07:00:00.000000000Z" || dm["$lastUpdatedVersion"] != json.Number("1") {
		t.Errorf("desired $metadata = %v", dm)
	}
	rm, _ := reported["$metadata"].(map[string]any)
	if _, ok := rm["$lastUpdated"].(string); !ok {
		t.Errorf("reported $metadata = %v", rm)
	}
	if got := canon(t, mustJSON(t, desired["telemetryConfig"])); got != `{"sendFrequencyInSecs":300}` {
		t.Errorf("desired.telemetryConfig = %s", got)
	}
	if reported["connectivity"].(map[string]any)["type"] != "cellular" {
		t.Errorf("reported = %v", reported)
	}
	// The document is hubtwin's, member for member.
	if got, want := canon(t, r.stdout), canon(t, string(twin.Encode(hubtwin.FromDeviceTwin(&tw)))); got != want {
		t.Errorf("get = %s\nwant %s", got, want)
	}
	// deviceId leads, as in IoT Hub's documents.
	if !strings.HasPrefix(r.stdout, "{\n    \"deviceId\": \"myDeviceId\",\n    \"etag\": ") {
		t.Errorf("member order:\n%s", r.stdout)
	}

	// By device id, -o yaml, and -A (which looks the device id up everywhere).
	for _, args := range [][]string{
		{"get", "myDeviceId", "-o", "yaml"},
		{"get", "-n", otherNS, "other-pilot", "-o", "yaml"},
		{"get", "-A", "other-pilot", "-o", "yaml"},
	} {
		r := ok(t, args...)
		var y map[string]any
		if err := yaml.Unmarshal([]byte(r.stdout), &y); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, r.stdout)
		}
		id := args[len(args)-3]
		if y["deviceId"] != id || y["etag"] == nil || y["properties"] == nil {
			t.Errorf("%v:\n%s", args, r.stdout)
		}
		if id == "myDeviceId" && canon(t, mustJSON(t, y["tags"])) != `{"location":{"plant":"Redmond43","region":"US"}}` {
			t.Errorf("%v:\n%s", args, r.stdout)
		}
	}
	r = ok(t, "get", "other-pilot", "-n", otherNS, "-o", "wide", "--no-headers")
	if !strings.HasPrefix(r.stdout, "other-pilot") {
		t.Errorf("get -o wide: %q", r.stdout)
	}
	// A device id two twins claim (which the operator refuses) is named as such.
	for _, ns := range []string{fleetNS, otherNS} {
		if err := createTwin(context.Background(), device{ns: ns, id: "Dup-Device"}); err != nil {
			t.Fatal(err)
		}
	}
	if r := twinctl(t, "get", "-A", "Dup-Device"); r.code != 1 ||
		r.stderr != "error: device id \"Dup-Device\" is claimed by 2 DeviceTwins: fleet/dup-device, other/dup-device\n" {
		t.Errorf("get -A Dup-Device: exit %d, %q", r.code, r.stderr)
	}
	for _, ns := range []string{fleetNS, otherNS} {
		if err := k8s.Delete(context.Background(), &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "dup-device"}}); err != nil {
			t.Fatal(err)
		}
	}
	// Device ids may hold characters that names, URLs and field selectors
	// treat specially.
	special := device{ns: otherNS, id: "Sensor:42#a,b=c%?"}
	if err := createTwinNamed(context.Background(), special, "special"); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"get", "-n", otherNS, special.id}, {"get", "-A", special.id}} {
		if r := ok(t, args...); !strings.Contains(r.stdout, `"deviceId": "Sensor:42#a,b=c%?"`) {
			t.Errorf("%q:\n%s", args, r.stdout)
		}
	}
	q := fmt.Sprintf("SELECT deviceId FROM devices WHERE deviceId = '%s'", special.id)
	if got := canon(t, ok(t, "query", "-A", "-o", "json", q).stdout); got != `[{"deviceId":"Sensor:42#a,b=c%?"}]` {
		t.Errorf("%s: %s", q, got)
	}
	if err := k8s.Delete(context.Background(), &v1alpha1.DeviceTwin{ObjectMeta: metav1.ObjectMeta{Namespace: otherNS, Name: "special"}}); err != nil {
		t.Fatal(err)
	}

	// A device id of another namespace is not found without -A.
	if r := twinctl(t, "get", "other-pilot"); r.code != 1 || !strings.Contains(r.stderr, "NotFound") {
		t.Errorf("get other-pilot in fleet: exit %d, %q", r.code, r.stderr)
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(data)
}

// TestPaging: a query lists the fleet in pages of --chunk-size.
func TestPaging(t *testing.T) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	c, err := kubectltwin.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	q, err := query.Parse("SELECT * FROM devices WHERE properties.reported.telemetryConfig.sendFrequencyInSecs >= 60")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		chunk         int64
		listed, pages int
	}{{2, 5, 3}, {5, 5, 1}, {0, 5, 1}} {
		ans, err := kubectltwin.Execute(context.Background(), c, fleetNS, q, tc.chunk)
		if err != nil {
			t.Fatal(err)
		}
		var ids []string
		for _, tw := range ans.Twins {
			ids = append(ids, tw.Doc["deviceId"].(string))
		}
		if ans.Listed != tc.listed || ans.Pages != tc.pages || !slices.Equal(ids, []string{"device-eu2", "device-wifi", "myDeviceId"}) {
			t.Errorf("chunk %d: listed %d in %d pages, answer %v", tc.chunk, ans.Listed, ans.Pages, ids)
		}
	}
}

// TestAsKubectlPlugin builds kubectl-twin and runs it through kubectl's
// plugin mechanism (kubectl from KUBEBUILDER_ASSETS), as `kubectl twin`.
func TestAsKubectlPlugin(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the plugin")
	}
	kubectl := filepath.Join(os.Getenv("KUBEBUILDER_ASSETS"), "kubectl")
	// The suite needs KUBEBUILDER_ASSETS anyway, and hack/controlplane.sh
	// puts kubectl there: a missing one is a broken set-up, not a reason
	// to pass without testing the plugin mechanism.
	if _, err := os.Stat(kubectl); err != nil {
		t.Fatalf("no kubectl in KUBEBUILDER_ASSETS (export KUBEBUILDER_ASSETS=$(hack/controlplane.sh)): %v", err)
	}
	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", filepath.Join(bin, "kubectl-twin"), ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	run := func(args ...string) (string, string, error) {
		cmd := exec.Command(kubectl, args...)
		cmd.Env = append(os.Environ(), "PATH="+bin+string(os.PathListSeparator)+os.Getenv("PATH"), "KUBECONFIG="+kubeconfig)
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		err := cmd.Run()
		return out.String(), errOut.String(), err
	}
	out, stderr, err := run("twin", "query", "-n", fleetNS, "-o", "json", "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'")
	if err != nil {
		t.Fatalf("kubectl twin query: %v\n%s", err, stderr)
	}
	if got := deviceIDs(t, out); !slices.Equal(got, []string{"myDeviceId"}) {
		t.Errorf("kubectl twin query: %v", got)
	}
	_, stderr, err = run("twin", "query", "SELECT * FROM devices WHERE tags.region =")
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.HasPrefix(stderr, "error: line 1, column 42: expected a value after '='") {
		t.Errorf("malformed query through kubectl: %v, stderr %q", err, stderr)
	}

	// The kubectl command explain-query prints lists what the plugin lists.
	out, stderr, err = run("twin", "explain-query", "-A", "-o", "json", explainQ2)
	if err != nil {
		t.Fatalf("kubectl twin explain-query: %v\n%s", err, stderr)
	}
	var e struct{ Kubectl string }
	if err := json.Unmarshal([]byte(out), &e); err != nil {
		t.Fatal(err)
	}
	sh := exec.Command("bash", "-c", e.Kubectl+" -o name")
	sh.Env = append(os.Environ(), "PATH="+filepath.Dir(kubectl)+string(os.PathListSeparator)+os.Getenv("PATH"), "KUBECONFIG="+kubeconfig)
	listed, err := sh.CombinedOutput()
	if err != nil || string(listed) != "devicetwin.kubetwin.io/device-new\ndevicetwin.kubetwin.io/device-wifi\n" {
		t.Errorf("%s: %v\n%s", e.Kubectl, err, listed)
	}

	out, _, err = run("twin", "version")
	if err != nil || !strings.HasPrefix(out, "kubectl-twin ") {
		t.Errorf("kubectl twin version: %v %q", err, out)
	}
	out, _, err = run("twin", "--help")
	if err != nil || !strings.Contains(out, "kubectl twin [command] [options]") {
		t.Errorf("kubectl twin --help: %v\n%s", err, out)
	}
}
