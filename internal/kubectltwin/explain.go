package kubectltwin

import (
	"fmt"
	"net/url"
	"regexp"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/query"
)

// Explanation is how a query runs against the API server.
type Explanation struct {
	// Query is the query in canonical form.
	Query string `json:"query"`
	// Namespace is where twins are listed; "" for all namespaces.
	Namespace string `json:"namespace"`
	// LabelSelector and FieldSelector are sent with the LIST ("" for none).
	LabelSelector string `json:"labelSelector"`
	FieldSelector string `json:"fieldSelector"`
	// Residual is the condition checked on every listed twin ("" for none).
	Residual string `json:"residual"`
	// Request is the first LIST request's path and query.
	Request string `json:"request"`
	// Kubectl is the kubectl command that lists the same twins.
	Kubectl string `json:"kubectl"`
	// ItemType is twin (whole documents) or raw (rows); Columns the rows'.
	ItemType string   `json:"itemType"`
	Columns  []string `json:"columns,omitempty"`
}

// Explain returns how q runs in namespace ("" for all), listing in pages of
// chunkSize; kubeContext is the kubeconfig context named on the command
// line, if any (for the kubectl command).
func Explain(q *query.Query, namespace, kubeContext string, chunkSize int64) Explanation {
	plan := q.Plan()
	e := Explanation{
		Query:         q.String(),
		Namespace:     namespace,
		LabelSelector: plan.LabelSelector,
		FieldSelector: plan.FieldSelector,
		Residual:      plan.Residual,
		ItemType:      q.ItemType(),
		Columns:       q.Columns(),
	}

	path := "/apis/" + v1alpha1.GroupVersion.Group + "/" + v1alpha1.GroupVersion.Version
	if namespace != "" {
		path += "/namespaces/" + url.PathEscape(namespace)
	}
	path += "/" + Resource
	params := url.Values{}
	if plan.LabelSelector != "" {
		params.Set("labelSelector", plan.LabelSelector)
	}
	if plan.FieldSelector != "" {
		params.Set("fieldSelector", plan.FieldSelector)
	}
	if chunkSize > 0 {
		params.Set("limit", strconv.FormatInt(chunkSize, 10))
	}
	e.Request = "GET " + path
	if len(params) > 0 {
		e.Request += "?" + params.Encode()
	}

	cmd := []string{"kubectl", "get", Resource}
	if kubeContext != "" {
		cmd = append(cmd, "--context", shellQuote(kubeContext))
	}
	if namespace == "" {
		cmd = append(cmd, "-A")
	} else {
		cmd = append(cmd, "-n", shellQuote(namespace))
	}
	if plan.LabelSelector != "" {
		cmd = append(cmd, "-l", shellQuote(plan.LabelSelector))
	}
	if plan.FieldSelector != "" {
		cmd = append(cmd, "--field-selector", shellQuote(plan.FieldSelector))
	}
	e.Kubectl = strings.Join(cmd, " ")
	return e
}

var shellSafe = regexp.MustCompile(`^[A-Za-z0-9_@%+=:,./-]+$`)

// shellQuote quotes s for a POSIX shell when it needs it.
func shellQuote(s string) string {
	if shellSafe.MatchString(s) {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// text renders the explanation for people.
func (e Explanation) text() string {
	var b strings.Builder
	ns := e.Namespace
	if ns == "" {
		ns = "<all namespaces>"
	}
	none := func(s, what string) string {
		if s == "" {
			return "<none> (" + what + ")"
		}
		return s
	}
	fmt.Fprintf(&b, "Query:      %s\n", e.Query)
	fmt.Fprintf(&b, "Namespace:  %s\n", ns)
	fmt.Fprintf(&b, "\nSent to the API server, which does this filtering:\n")
	fmt.Fprintf(&b, "  Label selector:  %s\n", none(e.LabelSelector, "no tag condition can be pushed down"))
	fmt.Fprintf(&b, "  Field selector:  %s\n", none(e.FieldSelector, "no deviceId or connectionState condition can be pushed down"))
	fmt.Fprintf(&b, "  Request:         %s\n", e.Request)
	fmt.Fprintf(&b, "  kubectl:         %s\n", e.Kubectl)
	fmt.Fprintf(&b, "\nEvaluated by kubectl-twin on every twin the server returns (residual filter):\n")
	if e.Residual == "" {
		fmt.Fprintf(&b, "  <none> (no WHERE: every listed twin is in the answer)\n")
	} else {
		fmt.Fprintf(&b, "  WHERE %s\n", e.Residual)
		fmt.Fprintf(&b, "  (always the whole condition: the selectors only narrow the list, so the answer is\n")
		fmt.Fprintf(&b, "  the one a full scan gives)\n")
	}
	fmt.Fprintf(&b, "\nResult: ")
	if e.ItemType == query.ItemTypeTwin {
		fmt.Fprintf(&b, "twin documents (x-ms-item-type: twin), in deviceId order\n")
	} else {
		fmt.Fprintf(&b, "rows (x-ms-item-type: raw) with columns %s\n", strings.Join(e.Columns, ", "))
	}
	return b.String()
}

// fields returns the explanation as a document for -o json and yaml.
func (e Explanation) fields() (map[string]any, []string) {
	cols := make([]any, len(e.Columns))
	for i, c := range e.Columns {
		cols[i] = c
	}
	m := map[string]any{
		"query": e.Query, "namespace": e.Namespace, "labelSelector": e.LabelSelector,
		"fieldSelector": e.FieldSelector, "residual": e.Residual, "request": e.Request,
		"kubectl": e.Kubectl, "itemType": e.ItemType,
	}
	if len(cols) > 0 {
		m["columns"] = cols
	}
	return m, []string{"query", "namespace", "labelSelector", "fieldSelector", "residual", "request", "kubectl", "itemType", "columns"}
}

const explainLong = `Show how a query runs against the Kubernetes API, without running it.

The conditions the API server can evaluate are sent with the LIST of DeviceTwins: equality, IN
and their negations on tags become a label selector (tags are mirrored into labels), conditions
on deviceId and connectionState a field selector. Only conditions joined by AND at the top of
WHERE are pushed down. Everything else is the residual filter, evaluated by kubectl-twin on each
twin the server returns; kubectl-twin always checks the whole condition there, so pushing down
never changes the answer, only how much is listed.

The output ends with the equivalent kubectl command: it lists the same twins the plugin fetches.`

const explainExample = `  kubectl twin explain-query "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43' AND properties.reported.connectivity.type = 'cellular'"
  kubectl twin explain-query -o json "SELECT deviceId FROM devices WHERE connectionState = 'Connected' AND tags.floor IN [1, 2]"`

func newExplainCommand(o *options) *cobra.Command {
	var (
		in        queryInput
		output    string
		chunkSize int64
	)
	cmd := &cobra.Command{
		Use:     `explain-query "SELECT ..."`,
		Aliases: []string{"explain"},
		Short:   "Show the label and field selectors a query sends to the API server and what is filtered here",
		Long:    explainLong,
		Example: explainExample,
		Args:    cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output, []string{"text", outputJSON, outputYAML}); err != nil {
				return usageError{cmd: cmd, err: err}
			}
			q, _, err := in.parse(cmd, args)
			if err != nil {
				return err
			}
			ns, err := o.namespace()
			if err != nil {
				return err
			}
			e := Explain(q, ns, *o.config.Context, chunkSize)
			switch output {
			case outputJSON:
				doc, order := e.fields()
				_, err = o.streams.Out.Write(encodeJSON(doc, rowOrder(order)))
			case outputYAML:
				doc, order := e.fields()
				var data []byte
				if data, err = encodeYAML(doc, rowOrder(order)); err == nil {
					_, err = o.streams.Out.Write(data)
				}
			default:
				_, err = fmt.Fprint(o.streams.Out, e.text())
			}
			return err
		},
	}
	in.addFlags(cmd)
	cmd.Flags().StringVarP(&output, "output", "o", "text", "Output format: text, json or yaml.")
	cmd.Flags().Int64Var(&chunkSize, "chunk-size", DefaultChunkSize, "The page size the query would list with.")
	return cmd
}
