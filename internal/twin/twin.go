// Package twin implements the documents of an Azure IoT Hub style device
// twin: the tags, desired and reported sections, the JSON merge patches
// (RFC 7386) that change them, and their $metadata.
//
// A section or patch is a [Doc]: a JSON object whose values are strings,
// json.Number, bools, nested Docs and, in patches only, nil (which deletes a
// key). Numbers are kept as json.Number so that integers stay exact; [Equal]
// compares them by value, so "1", "1.0" and float64(1) are the same number.
//
// Parsing and checking are separate steps. [Decode], [DecodeRaw] and
// [FromAny] accept any JSON object (nested arrays included, kept as []any)
// and refuse only what is not one; [ValidateDocument] and [ValidatePatch]
// then enforce the twin rules (no arrays, key syntax, nesting, string,
// number and size limits) and name the offending path in an [*Error], which
// they can do because the caller gives them the section's path. So callers
// decode, validate, then merge with [MergePatch], and compute notifications
// with [Diff], convergence with [Delta], $metadata with [UpdateMetadata] and
// tag labels with [MirrorLabels].
//
// The package uses only the standard library, so it can be used by the
// operator, the MQTT and HTTP front ends, and device-side code alike.
package twin

import (
	"slices"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// Doc is a twin section or patch: a JSON object whose values are string,
// json.Number, bool, Doc (map[string]any) and nil (only in patches, where nil
// deletes the key). Documents that have not been validated may also hold
// arrays ([]any); [ValidateDocument] and [ValidatePatch] refuse them.
type Doc = map[string]any

// Section names one of the three sections of a twin.
type Section int

const (
	// Tags is the back-end-only section (spec.tags), at most 8 KB.
	Tags Section = iota
	// Desired is the section the back end writes and the device applies
	// (spec.desired), at most 32 KB.
	Desired
	// Reported is the section the device writes (status.reported), at most
	// 32 KB.
	Reported
)

// String returns the section's name: "tags", "desired" or "reported".
func (s Section) String() string {
	switch s {
	case Tags:
		return "tags"
	case Desired:
		return "desired"
	case Reported:
		return "reported"
	}
	return "Section(" + strconv.Itoa(int(s)) + ")"
}

// MaxSize returns the largest [Size] a document of the section may have:
// 8 KB for tags, 32 KB for desired and reported, 0 for an unknown section.
func (s Section) MaxSize() int {
	switch s {
	case Tags:
		return 8 * 1024
	case Desired, Reported:
		return 32 * 1024
	}
	return 0
}

// MaxStoredSize returns the largest [StoredSize] a document of the section
// may have: 256 KiB for desired and reported, 0 (no such rule) for tags,
// which have no $metadata and at most 6 times 8 KB of escaped JSON.
//
// A 32 KB document of 1,800 numbers under 10-byte keys takes 227 KB with its
// desired $metadata; one of 2,700 booleans under 8-byte keys, 326 KB. With
// 256 KiB for each section, the status the operator writes (reported and its
// $metadata, the published desired document and its $metadata, and the
// delta, at most the desired JSON) stays below 720 KiB, half of etcd's
// 1.5 MiB request limit.
func (s Section) MaxStoredSize() int {
	switch s {
	case Desired, Reported:
		return 256 * 1024
	}
	return 0
}

// Limits of the twin document rules.
const (
	// MaxDepth is how many levels of objects a section may have below its
	// root: the root object is level 0, and an object at level MaxDepth is
	// the deepest allowed.
	MaxDepth = 10
	// MaxKeyLength is the longest key, in bytes.
	MaxKeyLength = 1024
	// MaxStringLength is the longest string value, in bytes.
	MaxStringLength = 4096
	// MaxInt is the largest magnitude of an integer: integers must lie in
	// [-MaxInt, MaxInt].
	MaxInt = 1 << 52
)

// Error is a violation of a twin document rule. Path locates the offending
// value (for a bad key, the object holding it; for a size violation, the
// section) and Rule says what is wrong. The validators return it as *Error,
// so use errors.As with a *Error target.
type Error struct {
	// Path is where the problem is, keys joined by dots after the caller's
	// prefix, e.g. "spec.desired.telemetry.intervals". A key that would be
	// ambiguous in a dotted path is quoted: spec.desired["a[0]"].
	Path string
	// Rule is the rule that was broken, e.g. "arrays are not allowed in
	// device twins".
	Rule string
}

// Error returns "<path>: <rule>", or just the rule when the path is empty.
func (e *Error) Error() string {
	if e.Path == "" {
		return e.Rule
	}
	return e.Path + ": " + e.Rule
}

// joinPath returns the path of member key of the object at path. Keys that
// would make a dotted path ambiguous are written as ["key"].
func joinPath(path, key string) string {
	if !plainKey(key) {
		return path + "[" + strconv.Quote(key) + "]"
	}
	if path == "" {
		return key
	}
	return path + "." + key
}

// plainKey reports whether key can appear bare in a dotted path.
func plainKey(key string) bool {
	if key == "" || !utf8.ValidString(key) {
		return false
	}
	for _, r := range key {
		switch {
		case r == '.', r == ' ', r == '[', r == ']', r == '"', r == '\\', unicode.IsControl(r):
			return false
		}
	}
	return true
}

// sortedKeys returns the keys of d in increasing order.
func sortedKeys(d map[string]any) []string {
	keys := make([]string, 0, len(d))
	for k := range d {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// hasDollarPrefix reports whether key is a system member such as $version.
func hasDollarPrefix(key string) bool { return strings.HasPrefix(key, "$") }
