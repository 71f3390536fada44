package main

import (
	"slices"
	"testing"
)

func TestWebhookServed(t *testing.T) {
	t.Setenv("POD_NAMESPACE", "")
	tests := map[string]struct {
		w    webhookOptions
		env  string
		want bool
	}{
		"out of cluster, no URL": {webhookOptions{}, "", false},
		"in a pod":               {webhookOptions{}, "kubetwin-system", true},
		"namespace flag":         {webhookOptions{serviceNS: "ops"}, "", true},
		"URL":                    {webhookOptions{url: "https://127.0.0.1:9443"}, "", true},
		"disabled in a pod":      {webhookOptions{disable: true}, "kubetwin-system", false},
		"disabled with URL":      {webhookOptions{disable: true, url: "https://127.0.0.1:9443"}, "", false},
	}
	for name, tt := range tests {
		t.Run(name, func(t *testing.T) {
			t.Setenv("POD_NAMESPACE", tt.env)
			if got := webhookServed(tt.w); got != tt.want {
				t.Errorf("webhookServed = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestCertOptions(t *testing.T) {
	t.Setenv("POD_NAMESPACE", "kubetwin-system")
	w := webhookOptions{serviceName: "kubetwin-webhook-service", secretName: "s", configName: "c", certDir: "/d"}
	_ = w.hosts.Set("127.0.0.1, localhost")
	co, err := certOptions(w)
	if err != nil {
		t.Fatal(err)
	}
	wantHosts := []string{
		"kubetwin-webhook-service.kubetwin-system.svc", "kubetwin-webhook-service.kubetwin-system.svc.cluster.local",
		"kubetwin-webhook-service.kubetwin-system", "kubetwin-webhook-service", "127.0.0.1", "localhost",
	}
	if !slices.Equal(co.Hosts, wantHosts) {
		t.Errorf("hosts = %v", co.Hosts)
	}
	if co.SecretNamespace != "kubetwin-system" || co.SecretName != "s" || co.ConfigName != "c" || co.CertDir != "/d" {
		t.Errorf("options = %+v", co)
	}

	t.Setenv("POD_NAMESPACE", "")
	co, err = certOptions(webhookOptions{url: "https://localhost:9443", secretName: "s"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(co.Hosts, []string{"localhost"}) || co.SecretNamespace != "default" || co.URL != "https://localhost:9443" {
		t.Errorf("URL mode: %+v", co)
	}
	if _, err := certOptions(webhookOptions{url: "not a url"}); err == nil {
		t.Error("bad URL accepted")
	}
}
