package protocol

import "testing"

func TestFilterCovers(t *testing.T) {
	for _, tc := range []struct {
		acl, filter string
		want        bool
	}{
		{"a/b/#", "a/b", true},
		{"a/b/#", "a/b/#", true},
		{"a/b/#", "a/b/c/d", true},
		{"a/b/#", "a/+", false},
		{"a/b/#", "a/#", false},
		{"a/b/#", "#", false},
		{"a/+", "a/x", true},
		{"a/+", "a/+", true},
		{"a/+", "a/#", false},
		{"a/+", "a", false},
		{"a/+", "a/x/y", false},
		{"a/b", "a/b", true},
		{"a/b", "a/+", false},
		{"a/b", "a/c", false},
		{"a/b", "a/b/c", false},
		{"a/+/c", "a/b/c", true},
	} {
		if got := FilterCovers(tc.acl, tc.filter); got != tc.want {
			t.Errorf("FilterCovers(%q, %q) = %v, want %v", tc.acl, tc.filter, got, tc.want)
		}
	}
}

func TestDeviceACL(t *testing.T) {
	const id = "line+1"
	p := DevicePrefix(id) // kubetwin/v1/line%2B1
	for _, tc := range []struct {
		topic string
		want  bool
	}{
		{GetTopic(id, "g1"), true},
		{ReportedTopic(id, "r1"), true},
		{AckTopic(id), true},
		{PresenceTopic(id), true},
		{ResponseTopic(id, "r1"), false},
		{DesiredTopic(id), false},
		{DesiredPatchTopic(id), false},
		{GetTopic("other", "g1"), false},
		{ReportedTopic("line", "r1"), false},
		{p + "/reported/+", false},
		{p + "/reported/#", false},
		{"kubetwin/v1/+/reported/r1", false},
		{"$SYS/broker/uptime", false},
	} {
		if got := DeviceMayPublish(id, tc.topic); got != tc.want {
			t.Errorf("DeviceMayPublish(%q) = %v, want %v", tc.topic, got, tc.want)
		}
	}
	for _, tc := range []struct {
		filter string
		want   bool
	}{
		{ResponseFilter(id), true},
		{ResponseTopic(id, "r1"), true},
		{DesiredFilter(id), true},
		{DesiredTopic(id), true},
		{DesiredPatchTopic(id), true},
		{PresenceTopic(id), true},
		{p + "/#", false},
		{p + "/+", false},
		{p + "/reported/+", false},
		{ResponseFilter("other"), false},
		{"kubetwin/v1/+/desired/#", false},
		{"kubetwin/v1/#", false},
		{"#", false},
		{"$SYS/#", false},
	} {
		if got := DeviceMayReceive(id, tc.filter); got != tc.want {
			t.Errorf("DeviceMayReceive(%q) = %v, want %v", tc.filter, got, tc.want)
		}
	}
}
