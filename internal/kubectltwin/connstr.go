package kubectltwin

import (
	"context"
	"fmt"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/rest"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

const connectionStringLong = `Print a device's connection string, as IoT Hub prints it:
HostName=<hub host>;DeviceId=<device id>;SharedAccessKey=<key>. It comes from the Secret
<twin name>-device-key the kubetwin operator keeps for every twin (with device authentication, its
default), so reading it needs access to Secrets in the twin's namespace.

NAME is the DeviceTwin's name in the namespace; when there is none, the twin whose device id is NAME.
Devices connect with it over TLS and trust the CA of the ConfigMap kubetwin-mqtt-ca in the operator's
namespace; see docs/security.md.`

const connectionStringExample = `  # The connection string with the primary key
  kubectl twin connection-string mydeviceid

  # With the secondary key (for a key rotation)
  kubectl twin connection-string myDeviceId --key secondary

  # Run a simulated device with it
  device-sim --connection-string "$(kubectl twin connection-string mydeviceid)" --ca-file ca.crt`

func newConnectionStringCommand(o *options) *cobra.Command {
	var key string
	cmd := &cobra.Command{
		Use:     "connection-string NAME",
		Short:   "Print a device's connection string (HostName=...;DeviceId=...;SharedAccessKey=...)",
		Long:    connectionStringLong,
		Example: connectionStringExample,
		Args:    args(1, 1, "exactly one NAME (a DeviceTwin name or a device id) is required"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if key != "primary" && key != "secondary" {
				return usageError{cmd: cmd, err: fmt.Errorf("--key must be primary or secondary, not %q", key)}
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
			cfg, err := o.config.ToRESTConfig()
			if err != nil {
				return err
			}
			cs, err := ConnectionString(cmd.Context(), cfg, t, key == "secondary")
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(o.streams.Out, cs)
			return err
		},
	}
	cmd.Flags().StringVar(&key, "key", "primary", "Which key the connection string carries: primary or secondary.")
	return cmd
}

// ConnectionString returns the connection string of twin t from its key
// Secret, with the primary key or, with secondary, the secondary one.
func ConnectionString(ctx context.Context, cfg *rest.Config, t *v1alpha1.DeviceTwin, secondary bool) (string, error) {
	kc, err := coreClient(cfg)
	if err != nil {
		return "", err
	}
	name := v1alpha1.KeySecretName(t.Name)
	s := &corev1.Secret{}
	err = kc.Get().Namespace(t.Namespace).Resource("secrets").Name(name).Do(ctx).Into(s)
	if apierrors.IsNotFound(err) {
		return "", fmt.Errorf("DeviceTwin %s/%s has no key Secret %s (yet): the operator keeps one for every twin when it authenticates devices (--device-auth=sas)",
			t.Namespace, t.Name, name)
	}
	if err != nil {
		return "", err
	}
	cs, err := sas.ParseConnectionString(string(s.Data[v1alpha1.ConnectionStringKey]))
	if err != nil {
		return "", fmt.Errorf("Secret %s/%s: %s: %w", t.Namespace, name, v1alpha1.ConnectionStringKey, err)
	}
	if secondary {
		cs.SharedAccessKey = string(s.Data[v1alpha1.SecondaryKeyKey])
		if _, err := sas.DecodeKey(cs.SharedAccessKey); err != nil {
			return "", fmt.Errorf("Secret %s/%s: %s: %w", t.Namespace, name, v1alpha1.SecondaryKeyKey, err)
		}
	}
	return cs.String(), nil
}

var coreCodecs = func() serializer.CodecFactory {
	s := runtime.NewScheme()
	if err := corev1.AddToScheme(s); err != nil {
		panic(err)
	}
	return serializer.NewCodecFactory(s)
}()

// coreClient returns a REST client for the core v1 API (Secrets); a
// clientset would add every API's types to the plugin.
func coreClient(cfg *rest.Config) (rest.Interface, error) {
	return restClient(cfg, corev1.SchemeGroupVersion, "/api", coreCodecs)
}
