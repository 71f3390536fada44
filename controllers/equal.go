package controllers

import "fmt"

func fmtMsg(format string, args ...any) string { return fmt.Sprintf(format, args...) }
