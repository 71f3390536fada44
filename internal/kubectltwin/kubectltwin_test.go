package kubectltwin

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"

	"k8s.io/cli-runtime/pkg/genericiooptions"
	"sigs.k8s.io/yaml"

	"github.com/kubetwin/kubetwin/internal/query"
)

// These tests need no API server; cmd/kubectl-twin runs the plugin against
// one.

func TestPointAt(t *testing.T) {
	for _, tc := range []struct {
		text      string
		line, col int
		want      string
	}{
		{"SELECT * FROM devices WHERE tags.region =", 1, 42, "  SELECT * FROM devices WHERE tags.region =\n" + strings.Repeat(" ", 43) + "^\n"},
		{"SELECT *\nFROM x", 2, 6, "  FROM x\n       ^\n"},
		{"SELECT *\n\tWHERE é =", 2, 10, "  \tWHERE é =\n  \t        ^\n"}, // tabs kept, characters not bytes
		{"SELECT", 2, 1, ""},
		{"SELECT", 1, 9, ""},
	} {
		if got := pointAt(tc.text, tc.line, tc.col); got != tc.want {
			t.Errorf("pointAt(%q, %d, %d) =\n%q\nwant\n%q", tc.text, tc.line, tc.col, got, tc.want)
		}
	}
}

func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{
		"location.plant=Redmond43":     "location.plant=Redmond43",
		"floor!=3":                     "'floor!=3'",
		"region in (EU,US)":            "'region in (EU,US)'",
		"status.deviceId=it's":         `'status.deviceId=it'\''s'`,
		"status.connectionState=Conn$": "'status.connectionState=Conn$'",
	} {
		if got := shellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %s, want %s", in, got, want)
		}
	}
}

func TestExplain(t *testing.T) {
	q, err := query.Parse("SELECT * FROM devices WHERE tags.location.plant = 'Redmond43' AND properties.reported.connectivity.type = 'cellular' AND deviceId != 'a,b'")
	if err != nil {
		t.Fatal(err)
	}
	e := Explain(q, "default", "kind-dev", 500)
	if e.LabelSelector != "location.plant=Redmond43" || e.FieldSelector != `status.deviceId!=a\,b` {
		t.Errorf("selectors %q %q", e.LabelSelector, e.FieldSelector)
	}
	if want := `kubectl get devicetwins --context kind-dev -n default -l location.plant=Redmond43 --field-selector 'status.deviceId!=a\,b'`; e.Kubectl != want {
		t.Errorf("kubectl = %s\nwant      %s", e.Kubectl, want)
	}
	if want := "GET /apis/kubetwin.io/v1alpha1/namespaces/default/devicetwins?fieldSelector=status.deviceId%21%3Da%5C%2Cb&labelSelector=location.plant%3DRedmond43&limit=500"; e.Request != want {
		t.Errorf("request = %s\nwant      %s", e.Request, want)
	}
	if e.Residual == "" || !strings.Contains(e.text(), "WHERE "+e.Residual) {
		t.Errorf("text:\n%s", e.text())
	}
}

// TestExplainOffline: explain-query needs no server, only the kubeconfig's
// namespace (here none: default).
func TestExplainOffline(t *testing.T) {
	t.Setenv("KUBECONFIG", "/nonexistent")
	var out, errOut bytes.Buffer
	code := Main(context.Background(), []string{"explain-query", "SELECT * FROM devices WHERE tags.[[group]] IN ['a', 'b']"},
		genericiooptions.IOStreams{In: strings.NewReader(""), Out: &out, ErrOut: &errOut})
	if code != 0 || !strings.Contains(out.String(), "Label selector:  group in (a,b)") ||
		!strings.Contains(out.String(), "kubectl get devicetwins -n default -l 'group in (a,b)'") {
		t.Errorf("exit %d\n%s%s", code, out.String(), errOut.String())
	}
}

func TestQueryFromFile(t *testing.T) {
	t.Setenv("KUBECONFIG", "/nonexistent")
	var out, errOut bytes.Buffer
	code := Main(context.Background(), []string{"explain-query", "-o", "json", "-f", "-"},
		genericiooptions.IOStreams{In: strings.NewReader("SELECT *\nFROM devices\nWHERE deviceId = 'x'\n"), Out: &out, ErrOut: &errOut})
	if code != 0 || !strings.Contains(out.String(), `"fieldSelector": "status.deviceId=x"`) {
		t.Errorf("exit %d\n%s%s", code, out.String(), errOut.String())
	}
	out.Reset()
	errOut.Reset()
	code = Main(context.Background(), []string{"query", "-f", "-"},
		genericiooptions.IOStreams{In: strings.NewReader("SELECT *\nFROM devices\nWHERE deviceId = \n"), Out: &out, ErrOut: &errOut})
	if code != 1 || errOut.String() != "error: line 3, column 17: expected a value after '='\n  WHERE deviceId =\n                  ^\n" {
		t.Errorf("exit %d\n%s", code, errOut.String())
	}
}

func TestEncode(t *testing.T) {
	doc := map[string]any{
		"tags":     map[string]any{"b": json.Number("1.5"), "a": "true", "c": true, "d": nil, "e": json.Number("7")},
		"deviceId": "d1",
		"zzz":      "x",
		"etag":     "AA==",
		"properties": map[string]any{
			"reported": map[string]any{"$version": json.Number("2"), "$metadata": map[string]any{}, "x": "<&>"},
			"desired":  map[string]any{"$version": json.Number("1")},
		},
	}
	got := string(encodeJSON(doc, twinDocOrder))
	want := `{
    "deviceId": "d1",
    "etag": "AA==",
    "tags": {
        "a": "true",
        "b": 1.5,
        "c": true,
        "d": null,
        "e": 7
    },
    "properties": {
        "desired": {
            "$version": 1
        },
        "reported": {
            "x": "<&>",
            "$metadata": {},
            "$version": 2
        }
    },
    "zzz": "x"
}
`
	if got != want {
		t.Errorf("JSON:\n%s\nwant\n%s", got, want)
	}
	y, err := encodeYAML([]map[string]any{doc}, twinDocOrder)
	if err != nil {
		t.Fatal(err)
	}
	// YAML keeps the types: the string "true" stays a string.
	back, err := yaml.YAMLToJSON(y)
	if err != nil {
		t.Fatal(err)
	}
	var docs []map[string]any
	if err := json.Unmarshal(back, &docs); err != nil {
		t.Fatal(err)
	}
	tags := docs[0]["tags"].(map[string]any)
	if tags["a"] != "true" || tags["b"] != 1.5 || tags["c"] != true || tags["d"] != nil || tags["e"] != float64(7) {
		t.Errorf("YAML round trip: %v\n%s", tags, y)
	}
	if !strings.HasPrefix(string(y), "- deviceId: d1\n  etag: AA==\n  tags:") {
		t.Errorf("YAML order:\n%s", y)
	}
}

func TestRowTable(t *testing.T) {
	var b bytes.Buffer
	rows := []map[string]any{
		{"status": "Failed", "n": json.Number("1")},
		{"n": json.Number("1")},
		{"status": map[string]any{"a": "b"}, "n": json.Number("2.5")},
		{"status": nil, "n": json.Number("0")},
	}
	if err := printRowTable(&b, []string{"status", "n"}, rows, tableOptions{}); err != nil {
		t.Fatal(err)
	}
	want := "status      n\nFailed      1\n<none>      1\n{\"a\":\"b\"}   2.5\nnull        0\n"
	if b.String() != want {
		t.Errorf("table:\n%s\nwant\n%s", b.String(), want)
	}
}

func TestVersionAndOutputFlags(t *testing.T) {
	var out, errOut bytes.Buffer
	streams := genericiooptions.IOStreams{In: strings.NewReader(""), Out: &out, ErrOut: &errOut}
	if code := Main(context.Background(), []string{"version"}, streams); code != 0 || !strings.HasPrefix(out.String(), "kubectl-twin dev (go") {
		t.Errorf("version: exit %d %q", code, out.String())
	}
	errOut.Reset()
	if code := Main(context.Background(), []string{"explain-query", "-o", "wide", "SELECT * FROM devices"}, streams); code != 1 ||
		!strings.HasPrefix(errOut.String(), `error: unable to match a printer suitable for the output format "wide", allowed formats are: text,json,yaml`) ||
		!strings.Contains(errOut.String(), "See 'kubectl twin explain-query -h' for help and examples") {
		t.Errorf("explain -o wide: exit %d %q", code, errOut.String())
	}
}
