package query

import "fmt"

// Error is a malformed query. Line and Column (both from 1; columns count
// characters, not bytes) locate the problem: the offending token, or where
// the missing one should have been.
type Error struct {
	Line, Column int
	Msg          string
}

// Error returns "line L, column C: message".
func (e *Error) Error() string {
	return fmt.Sprintf("line %d, column %d: %s", e.Line, e.Column, e.Msg)
}

// pos is a position in the query text.
type pos struct{ line, col int }

// errorf returns an *Error at p.
func errorf(p pos, format string, args ...any) *Error {
	return &Error{Line: p.line, Column: p.col, Msg: fmt.Sprintf(format, args...)}
}
