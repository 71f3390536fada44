package twin

import "strings"

// maxLabelLength is the longest label name and label value.
const maxLabelLength = 63

// MirrorLabels returns the Kubernetes labels that mirror tags: every scalar
// tag at path a.b.c (its keys joined by dots) becomes the label "a.b.c" with
// the tag's value as text (a string as is, a number as written in JSON,
// a boolean as "true" or "false"). A tag is mirrored only when its path is a
// valid label name without prefix (at most 63 characters, alphanumerics,
// '-', '_' and '.', beginning and ending with an alphanumeric) and its text
// a valid label value (at most 63 characters, empty or beginning and ending
// with an alphanumeric, with '-', '_' and '.' inside), as
// k8s.io/apimachinery's IsQualifiedName and IsValidLabelValue define them.
// A path holding '/' is skipped too, so that a tag can never produce a
// prefixed label such as kubernetes.io/name. Everything else (nulls,
// arrays, empty objects, invalid names or values) is skipped silently. The
// result is never nil.
func MirrorLabels(tags Doc) map[string]string {
	labels := map[string]string{}
	mirror(labels, "", tags)
	return labels
}

func mirror(labels map[string]string, prefix string, d Doc) {
	for k, v := range d {
		path := k
		if prefix != "" {
			path = prefix + "." + k
		}
		if len(path) > maxLabelLength {
			continue // too long for a label, and so is every path below
		}
		var text string
		switch x := v.(type) {
		case map[string]any:
			mirror(labels, path, x)
			continue
		case string:
			text = x
		case bool:
			text = "false"
			if x {
				text = "true"
			}
		default:
			lit, ok := numberLiteral(x)
			if !ok {
				continue
			}
			text = lit
		}
		if IsLabelName(path) && IsLabelValue(text) {
			labels[path] = text
		}
	}
}

// IsLabelName reports whether s is a valid Kubernetes label key without a
// prefix: 1 to 63 characters, alphanumerics, '-', '_' and '.', beginning and
// ending with an alphanumeric (the name part of IsQualifiedName).
func IsLabelName(s string) bool {
	return s != "" && len(s) <= maxLabelLength && labelSyntax(s)
}

// IsLabelValue reports whether s is a valid Kubernetes label value: at most
// 63 characters, empty or beginning and ending with an alphanumeric, with
// '-', '_' and '.' allowed inside (IsValidLabelValue).
func IsLabelValue(s string) bool {
	return s == "" || len(s) <= maxLabelLength && labelSyntax(s)
}

// labelSyntax matches ([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9] on a
// non-empty s.
func labelSyntax(s string) bool {
	if !isAlnum(s[0]) || !isAlnum(s[len(s)-1]) {
		return false
	}
	return strings.IndexFunc(s, func(r rune) bool {
		return !(r < 0x80 && isAlnum(byte(r)) || r == '-' || r == '_' || r == '.')
	}) < 0
}

func isAlnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}
