package query

import (
	"errors"
	"strings"
)

// conditionPrefix turns a condition into a query that parses whatever may
// follow WHERE (GROUP BY too, to refuse it by name); its length is taken
// off the columns of errors, so they point into the condition.
const conditionPrefix = "SELECT COUNT() FROM devices WHERE "

// ParseCondition parses the WHERE clause of a query without the word
// WHERE, as IoT Hub's configurations write their target condition
// (tags.environment = 'test'); "*" selects every twin. The result is
// SELECT deviceId FROM devices [WHERE condition]. Errors locate the
// problem in the condition's own text.
func ParseCondition(cond string) (*Query, error) {
	switch strings.TrimSpace(cond) {
	case "*":
		return Parse("SELECT deviceId FROM devices")
	case "":
		return nil, &Error{Line: 1, Column: 1, Msg: "the condition is empty: write one such as tags.environment = 'test', or * for every twin"}
	}
	q, err := Parse(conditionPrefix + cond)
	var e *Error
	if errors.As(err, &e) {
		if e.Line == 1 {
			e.Column = max(1, e.Column-len([]rune(conditionPrefix)))
		}
		return nil, e
	}
	if err != nil {
		return nil, err
	}
	if q.groupBy != nil {
		return nil, &Error{Line: 1, Column: 1, Msg: "a condition cannot have GROUP BY"}
	}
	return Parse("SELECT deviceId FROM devices WHERE " + cond)
}
