package kubectltwin

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/rest"

	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/queryapi/wire"
)

// queryInput is how a command gets its query: the arguments (joined by
// spaces) or -f FILE.
type queryInput struct {
	file string
}

func (in *queryInput) addFlags(cmd *cobra.Command) {
	cmd.Flags().StringVarP(&in.file, "filename", "f", "", "Read the query from this file ('-' for stdin) instead of the arguments.")
}

// parse returns the parsed query, or a queryError pointing at the problem.
func (in *queryInput) parse(cmd *cobra.Command, args []string) (*query.Query, string, error) {
	var text string
	switch {
	case in.file != "" && len(args) > 0:
		return nil, "", usageError{cmd: cmd, err: errors.New("give the query as an argument or with -f, not both")}
	case in.file == "-":
		data, err := io.ReadAll(cmd.InOrStdin())
		if err != nil {
			return nil, "", err
		}
		text = string(data)
	case in.file != "":
		data, err := os.ReadFile(in.file)
		if err != nil {
			return nil, "", err
		}
		text = string(data)
	case len(args) == 0:
		return nil, "", usageError{cmd: cmd, err: errors.New(`a query is required, e.g. "SELECT * FROM devices"`)}
	default:
		text = strings.Join(args, " ")
	}
	if in.file != "" {
		// A file ends with a newline: an error at the end of the query
		// should point at the end of its last line, not at an empty one.
		text = strings.TrimRight(text, " \t\r\n")
	}
	q, err := query.Parse(text)
	if err != nil {
		var qe *query.Error
		if errors.As(err, &qe) {
			return nil, text, queryError{err: qe, text: text}
		}
		return nil, text, err
	}
	return q, text, nil
}

const queryLong = `Run an IoT Hub query over the DeviceTwins of the namespace (or of all namespaces with -A).

  SELECT [TOP n] <* | expression [AS alias], ...> FROM devices [WHERE condition] [GROUP BY path]

The answer is the one IoT Hub gives: rows in deviceId order, a missing property matches no
comparison (so != and NIN skip devices without it), GROUP BY gives one row per group.

What the API server can filter is sent as a label selector (tags are mirrored into labels) and a
field selector (deviceId, connectionState); the whole condition is then checked here on every
twin the server returns. 'kubectl twin explain-query' shows the split. Big fleets are listed in
pages of --chunk-size twins.

When the cluster serves the operator's query API (query.kubetwin.io, an APIService the chart
installs), the query goes there instead: the operator answers from its cache (a large answer in parts),
and RBAC still decides (you need to list the DeviceTwins of the namespace, or of all namespaces
with -A). --via chooses; --verbose says which way was taken.

Output (-o):
  table  (default) SELECT * gives a row per device: DEVICE, CONNECTION, LAST ACTIVITY and the
         $version of the DESIRED and REPORTED properties; projections and aggregates give the
         query's columns, <none> where a value is undefined
  wide   also INSYNC, VERSION, STATUS, the DeviceTwin NAME and the TAGS
  json   a JSON array as IoT Hub's query API returns it: twin documents for SELECT *, else rows
  yaml   the same as YAML`

const queryExample = `  # The getting-started scenario: devices in a plant, then those of them on cellular
  kubectl twin query "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'"
  kubectl twin query "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43' AND properties.reported.connectivity.type = 'cellular'"

  # Across all namespaces, as IoT Hub JSON
  kubectl twin query -A -o json "SELECT * FROM devices WHERE properties.reported.connectivity.type IN ['wired', 'wifi']"

  # Projections and aggregates
  kubectl twin query "SELECT DeviceId, LastActivityTime FROM devices WHERE connectionState = 'Disconnected'"
  kubectl twin query "SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS numberOfDevices FROM devices GROUP BY properties.reported.telemetryConfig.status"
  kubectl twin query "SELECT COUNT() AS totalNumberOfDevices FROM devices"

  # A long query from a file
  kubectl twin query -f fleet-report.sql`

func newQueryCommand(o *options) *cobra.Command {
	var (
		in        queryInput
		output    string
		noHeaders bool
		chunkSize int64
		via       string
		verbose   bool
	)
	cmd := &cobra.Command{
		Use:     `query "SELECT ..."`,
		Aliases: []string{"q"},
		Short:   "Run an IoT Hub query (SELECT ... FROM devices ...) over the DeviceTwins",
		Long:    queryLong,
		Example: queryExample,
		Args:    cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output, outputFormats); err != nil {
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
			if via != ViaAuto && via != ViaAPI && via != ViaList {
				return usageError{cmd: cmd, err: fmt.Errorf("--via %q: want auto, api or list", via)}
			}
			// Buffered: a table's writer writes every cell on its own.
			out := bufio.NewWriterSize(o.streams.Out, 64<<10)
			// -o json of an answer of the query API is written from its
			// bytes, part by part, each while the next is asked for; -o
			// yaml and the cells of a table of rows likewise, and a table
			// of twins decodes only its columns.
			var (
				list  *rawList
				ylist *yamlList
				cells *rowCells
				sink  func([]json.RawMessage) error
			)
			switch {
			case output == outputJSON:
				list = newRawList(out, itemOrder(q.ItemType(), q.Columns()), itemSorted(q.ItemType()))
				sink = list.add
			case output == outputYAML:
				ylist = newYAMLList(out, itemOrder(q.ItemType(), q.Columns()))
				sink = ylist.add
			case q.ItemType() == query.ItemTypeRaw:
				cells = &rowCells{columns: q.Columns()}
				sink = cells.add
			}
			start := time.Now()
			ans, note, err := o.execute(cmd.Context(), ns, q, chunkSize, via, sink)
			if err != nil {
				_ = out.Flush() // what was written of the answer
				return err
			}
			if verbose {
				fmt.Fprintln(o.streams.ErrOut, describeAnswer(ans, note, time.Since(start)))
			}
			if ans.Len() == 0 && (output == outputTable || output == outputWide) {
				fmt.Fprintln(o.streams.ErrOut, noDevices(ns))
				return nil
			}
			switch {
			case ans.Streamed > 0 && list != nil:
				err = list.close()
			case ans.Streamed > 0 && ylist != nil:
				err = ylist.close()
			case ans.Streamed > 0:
				err = cells.print(out, tableOptions{noHeaders: noHeaders})
			default:
				err = printResult(out, ans, q.Columns(), output, tableOptions{
					noHeaders: noHeaders, withNamespace: o.allNamespaces, now: time.Now(),
				})
			}
			if err != nil {
				return err
			}
			return out.Flush()
		},
	}
	in.addFlags(cmd)
	cmd.Flags().StringVarP(&output, "output", "o", outputTable, "Output format: json, yaml, table or wide.")
	cmd.Flags().BoolVar(&noHeaders, "no-headers", false, "When printing a table, leave out the header row.")
	cmd.Flags().Int64Var(&chunkSize, "chunk-size", DefaultChunkSize,
		"List DeviceTwins in pages of this many (limit and continue); 0 lists them in one request.")
	cmd.Flags().StringVar(&via, "via", ViaAuto,
		"How to answer: api (the operator's query API, query.kubetwin.io), list (list the DeviceTwins and evaluate here), "+
			"or auto (the query API when the cluster serves it, else list).")
	cmd.Flags().BoolVar(&verbose, "verbose", false, "Say on stderr how the query was answered (query API or listing) and how long it took.")
	return cmd
}

// execute answers q the way via says (the items of the query API's
// answer are kept as they came: Answer.Raw, or given to sink when it is
// not nil, QueryAPI.Sink); with auto, it uses the query API
// when kube-apiserver serves it and lists otherwise, or when the API
// cannot answer (too large an answer, a namespace its operator does not
// watch, RBAC). The note says why it listed.
//
// For one namespace it asks that namespace's shard (wire.ShardGroup)
// first, then the cluster's query API (wire.Group). Over every namespace
// without the latter, a query is answered from the twins the shards match
// and a listing of the other namespaces (ExecuteShards).
func (o *options) execute(ctx context.Context, ns string, q *query.Query, chunkSize int64, via string, sink func([]json.RawMessage) error) (*Answer, string, error) {
	cfg, err := o.config.ToRESTConfig()
	if err != nil {
		return nil, "", err
	}
	var note string
	if via != ViaList {
		ans, why, err := executeAPI(ctx, cfg, ns, q, sink)
		var after *afterOutputError
		switch {
		case ans != nil:
			return ans, "", nil
		case errors.As(err, &after):
			return nil, "", err
		case via == ViaAPI && err != nil:
			return nil, "", err
		case via == ViaAPI:
			return nil, "", errors.New("--via api: " + why)
		}
		note = why
	}
	c, err := NewClient(cfg)
	if err != nil {
		return nil, "", err
	}
	if via == ViaAuto && ns == "" {
		// No query API over every namespace: the shards', if any.
		ans, err := ExecuteShards(ctx, cfg, c, q, chunkSize)
		if ans != nil {
			return ans, "", nil
		}
		if err != nil {
			note += "; the shards did not answer: " + err.Error()
		}
	}
	ans, err := Execute(ctx, c, ns, q, chunkSize)
	if err != nil {
		return nil, "", listError(err)
	}
	return ans, note, nil
}

// executeAPI answers q through the query API: the shard group of ns
// first (when ns is set), then wire.Group. It returns the first answer;
// else why none answered and, when a served API refused the query, its
// error (the last one).
func executeAPI(ctx context.Context, cfg *rest.Config, ns string, q *query.Query, sink func([]json.RawMessage) error) (*Answer, string, error) {
	groups := []string{wire.Group}
	if ns != "" {
		groups = []string{wire.ShardGroup(ns), wire.Group}
	}
	var (
		why     []string
		lastErr error
	)
	for i, g := range groups {
		api, err := NewQueryAPI(cfg, g)
		if err != nil {
			return nil, "", err
		}
		api.KeepRaw, api.Sink = true, sink
		served, reason := api.Served(ctx)
		if !served {
			// A shard group that is not installed is the common case: the
			// cluster's API is the one to explain.
			var absent *notInstalledError
			if i == len(groups)-1 || !errors.As(reason, &absent) {
				why = append(why, reason.Error())
			}
			continue
		}
		ans, err := api.Execute(ctx, ns, q)
		var after *afterOutputError
		if err == nil || errors.As(err, &after) {
			return ans, "", err
		}
		lastErr = err
		why = append(why, wire.GroupVersionOf(g)+" did not answer: "+err.Error())
	}
	return nil, strings.Join(why, "; "), lastErr
}

// describeAnswer is the --verbose line.
func describeAnswer(ans *Answer, note string, took time.Duration) string {
	took = took.Round(time.Millisecond)
	if ans.Via == ViaAPI {
		s := fmt.Sprintf("answered by the query API (%s, the operator's cache) in %v: %d items, %d twins evaluated",
			wire.GroupVersionOf(ans.Group), took, ans.Len(), ans.Listed)
		if ans.Parts > 1 {
			s += fmt.Sprintf(", in %d parts (the answer is larger than the operator sends at once)", ans.Parts)
		}
		return s
	}
	if ans.Via == ViaShards {
		return fmt.Sprintf("answered by the shards' query APIs (%s: %d twins evaluated) and by listing %d DeviceTwins "+
			"of the other namespaces (%d pages) in %v: %d items", strings.Join(ans.Shards, ", "), ans.Evaluated,
			ans.Listed, ans.Pages, took, len(ans.Items))
	}
	s := fmt.Sprintf("answered by listing %d DeviceTwins (%d pages) in %v: %d items", ans.Listed, ans.Pages, took, len(ans.Items))
	if note != "" {
		s += "; not through the query API: " + note
	}
	return s
}

// noDevices is the message for an empty table, as kubectl's "No resources found".
func noDevices(ns string) string {
	if ns == "" {
		return "No devices found."
	}
	return fmt.Sprintf("No devices found in %s namespace.", ns)
}

// listError explains a failed LIST of DeviceTwins.
func listError(err error) error {
	if apierrors.IsNotFound(err) {
		return errNoCRD
	}
	return err
}
