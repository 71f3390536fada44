package kubectltwin

import (
	"time"

	"github.com/spf13/cobra"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/hubtwin"
	"github.com/kubetwin/kubetwin/internal/query"
)

const getLong = `Print one device twin as Azure IoT Hub's twin document (GET /twins/{id}): deviceId, etag,
version, status, connectionState, lastActivityTime, tags, and properties.desired and
properties.reported with their $version and $metadata.

NAME is the DeviceTwin's name in the namespace; when there is none, the twin whose device id is
NAME (device ids may hold upper case letters and characters Kubernetes names cannot). With -A
the device id is looked up in every namespace.`

const getExample = `  # As JSON (the default), by DeviceTwin name or by device id
  kubectl twin get mydeviceid
  kubectl twin get myDeviceId

  # As YAML, or a one-line summary
  kubectl twin get mydeviceid -o yaml
  kubectl twin get mydeviceid -o wide`

func newGetCommand(o *options) *cobra.Command {
	var (
		output    string
		noHeaders bool
	)
	cmd := &cobra.Command{
		Use:     "get NAME",
		Short:   "Print a device twin as IoT Hub's twin JSON document",
		Long:    getLong,
		Example: getExample,
		Args:    args(1, 1, "exactly one NAME (a DeviceTwin name or a device id) is required"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkOutput(output, outputFormats); err != nil {
				return usageError{cmd: cmd, err: err}
			}
			ns, err := o.namespace()
			if err != nil {
				return err
			}
			c, err := o.client()
			if err != nil {
				return err
			}
			t, err := GetTwin(cmd.Context(), c, ns, args[0])
			if err != nil {
				return err
			}
			doc := hubtwin.FromDeviceTwin(t)
			switch output {
			case outputJSON:
				_, err = o.streams.Out.Write(encodeJSON(doc, twinDocOrder))
				return err
			case outputYAML:
				data, err := encodeYAML(doc, twinDocOrder)
				if err != nil {
					return err
				}
				_, err = o.streams.Out.Write(data)
				return err
			}
			ans := &Answer{
				Result: query.Result{ItemType: query.ItemTypeTwin, Items: []map[string]any{doc}},
				Twins: []*Twin{{
					Namespace: t.Namespace, Name: t.Name, Doc: doc,
					InSync: conditionStatus(t, v1alpha1.ConditionInSync),
				}},
			}
			return printResult(o.streams.Out, ans, nil, output, tableOptions{
				noHeaders: noHeaders, withNamespace: o.allNamespaces, now: time.Now(),
			})
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", outputJSON, "Output format: json, yaml, table or wide.")
	cmd.Flags().BoolVar(&noHeaders, "no-headers", false, "When printing a table, leave out the header row.")
	return cmd
}
