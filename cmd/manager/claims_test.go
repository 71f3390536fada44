package main

import "testing"

// --claims-namespace, else the pod's namespace, else "default".
func TestClaimsNamespace(t *testing.T) {
	for _, tc := range []struct{ flag, pod, want string }{
		{"hub-claims", "kubetwin-system", "hub-claims"},
		{"", "kubetwin-system", "kubetwin-system"},
		{"", "", "default"},
	} {
		t.Setenv("POD_NAMESPACE", tc.pod)
		if got := (options{claimsNS: tc.flag}).claimsNamespace(); got != tc.want {
			t.Errorf("flag %q, POD_NAMESPACE %q: claims namespace %q, want %q", tc.flag, tc.pod, got, tc.want)
		}
	}
}
