package kubectltwin

import (
	"context"
	"fmt"
	"slices"
	"strings"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/client-go/rest"

	"github.com/kubetwin/kubetwin/pkg/sas"
)

// DefaultPoliciesSecret is the Secret in the operator's namespace that
// holds the service API's shared access policies (--service-policies-secret).
const DefaultPoliciesSecret = "kubetwin-service-policies"

const serviceConnectionStringLong = `Print a service connection string for one of the hub's shared access policies, as IoT Hub
prints it: HostName=<hub host>;SharedAccessKeyName=<policy>;SharedAccessKey=<key>. Back-end programs
using an Azure IoT service SDK (Registry.fromConnectionString) connect with it to the operator's
service API on port 443 of the hub host.

The policies and their keys are in the Secret kubetwin-service-policies in the operator's namespace
(-n): iothubowner (every right), service (ServiceConnect: twins and queries), registryRead and
registryReadWrite (the device registry). Reading it needs access to Secrets in that namespace.
Rotate a key by editing the Secret; see docs/iothub.md.`

const serviceConnectionStringExample = `  # The iothubowner connection string of an operator installed in kubetwin-system
  kubectl twin service-connection-string -n kubetwin-system

  # Least privilege: the service policy, with its secondary key
  kubectl twin service-connection-string -n kubetwin-system --policy service --key secondary`

func newServiceConnectionStringCommand(o *options) *cobra.Command {
	var policy, key, secret string
	cmd := &cobra.Command{
		Use:     "service-connection-string",
		Short:   "Print a service connection string (HostName=...;SharedAccessKeyName=...;SharedAccessKey=...)",
		Long:    serviceConnectionStringLong,
		Example: serviceConnectionStringExample,
		Args:    args(0, 0, "no arguments are taken; choose the policy with --policy"),
		RunE: func(cmd *cobra.Command, _ []string) error {
			if key != "primary" && key != "secondary" {
				return usageError{cmd: cmd, err: fmt.Errorf("--key must be primary or secondary, not %q", key)}
			}
			ns, err := o.namespace()
			if err != nil {
				return err
			}
			cfg, err := o.config.ToRESTConfig()
			if err != nil {
				return err
			}
			cs, err := ServiceConnectionString(cmd.Context(), cfg, ns, secret, policy, key == "secondary")
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(o.streams.Out, cs)
			return err
		},
	}
	cmd.Flags().StringVar(&policy, "policy", "iothubowner", "Shared access policy: iothubowner, service, registryRead, registryReadWrite, or one you added.")
	cmd.Flags().StringVar(&key, "key", "primary", "Which of the policy's keys the connection string carries: primary or secondary.")
	cmd.Flags().StringVar(&secret, "secret", DefaultPoliciesSecret, "The Secret holding the policies (the operator's --service-policies-secret).")
	return cmd
}

// ServiceConnectionString returns the service connection string of a
// shared access policy from the policies Secret ns/secret: the hub host
// name from its hostName entry and the key from <policy>.primaryKey (or
// <policy>.secondaryKey).
func ServiceConnectionString(ctx context.Context, cfg *rest.Config, ns, secret, policy string, secondary bool) (string, error) {
	kc, err := coreClient(cfg)
	if err != nil {
		return "", err
	}
	s := &corev1.Secret{}
	err = kc.Get().Namespace(ns).Resource("secrets").Name(secret).Do(ctx).Into(s)
	if apierrors.IsNotFound(err) {
		return "", fmt.Errorf("Secret %s/%s not found: it is created by the operator when it serves the service API; "+
			"give the operator's namespace with -n", ns, secret)
	}
	if err != nil {
		return "", err
	}
	host := strings.TrimSpace(string(s.Data["hostName"]))
	if host == "" {
		return "", fmt.Errorf("Secret %s/%s has no hostName entry (the operator writes it)", ns, secret)
	}
	which := "primaryKey"
	if secondary {
		which = "secondaryKey"
	}
	k := policy + "." + which
	v, ok := s.Data[k]
	if !ok {
		return "", fmt.Errorf("Secret %s/%s has no policy %q (no %s entry); its policies: %s", ns, secret, policy, k, strings.Join(policies(s), ", "))
	}
	if _, err := sas.DecodeKey(string(v)); err != nil {
		return "", fmt.Errorf("Secret %s/%s: %s: %w", ns, secret, k, err)
	}
	return "HostName=" + host + ";SharedAccessKeyName=" + policy + ";SharedAccessKey=" + string(v), nil
}

// policies lists the policies of a policies Secret.
func policies(s *corev1.Secret) []string {
	var out []string
	for k := range s.Data {
		if p, ok := strings.CutSuffix(k, ".primaryKey"); ok {
			out = append(out, p)
		}
	}
	if len(out) == 0 {
		return []string{"none"}
	}
	slices.Sort(out)
	return out
}
