package query

import "testing"

func TestParseCondition(t *testing.T) {
	for _, tc := range []struct{ cond, err string }{
		{"tags.environment = 'test'", ""},
		{"*", ""},
		{" * ", ""},
		{"configurations.[[a]].status = 'Applied' AND properties.reported.x > 1", ""},
		{"", "line 1, column 1: the condition is empty: write one such as tags.environment = 'test', or * for every twin"},
		{"tags.x = ", "line 1, column 10: expected a value after '='"},
		{"tags.x = 1 )", "line 1, column 12: expected GROUP BY or the end of the query, got ')'"},
		{"tags.x = 1 GROUP BY tags.x", "line 1, column 1: a condition cannot have GROUP BY"},
		{"foo = 1", "line 1, column 1: unknown property 'foo': a path starts with deviceId, status, connectionState, " +
			"lastActivityTime, version, etag, tags, properties, capabilities or configurations"},
	} {
		q, err := ParseCondition(tc.cond)
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%q: %v", tc.cond, err)
		case tc.err != "" && (err == nil || err.Error() != tc.err):
			t.Errorf("%q: error %v, want %s", tc.cond, err, tc.err)
		case tc.err == "" && q.PerTwin() == false:
			t.Errorf("%q: not a per-twin query", tc.cond)
		}
	}
	q, _ := ParseCondition("tags.environment = 'test'")
	if !q.Match(map[string]any{"tags": map[string]any{"environment": "test"}}) || q.Match(map[string]any{"tags": map[string]any{}}) {
		t.Error("the condition does not select what it says")
	}
}
