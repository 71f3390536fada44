package query

import (
	"errors"
	"slices"
	"testing"
)

func TestParseErrors(t *testing.T) {
	tests := []struct{ query, err string }{
		// Structure.
		{"", "line 1, column 1: expected SELECT at the start of the query, got the end of the query"},
		{"SELEC * FROM devices", "line 1, column 1: expected SELECT at the start of the query, got 'SELEC'"},
		{"SELECT * WHERE tags.x = 1", "line 1, column 10: expected FROM after '*', got 'WHERE'"},
		{"SELECT deviceId", "line 1, column 16: expected FROM after the projections, got the end of the query"},
		{"SELECT * FROM", "line 1, column 14: expected a collection after FROM, got the end of the query"},
		{"SELECT * FROM foo", "line 1, column 15: unknown collection 'foo': only FROM devices can be queried"},
		{"SELECT * FROM devices.modules", "line 1, column 15: unknown collection 'devices.modules': only FROM devices can be queried"},
		{"SELECT * FROM devices WHERE", "line 1, column 28: expected a value after 'WHERE'"},
		{"SELECT * FROM devices.", "line 1, column 23: expected a name after '.', got the end of the query"},
		{"SELECT * FROM devices garbage", "line 1, column 23: expected WHERE, GROUP BY or the end of the query, got 'garbage'"},
		{"SELECT * FROM devices WHERE tags.x = 1 garbage", "line 1, column 40: expected GROUP BY or the end of the query, got 'garbage'"},
		{"SELECT COUNT() FROM devices GROUP BY tags.x tags.y", "line 1, column 45: expected the end of the query, got 'tags'"},
		{"SELECT * FROM devices WHERE tags.x = 1 ORDER BY tags.x", "line 1, column 40: ORDER BY is not supported: results come in deviceId order"},
		{"SELECT * FROM devices WHERE tags.x = 1 GROUP tags.x", "line 1, column 46: expected BY after GROUP, got 'tags'"},
		{"SELECT * FROM devices WHERE (tags.x = 1", "line 1, column 40: expected ')' to close the '(' at line 1, column 29, got the end of the query"},
		{"SELECT TOP x * FROM devices", "line 1, column 12: expected a number after TOP, got 'x'"},
		{"SELECT TOP 1.5 * FROM devices", "line 1, column 12: TOP needs a whole number up to 2147483647, got 1.5"},
		{"SELECT *, deviceId FROM devices", "line 1, column 9: '*' cannot be combined with other projections"},
		{"SELECT deviceId, * FROM devices", "line 1, column 18: '*' cannot be mixed with other projections"},
		{"SELECT tags.a.x, tags.b.x FROM devices", "line 1, column 18: duplicate column name 'x': give one of them another name with AS"},
		{"SELECT deviceId AS FROM devices", "line 1, column 20: 'FROM' is a reserved word: write it as [[FROM]]"},
		{"SELECT deviceId AS 'id' FROM devices", "line 1, column 20: expected a name after AS, got the string 'id'"},
		// Values and operators.
		{"SELECT * FROM devices WHERE tags.x = ", "line 1, column 38: expected a value after '='"},
		{"SELECT * FROM devices\nWHERE tags.x =\n\t", "line 3, column 2: expected a value after '='"},
		{"SELECT * FROM devices WHERE tags.x = 'é' AND = 2", "line 1, column 46: expected a value after 'AND'"},
		{"SELECT * FROM devices WHERE tags.x ! 1", "line 1, column 36: unexpected '!': did you mean '!='?"},
		{"SELECT * FROM devices WHERE tags.x = #", "line 1, column 38: unexpected character '#'"},
		{"SELECT * FROM devices WHERE tags.x = \xff", "line 1, column 38: invalid UTF-8 in the query"},
		{"SELECT * FROM devices WHERE tags.x NOT IN ['a']", "line 1, column 36: NOT IN is written NIN"},
		// Strings.
		{"SELECT * FROM devices WHERE tags.x = 'abc", "line 1, column 38: unterminated string: expected a closing '"},
		{`SELECT * FROM devices WHERE tags.x = "abc\"`, `line 1, column 38: unterminated string: expected a closing "`},
		{`SELECT * FROM devices WHERE tags.x = 'a\qb'`, `line 1, column 40: invalid escape '\q' in string: expected one of \' \" \\ \uXXXX`},
		{`SELECT * FROM devices WHERE tags.x = 'a\u12'`, `line 1, column 40: invalid escape: \u needs four hexadecimal digits`},
		{`SELECT * FROM devices WHERE tags.x = 'a\uD800'`, `line 1, column 40: invalid escape: \uD800 must be followed by a low surrogate \uDC00-\uDFFF`},
		{`SELECT * FROM devices WHERE tags.x = 'a\uDC00'`, `line 1, column 40: invalid escape: \uDC00 is a lone low surrogate`},
		// Numbers.
		{"SELECT * FROM devices WHERE tags.x = 12abc", "line 1, column 40: unexpected 'a' after the number 12"},
		{"SELECT * FROM devices WHERE tags.x = 1e999", "line 1, column 38: number 1e999 is out of range"},
		{"SELECT * FROM devices WHERE tags.x = 0x", "line 1, column 40: expected a hexadecimal digit after 0x"},
		{"SELECT * FROM devices WHERE tags.x = 1.", "line 1, column 40: expected a digit after the decimal point"},
		{"SELECT * FROM devices WHERE tags.x = 1e", "line 1, column 40: expected a digit in the exponent"},
		// Arrays.
		{"SELECT * FROM devices WHERE tags.x = ['a']", "line 1, column 38: arrays are only allowed on the right of IN and NIN"},
		{"SELECT ['a'] FROM devices", "line 1, column 8: arrays are only allowed on the right of IN and NIN"},
		{"SELECT * FROM devices WHERE tags.x IN 'a'", "line 1, column 39: expected '[' after IN, got the string 'a'"},
		{"SELECT * FROM devices WHERE tags.x nin ('a')", "line 1, column 40: expected '[' after NIN, got '('"},
		{"SELECT * FROM devices WHERE tags.x IN []", "line 1, column 40: expected a value after '[': IN needs at least one value"},
		{"SELECT * FROM devices WHERE tags.x IN ['a', tags.y]", "line 1, column 45: expected a string, number, true, false or null after ',', got 'tags'"},
		{"SELECT * FROM devices WHERE tags.x IN ['a' 'b']", "line 1, column 44: expected ',' or ']' in the array, got the string 'b'"},
		{"SELECT * FROM devices WHERE tags.x IN [-'a']", "line 1, column 41: expected a number after '-', got the string 'a'"},
		// Paths.
		{"SELECT * FROM devices WHERE foo = 1", "line 1, column 29: unknown property 'foo': a path starts with deviceId, status, connectionState, lastActivityTime, version, etag, tags, properties, capabilities or configurations"},
		{"SELECT * FROM devices WHERE tags.group = 'a'", "line 1, column 34: 'group' is a reserved word: write it as [[group]]"},
		{"SELECT * FROM devices WHERE tags.Select = 'a'", "line 1, column 34: 'Select' is a reserved word: write it as [[Select]]"},
		{"SELECT * FROM devices WHERE tags.[[x", "line 1, column 34: unterminated [[ escape: expected ]]"},
		{"SELECT * FROM devices WHERE tags.[[]] = 1", "line 1, column 34: empty [[ ]] escape: expected a key inside"},
		{"SELECT * FROM devices WHERE tags.1 = 1", "line 1, column 34: expected a name after '.', got the number 1"},
		{"SELECT * FROM devices WHERE deviceId.x = 1", "line 1, column 38: deviceId has no members"},
		{"SELECT * FROM devices WHERE properties.foo.x = 1", "line 1, column 40: expected desired or reported after properties, got 'foo'"},
		{"SELECT * FROM devices WHERE capabilities.foo = 1", "line 1, column 42: unknown capability 'foo': the only one is iotEdge"},
		{"SELECT * FROM devices WHERE capabilities.iotEdge.x = 1", "line 1, column 50: capabilities.iotEdge has no members"},
		{"SELECT * FROM devices WHERE configurations.[[cfg-1]].state = 'Applied'", "line 1, column 54: expected status after configurations.[[cfg-1]], got 'state'"},
		{"SELECT * FROM devices WHERE configurations.c.status.x = 'Applied'", "line 1, column 53: configurations.c.status has no members"},
		{"SELECT * FROM devices WHERE devices = 2", "line 1, column 37: expected '.' and a property after devices, got '='"},
		{"SELECT * FROM devices WHERE [[tags]].x = 2", "line 1, column 29: a path must start with a property name such as tags or properties, not [[tags]]"},
		// Functions.
		{"SELECT * FROM devices WHERE foo(tags.x)", "line 1, column 29: unknown function 'foo'"},
		{"SELECT * FROM devices WHERE CONTAINS(tags.x, 'a')", "line 1, column 29: unknown function 'CONTAINS'"},
		{"SELECT * FROM devices WHERE IS_DEFINED", "line 1, column 39: expected '(' after IS_DEFINED, got the end of the query"},
		{"SELECT * FROM devices WHERE STARTSWITH(tags.x)", "line 1, column 29: STARTSWITH takes 2 arguments, got 1"},
		{"SELECT * FROM devices WHERE is_defined(tags.x tags.y)", "line 1, column 47: expected ',' or ')' after an argument of IS_DEFINED, got 'tags'"},
		// Aggregates.
		{"SELECT deviceId, COUNT() FROM devices", "line 1, column 8: deviceId cannot be projected next to an aggregate without GROUP BY deviceId"},
		{"SELECT COUNT(), tags.x AS x FROM devices", "line 1, column 17: tags.x cannot be projected next to an aggregate without GROUP BY tags.x"},
		{"SELECT COUNT(), tags.x + 1 AS x FROM devices", "line 1, column 17: tags.x + 1 cannot be projected next to an aggregate: only a GROUP BY path can"},
		{"SELECT COUNT(), (tags.x) - 1 AS x FROM devices GROUP BY tags.x", "line 1, column 17: tags.x - 1 is not the GROUP BY path: with GROUP BY tags.x, project that path or aggregates"},
		{"SELECT deviceId, COUNT() FROM devices GROUP BY tags.x", "line 1, column 8: deviceId is not the GROUP BY path: with GROUP BY tags.x, project that path or aggregates"},
		{"SELECT * FROM devices GROUP BY tags.x", "line 1, column 32: GROUP BY cannot be used with SELECT *: project the GROUP BY path and aggregates"},
		{"SELECT COUNT() FROM devices GROUP BY COUNT()", "line 1, column 38: GROUP BY takes a path, not a function call"},
		{"SELECT COUNT() FROM devices GROUP BY 'a'", "line 1, column 38: expected a path after GROUP BY, got the string 'a'"},
		{"SELECT * FROM devices WHERE COUNT() > 1", "line 1, column 29: aggregate COUNT is not allowed in WHERE"},
		{"SELECT COUNT() + 1 FROM devices", "line 1, column 8: aggregate COUNT must be a whole projection, not part of an expression"},
		{"SELECT MAX(COUNT()) FROM devices", "line 1, column 12: aggregate COUNT cannot be an argument of MAX"},
		{"SELECT COUNT(*) FROM devices", "line 1, column 14: COUNT takes no argument: write COUNT()"},
		{"SELECT COUNT(deviceId) FROM devices", "line 1, column 8: COUNT takes 0 arguments, got 1"},
		{"SELECT AVG() FROM devices", "line 1, column 8: AVG takes 1 argument, got 0"},
		{"SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS numberOfDevices\n  FROM devices GROUP BY properties.reported.telemetryConfig.state",
			"line 1, column 8: properties.reported.telemetryConfig.status is not the GROUP BY path: with GROUP BY properties.reported.telemetryConfig.state, project that path or aggregates"},
	}
	for _, tc := range tests {
		t.Run(tc.query, func(t *testing.T) {
			q, err := Parse(tc.query)
			if err == nil {
				t.Fatalf("no error, got %s", q)
			}
			var perr *Error
			if !errors.As(err, &perr) {
				t.Fatalf("error %T is not an *Error: %v", err, err)
			}
			if err.Error() != tc.err {
				t.Errorf("error\n got %q\nwant %q", err.Error(), tc.err)
			}
		})
	}
}

func TestDeeplyNested(t *testing.T) {
	deep := "SELECT * FROM devices WHERE "
	for range 200 {
		deep += "("
	}
	_, err := Parse(deep + "true")
	if err == nil || err.Error() != "line 1, column 129: expression nested too deeply (more than 100 levels)" {
		t.Errorf("got %v", err)
	}
	ok := "SELECT * FROM devices WHERE "
	for range 45 {
		ok += "NOT ("
	}
	ok += "true"
	for range 45 {
		ok += ")"
	}
	mustParse(t, ok)
}

// TestCanonical checks String: canonical spelling, and that parsing it
// gives the same query.
func TestCanonical(t *testing.T) {
	tests := []struct{ query, want string }{
		{"select * from devices", "SELECT * FROM devices"},
		{"SELECT * FROM DEVICES", "SELECT * FROM devices"},
		{"select top 3 deviceid, devices.TAGS.location.region as [[group]] from devices",
			"SELECT TOP 3 deviceId, tags.location.region AS [[group]] FROM devices"},
		{`SELECT * FROM devices WHERE tags.x = "it's \"q\" \\ \u00e9 \uD83D\uDE00 \n"`,
			`SELECT * FROM devices WHERE tags.x = 'it\'s "q" \\ é 😀 \u000A'`},
		{"SELECT * FROM devices WHERE tags.n = 0x1F OR tags.n = 1.50 OR tags.n = 1E3 OR tags.n = -0 OR tags.n = 1e-7",
			"SELECT * FROM devices WHERE tags.n = 31 OR tags.n = 1.5 OR tags.n = 1000 OR tags.n = 0 OR tags.n = 1e-07"},
		{"SELECT * FROM devices WHERE (tags.a = 1 OR tags.b = 2) AND NOT (tags.c <> 3)",
			"SELECT * FROM devices WHERE (tags.a = 1 OR tags.b = 2) AND NOT tags.c != 3"},
		{"SELECT * FROM devices WHERE tags.a = 1 OR (tags.b = 2 AND tags.c = 3)",
			"SELECT * FROM devices WHERE tags.a = 1 OR tags.b = 2 AND tags.c = 3"},
		{"SELECT (1 + 2) * 3 AS a, 1 + (2 * 3) AS b, 1 - (2 - 3) AS c, -(-tags.x) AS d, - -3 AS e FROM devices",
			"SELECT (1 + 2) * 3 AS a, 1 + 2 * 3 AS b, 1 - (2 - 3) AS c, -(-tags.x) AS d, 3 AS e FROM devices"},
		{"SELECT * FROM devices WHERE tags.[[my-key]].[[a b]] nin [ 'x' , -2, true, null ]",
			"SELECT * FROM devices WHERE tags.[[my-key]].[[a b]] NIN ['x', -2, true, null]"},
		{"SELECT * FROM devices WHERE starts_with(tags.x, 'a') and Is_Defined(properties.DESIRED.y)",
			"SELECT * FROM devices WHERE STARTSWITH(tags.x, 'a') AND IS_DEFINED(properties.desired.y)"},
		{"SELECT count() AS n, Max(tags.f) FROM devices WHERE properties.reported.$version > 1 GROUP BY Tags.g",
			"SELECT COUNT() AS n, MAX(tags.f) FROM devices WHERE properties.reported.$version > 1 GROUP BY tags.g"},
		{"SELECT tags.g, COUNT() FROM devices GROUP BY devices.tags.g",
			"SELECT tags.g, COUNT() FROM devices GROUP BY tags.g"},
	}
	for _, tc := range tests {
		t.Run(tc.query, func(t *testing.T) {
			s := mustParse(t, tc.query).String()
			if s != tc.want {
				t.Errorf("String()\n got %s\nwant %s", s, tc.want)
			}
			if again := mustParse(t, s).String(); again != s {
				t.Errorf("String() of the reparsed query\n got %s\nwant %s", again, s)
			}
		})
	}
}

// TestCaseQuotingReserved checks the rules on case, quoting and reserved
// words (docs/queries.md, The language) against the example fleet.
func TestCaseQuotingReserved(t *testing.T) {
	twins := docs(append(slices.Clone(fleet),
		device{id: "quoted", tags: `{"group":"it's","select":{"from":"say \"hi\""},"my-key":"é😀","Location":{"plant":"Redmond43"}}`},
	)...)
	tests := map[string]struct {
		query string
		ids   []string
	}{
		"keywords in any case":          {"sElEcT * FrOm DeViCeS wHeRe TAGS.location.plant = 'Redmond43' aNd NoT (deviceid = 'x')", []string{"myDeviceId"}},
		"root names in any case":        {"SELECT * FROM devices WHERE DeviceId = 'myDeviceId' AND CONNECTIONSTATE = 'Connected'", []string{"myDeviceId"}},
		"devices prefix":                {"SELECT * FROM devices WHERE devices.tags.location.plant = 'Redmond43'", []string{"myDeviceId"}},
		"keys are case-sensitive":       {"SELECT * FROM devices WHERE tags.Location.plant = 'Redmond43'", []string{"quoted"}},
		"properties names in any case":  {"SELECT * FROM devices WHERE Properties.REPORTED.connectivity.type = 'cellular'", []string{"myDeviceId"}},
		"property keys case-sensitive":  {"SELECT * FROM devices WHERE properties.reported.Connectivity.type = 'cellular'", []string{}},
		"string values case-sensitive":  {"SELECT * FROM devices WHERE tags.location.plant = 'redmond43'", []string{}},
		"escaped reserved word":         {"SELECT * FROM devices WHERE tags.[[group]] = 'pilot'", []string{"device-eu2"}},
		"escaped in any case":           {"SELECT * FROM devices WHERE tags.[[select]].[[from]] = 'say \"hi\"'", []string{"quoted"}},
		"escaped non-name":              {"SELECT * FROM devices WHERE tags.[[my-key]] = '\\u00e9\\uD83D\\uDE00'", []string{"quoted"}},
		"single quote escaped":          {`SELECT * FROM devices WHERE tags.[[group]] = 'it\'s'`, []string{"quoted"}},
		"double quotes":                 {`SELECT * FROM devices WHERE tags.[[group]] = "it's"`, []string{"quoted"}},
		"escaped double quote":          {`SELECT * FROM devices WHERE tags.[[select]].[[from]] = "say \"hi\""`, []string{"quoted"}},
		"STARTS_WITH alias":             {"SELECT * FROM devices WHERE starts_with(deviceId, 'my')", []string{"myDeviceId"}},
		"ENDSWITH":                      {"SELECT * FROM devices WHERE EndsWith(deviceId, 'wifi')", []string{"device-wifi"}},
		"hex number":                    {"SELECT * FROM devices WHERE tags.floor = 0x3", []string{"device-wired"}},
		"number and string do not meet": {"SELECT * FROM devices WHERE tags.floor = '3'", []string{"device-wifi"}},
		"!= excludes twins lacking it":  {"SELECT * FROM devices WHERE tags.location.plant != 'Redmond43'", []string{"device-eu2", "device-wifi", "device-wired"}},
		"NIN excludes twins lacking it": {"SELECT * FROM devices WHERE tags.location.plant NIN ['Redmond43', 'Paris2']", []string{"device-wifi", "device-wired"}},
		"NOT of undefined stays false":  {"SELECT * FROM devices WHERE NOT (tags.location.plant = 'Redmond43')", []string{"device-eu2", "device-wifi", "device-wired"}},
		"system members":                {"SELECT * FROM devices WHERE properties.reported.$version = 1 AND properties.desired.$version = 0 AND version = 2", []string{"device-eu2", "device-wifi", "device-wired", "myDeviceId"}},
		"capabilities":                  {"SELECT * FROM devices WHERE capabilities.iotEdge = false AND status = 'enabled' AND tags.[[group]] = 'pilot'", []string{"device-eu2"}},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			if got := ids(run(t, tc.query, twins).Items); !slices.Equal(got, tc.ids) {
				t.Errorf("%s\n got %v\nwant %v", tc.query, got, tc.ids)
			}
		})
	}
}
