package controllers

import (
	"fmt"

	"k8s.io/apimachinery/pkg/api/equality"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
)

func equalStatus(a, b v1alpha1.DeviceTwinStatus) bool {
	return equality.Semantic.DeepEqual(a, b)
}

func fmtMsg(format string, args ...any) string { return fmt.Sprintf(format, args...) }
