// Package kubectltwin is the kubectl plugin kubectl-twin: IoT Hub style
// device twin commands over the DeviceTwins of a cluster.
//
//	kubectl twin query "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'"
//	kubectl twin get mydeviceid
//	kubectl twin explain-query "SELECT ..."
//
// It follows kubectl's conventions: the kubeconfig, --context, -n and -A
// flags (through k8s.io/cli-runtime), -o json|yaml|table|wide, errors on
// stderr as "error: ..." and exit status 1. Queries are parsed by
// internal/query, listed with the label and field selectors of the query's
// plan (page by page), rendered with internal/hubtwin and answered by the
// query's evaluator, so the answer is the one IoT Hub would give.
package kubectltwin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/cli-runtime/pkg/genericclioptions"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	"k8s.io/client-go/rest"

	"github.com/kubetwin/kubetwin/internal/query"
)

// options are the flags every command shares.
type options struct {
	config        *genericclioptions.ConfigFlags
	allNamespaces bool
	streams       genericiooptions.IOStreams
}

// namespace returns the namespace to work in: "" with -A, else -n, else
// the kubeconfig context's namespace, else "default".
func (o *options) namespace() (string, error) {
	if o.allNamespaces {
		return "", nil
	}
	ns, _, err := o.config.ToRawKubeConfigLoader().Namespace()
	return ns, err
}

// client returns a REST client for DeviceTwins.
func (o *options) client() (rest.Interface, error) {
	cfg, err := o.config.ToRESTConfig()
	if err != nil {
		return nil, err
	}
	return NewClient(cfg)
}

const rootLong = `Query and read IoT device twins kept as DeviceTwin resources, the way Azure IoT Hub does.

kubetwin keeps one DeviceTwin per device: tags and desired properties in spec, reported
properties, versions and presence in status. This plugin shows them as IoT Hub twin
documents and answers IoT Hub's query language over them:

  SELECT [TOP n] <* | expression [AS alias], ...> FROM devices [WHERE condition] [GROUP BY path]

Paths: deviceId, status, connectionState, lastActivityTime, version, etag, tags.a.b,
properties.desired.a.b, properties.reported.a.b, capabilities.iotEdge, and
configurations.[[name]].status ('Targeted' or 'Applied', set by a TwinConfiguration). Operators:
= != <> < > <= >= IN NIN AND OR NOT + - * / %. Functions: IS_DEFINED, STARTSWITH, ENDSWITH,
and the aggregates COUNT, AVG, SUM, MIN, MAX. A missing property matches no comparison.

The plugin uses your kubeconfig like kubectl: --kubeconfig, --context, -n/--namespace and
-A/--all-namespaces choose the cluster and the namespaces.`

const rootExample = `  # Devices in a plant (tags are mirrored into labels, so the API server does the filtering)
  kubectl twin query "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'"

  # Projections and aggregates print as rows
  kubectl twin query "SELECT properties.reported.connectivity.type AS type, COUNT() AS n FROM devices GROUP BY properties.reported.connectivity.type"

  # One twin as IoT Hub's JSON document (by DeviceTwin name or device id)
  kubectl twin get mydeviceid

  # A device's IoT Hub connection string (from the key Secret the operator keeps)
  kubectl twin connection-string mydeviceid

  # A service connection string for back ends using an Azure IoT service SDK
  kubectl twin service-connection-string -n kubetwin-system --policy service

  # Follow a TwinConfiguration's rollout to its devices
  kubectl twin rollout status telemetry-30s --timeout 5m

  # What is sent to the API server and what is filtered here
  kubectl twin explain-query "SELECT * FROM devices WHERE tags.location.region = 'US' AND connectionState = 'Connected'"`

// NewCommand returns the kubectl-twin command with its subcommands, writing
// to streams.
func NewCommand(streams genericiooptions.IOStreams) *cobra.Command {
	o := &options{
		config:  genericclioptions.NewConfigFlags(true).WithWarningPrinter(streams),
		streams: streams,
	}
	root := &cobra.Command{
		Use:     "kubectl-twin",
		Short:   "Query and read IoT device twins (DeviceTwin resources) with IoT Hub's query language",
		Long:    rootLong,
		Example: rootExample,
		Annotations: map[string]string{
			cobra.CommandDisplayNameAnnotation: "kubectl twin",
		},
		SilenceErrors: true,
		SilenceUsage:  true,
		// Without a subcommand: help.
		Run: func(cmd *cobra.Command, _ []string) { _ = cmd.Help() },
	}
	root.CompletionOptions.HiddenDefaultCmd = true
	root.SetIn(streams.In)
	root.SetOut(streams.Out)
	root.SetErr(streams.ErrOut)
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return usageError{cmd: cmd, err: err}
	})

	flags := root.PersistentFlags()
	o.config.AddFlags(flags)
	flags.BoolVarP(&o.allNamespaces, "all-namespaces", "A", false,
		"If present, work across all namespaces. Namespace in current context is ignored even if specified with --namespace.")

	root.AddCommand(
		newQueryCommand(o),
		newGetCommand(o),
		newConnectionStringCommand(o),
		newServiceConnectionStringCommand(o),
		newExplainCommand(o),
		newRolloutCommand(o),
		newVersionCommand(o),
		newOptionsCommand(root),
	)
	// As kubectl: subcommands list their own flags and point at
	// "kubectl twin options" for the global ones.
	root.SetUsageTemplate(rootUsage)
	for _, c := range root.Commands() {
		c.SetUsageTemplate(subcommandUsage)
	}
	return root
}

// Main runs the plugin with args (without the program name) and returns
// the exit status: errors are written to streams.ErrOut as kubectl writes
// them ("error: ...") and give 1.
func Main(ctx context.Context, args []string, streams genericiooptions.IOStreams) int {
	root := NewCommand(streams)
	root.SetArgs(args)
	if err := root.ExecuteContext(ctx); err != nil {
		printError(streams.ErrOut, err)
		return 1
	}
	return 0
}

// usageError is a command line mistake: shown with a pointer to --help.
type usageError struct {
	cmd *cobra.Command
	err error
}

func (e usageError) Error() string { return e.err.Error() }

// queryError is a malformed query with the text it was found in, so the
// error can show where the problem is.
type queryError struct {
	err  *query.Error
	text string
}

func (e queryError) Error() string { return e.err.Error() }

// printError writes err as kubectl does.
func printError(w io.Writer, err error) {
	var ue usageError
	var qe queryError
	var status apierrors.APIStatus
	switch {
	case errors.As(err, &ue):
		fmt.Fprintf(w, "error: %v\nSee '%s -h' for help and examples\n", ue.err, ue.cmd.CommandPath())
	case errors.As(err, &qe):
		fmt.Fprintf(w, "error: %v\n", qe.err)
		fmt.Fprint(w, pointAt(qe.text, qe.err.Line, qe.err.Column))
	case errors.As(err, &status) && status.Status().Reason != "":
		fmt.Fprintf(w, "Error from server (%s): %s\n", status.Status().Reason, status.Status().Message)
	default:
		fmt.Fprintf(w, "error: %v\n", err)
	}
}

// pointAt returns line l of text and a caret under column c (both from 1,
// columns in characters), indented, or "" when they are out of range.
func pointAt(text string, l, c int) string {
	lines := strings.Split(text, "\n")
	if l < 1 || l > len(lines) || c < 1 {
		return ""
	}
	line := []rune(strings.TrimRight(lines[l-1], "\r"))
	if c > len(line)+1 {
		return ""
	}
	var pad strings.Builder
	for _, r := range line[:c-1] {
		if r == '\t' {
			pad.WriteRune('\t') // keep the caret under the character
		} else {
			pad.WriteByte(' ')
		}
	}
	return "  " + string(line) + "\n  " + pad.String() + "^\n"
}

// newOptionsCommand prints the global flags, as kubectl options does.
func newOptionsCommand(root *cobra.Command) *cobra.Command {
	return &cobra.Command{
		Use:   "options",
		Short: "Print the list of flags inherited by all commands",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Fprintf(cmd.OutOrStdout(), "The following options can be passed to any command:\n\n%s",
				root.PersistentFlags().FlagUsages())
		},
	}
}

const subcommandUsage = `{{if .HasExample}}Examples:
{{.Example}}

{{end}}{{if .HasAvailableLocalFlags}}Options:
{{.LocalFlags.FlagUsages | trimTrailingWhitespaces}}

{{end}}Usage:
  {{.UseLine}}

Use "kubectl twin options" for a list of global command-line options (applies to all commands).
`

const rootUsage = `{{if .HasExample}}Examples:
{{.Example}}

{{end}}Commands:{{range .Commands}}{{if (or .IsAvailableCommand (eq .Name "help"))}}
  {{rpad .Name .NamePadding }} {{.Short}}{{end}}{{end}}

Usage:
  kubectl twin [command] [options]

Use "kubectl twin <command> --help" for more information about a command.
Use "kubectl twin options" for a list of global command-line options (applies to all commands).
`

// args checks the number of arguments of a command: from min to max
// (max < 0: any), naming what they are in the error.
func args(minN, maxN int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, a []string) error {
		if len(a) < minN || (maxN >= 0 && len(a) > maxN) {
			return usageError{cmd: cmd, err: fmt.Errorf("%s", what)}
		}
		return nil
	}
}

// stdStreams are the process's standard streams.
func stdStreams() genericiooptions.IOStreams {
	return genericiooptions.IOStreams{In: os.Stdin, Out: os.Stdout, ErrOut: os.Stderr}
}

// Run is Main over the process's arguments and standard streams.
func Run() int {
	return Main(context.Background(), os.Args[1:], stdStreams())
}
