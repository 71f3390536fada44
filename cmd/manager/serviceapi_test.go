package main

import (
	"slices"
	"strings"
	"testing"
	"time"
)

func TestServiceAPINamespacesAndHosts(t *testing.T) {
	t.Setenv("POD_NAMESPACE", "kubetwin-system")
	s := serviceAPIOptions{listen: ":10443", policiesSecret: "kubetwin-service-policies"}
	if got := s.policiesNamespace(); got != "kubetwin-system" {
		t.Errorf("policies namespace = %q, want the pod's", got)
	}
	if got := s.registryNamespace(""); got != "kubetwin-system" {
		t.Errorf("registry namespace without --namespace = %q, want the pod's", got)
	}
	if got := s.registryNamespace("fleet"); got != "fleet" {
		t.Errorf("registry namespace with --namespace fleet = %q, want fleet", got)
	}
	if got := s.serviceHostname("hub.example.com"); got != "hub.example.com" {
		t.Errorf("service host name = %q, want the hub's", got)
	}

	// A separate service host name goes into the hub certificate.
	o := options{hubHostname: "mqtt.example.com", service: serviceAPIOptions{hostname: "api.example.com:443"}}
	want := []string{"mqtt.example.com", "api.example.com", "localhost", "127.0.0.1"}
	if got := mqttHosts(o); !slices.Equal(got, want) {
		t.Errorf("mqttHosts = %v, want %v", got, want)
	}
}

func TestCheckServiceAPIFlags(t *testing.T) {
	// svc is a served API with the flags' defaults, changed by f.
	svc := func(f func(*serviceAPIOptions)) serviceAPIOptions {
		s := serviceAPIOptions{listen: ":10443", maxConcurrentQueries: 8, maxQueryPageBytes: 4 << 20, policyReadTimeout: 5 * time.Second}
		if f != nil {
			f(&s)
		}
		return s
	}
	for name, tc := range map[string]struct {
		o    options
		want string
	}{
		"all namespaces":           {options{service: svc(func(s *serviceAPIOptions) { s.registryNS = "devices" })}, ""},
		"registry in the watched":  {options{namespace: "fleet", service: svc(nil)}, ""},
		"registry outside watched": {options{namespace: "fleet", service: svc(func(s *serviceAPIOptions) { s.registryNS = "other" })}, "outside the watched --namespace fleet"},
		"not served":               {options{namespace: "fleet", service: serviceAPIOptions{registryNS: "other"}}, ""},
		"no queries": {options{service: svc(func(s *serviceAPIOptions) { s.maxConcurrentQueries = 0 })},
			"--service-api-max-concurrent-queries must be at least 1, got 0"},
		"no page bytes": {options{service: svc(func(s *serviceAPIOptions) { s.maxQueryPageBytes = -1 })},
			"--service-api-max-query-page-bytes must be at least 1, got -1"},
		"no read time": {options{service: svc(func(s *serviceAPIOptions) { s.policyReadTimeout = 0 })},
			"--service-api-policy-read-timeout must be positive, got 0s"},
	} {
		t.Run(name, func(t *testing.T) {
			err := checkServiceAPIFlags(tc.o)
			switch {
			case tc.want == "" && err != nil:
				t.Errorf("unexpected error: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Errorf("error %v, want one mentioning %q", err, tc.want)
			}
		})
	}
}
