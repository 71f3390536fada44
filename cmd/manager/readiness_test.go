package main

import "testing"

func TestOwnPod(t *testing.T) {
	t.Setenv("POD_NAMESPACE", "kubetwin-system")
	t.Setenv("POD_NAME", "kubetwin-controller-manager-7d9f-abcde")
	if pod, ok := ownPod(); !ok || pod.String() != "kubetwin-system/kubetwin-controller-manager-7d9f-abcde" {
		t.Errorf("ownPod = %v, %v", pod, ok)
	}
	t.Setenv("POD_NAME", "")
	if pod, ok := ownPod(); ok {
		t.Errorf("ownPod without POD_NAME = %v, want not in a Pod", pod)
	}
}
