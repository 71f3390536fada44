package main

import (
	"context"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/pkg/sas"
)

// TestConnectionString reads the connection string from the key Secret
// the operator keeps (written here by hand: no operator runs in this suite).
func TestConnectionString(t *testing.T) {
	primary, secondary := sas.NewKey(), sas.NewKey()
	cs := sas.ConnectionString{HostName: "hub.example", DeviceID: "myDeviceId", SharedAccessKey: primary}
	s := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: fleetNS, Name: v1alpha1.KeySecretName("mydeviceid")},
		StringData: map[string]string{
			v1alpha1.PrimaryKeyKey: primary, v1alpha1.SecondaryKeyKey: secondary, v1alpha1.ConnectionStringKey: cs.String(),
		},
	}
	if err := k8s.Create(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), s) })

	for _, args := range [][]string{{"connection-string", "mydeviceid"}, {"connection-string", "myDeviceId"}} {
		if r := ok(t, args...); r.stdout != cs.String()+"\n" {
			t.Errorf("%q printed %q, want %q", args, r.stdout, cs.String())
		}
	}
	r := ok(t, "connection-string", "mydeviceid", "--key", "secondary")
	if want := "HostName=hub.example;DeviceId=myDeviceId;SharedAccessKey=" + secondary + "\n"; r.stdout != want {
		t.Errorf("--key secondary printed %q, want %q", r.stdout, want)
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"connection-string", "mydeviceid", "--key", "tertiary"}, "--key must be primary or secondary"},
		{[]string{"connection-string"}, "exactly one NAME"},
		{[]string{"connection-string", "no-such-twin"}, "not found"},
	} {
		r := twinctl(t, tc.args...)
		if r.code == 0 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%q: exit %d, stderr %q, want an error with %q", tc.args, r.code, r.stderr, tc.want)
		}
	}
	// A twin without a key Secret: says why.
	var list v1alpha1.DeviceTwinList
	if err := k8s.List(context.Background(), &list); err != nil {
		t.Fatal(err)
	}
	for _, tw := range list.Items {
		if tw.Namespace == fleetNS && tw.Name != "mydeviceid" {
			r := twinctl(t, "connection-string", tw.Name)
			if r.code == 0 || !strings.Contains(r.stderr, "no key Secret") {
				t.Errorf("twin without a Secret: exit %d, stderr %q", r.code, r.stderr)
			}
			break
		}
	}
}

// TestServiceConnectionString reads a policy's connection string from the
// policies Secret the operator keeps (written here by hand).
func TestServiceConnectionString(t *testing.T) {
	ownerPrimary, ownerSecondary, servicePrimary := sas.NewKey(), sas.NewKey(), sas.NewKey()
	s := &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Namespace: fleetNS, Name: "kubetwin-service-policies"},
		StringData: map[string]string{
			"hostName":                 "hub.example",
			"iothubowner.primaryKey":   ownerPrimary,
			"iothubowner.secondaryKey": ownerSecondary,
			"service.primaryKey":       servicePrimary,
			"service.secondaryKey":     "not base64!",
		},
	}
	if err := k8s.Create(context.Background(), s); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k8s.Delete(context.Background(), s) })

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"service-connection-string", "-n", fleetNS}, "HostName=hub.example;SharedAccessKeyName=iothubowner;SharedAccessKey=" + ownerPrimary},
		{[]string{"service-connection-string", "-n", fleetNS, "--key", "secondary"}, "HostName=hub.example;SharedAccessKeyName=iothubowner;SharedAccessKey=" + ownerSecondary},
		{[]string{"service-connection-string", "-n", fleetNS, "--policy", "service"}, "HostName=hub.example;SharedAccessKeyName=service;SharedAccessKey=" + servicePrimary},
	} {
		if r := ok(t, tc.args...); r.stdout != tc.want+"\n" {
			t.Errorf("%q printed %q, want %q", tc.args, r.stdout, tc.want)
		}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"service-connection-string", "-n", fleetNS, "--policy", "registryRead"}, `no policy "registryRead" (no registryRead.primaryKey entry); its policies: iothubowner, service`},
		{[]string{"service-connection-string", "-n", fleetNS, "--policy", "service", "--key", "secondary"}, "service.secondaryKey"},
		{[]string{"service-connection-string", "-n", fleetNS, "--key", "tertiary"}, "--key must be primary or secondary"},
		{[]string{"service-connection-string", "-n", "default"}, "Secret default/kubetwin-service-policies not found"},
		{[]string{"service-connection-string", "iothubowner"}, "no arguments are taken"},
	} {
		r := twinctl(t, tc.args...)
		if r.code == 0 || !strings.Contains(r.stderr, tc.want) {
			t.Errorf("%q: exit %d, stderr %q, want an error with %q", tc.args, r.code, r.stderr, tc.want)
		}
	}
}
