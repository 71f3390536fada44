package query

import (
	"encoding/json"
	"math"
	"strconv"
	"strings"

	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/selection"

	"github.com/kubetwin/kubetwin/api/v1alpha1"
	"github.com/kubetwin/kubetwin/internal/twin"
)

// Selectable fields of the DeviceTwin CRD used by plans.
const (
	// FieldDeviceID is the field selector key of status.deviceId.
	FieldDeviceID = "status.deviceId"
	// FieldConnectionState is the field selector key of
	// status.connectionState.
	FieldConnectionState = "status.connectionState"
)

// Plan says how to run a query against the Kubernetes API: list the
// DeviceTwins matching LabelSelector and FieldSelector (either may be
// empty: no filter), render them with hubtwin.FromDeviceTwin and give them
// to [Query.Run], which evaluates the whole WHERE condition again.
//
// The selectors only narrow the list: every twin the query can return
// passes them, but a twin that passes them need not match (a tag 3 and a tag
// "3" both become the label value "3", and a label selector cannot tell
// them apart). That is why Run always re-evaluates the full condition; the
// plan never changes the answer, only how much is listed.
//
// What is pushed down, from the conjuncts at the top of WHERE only (a
// conjunct under OR or NOT is never pushed):
//
//   - tags.k = v and tags.k IN [v, ...] become the label requirements
//     k=v and k in (v, ...), when k (the keys joined by dots) is a valid
//     label name and every v is a string, a boolean, or a whole number from
//     0 to 2^52 whose text (as twin.MirrorLabels writes it) is a valid label
//     value. A v that is not (say 'two words') would match twins that have
//     no label at all, so the conjunct stays unpushed.
//   - tags.k != v and tags.k NIN [v, ...] become k!=v and k notin (v, ...),
//     over the values whose text is a valid label value (the others cannot
//     be a label value, so no twin is lost by leaving them out). No
//     existence requirement is added: a twin whose string tag is not a
//     valid label value (it has no label) matches tags.k != 'a' and must
//     not be dropped, and the label selector k!=v keeps objects without
//     the label. It drops only twins labelled k=v, whose tag is v itself
//     (or another type with the same text, for which the comparison is
//     undefined anyway).
//   - deviceId = 'x' (or IN ['x']) becomes status.deviceId=x, deviceId !=
//     'x' and NIN become status.deviceId!=x. IN with several ids cannot be
//     written as a field selector, which only ANDs = and != terms.
//   - configurations.[[id]].status = 'Applied' (or 'Targeted', IN, !=,
//     NIN) becomes the requirement on the label configurations.kubetwin.io/<id>
//     that the configuration's own apply sets with its content (the twin
//     document's configurations member is rendered from those labels).
//   - connectionState = 'Connected' becomes status.connectionState=Connected;
//     connectionState = 'Disconnected' becomes status.connectionState!=Connected,
//     because a twin whose status has no connectionState yet is
//     Disconnected in its document (the API server selects a missing field
//     as ""). != and NIN become != terms.
//
// Assumptions (what the operator guarantees for a twin it has reconciled,
// and what `kubectl get devicetwins -l ...` relies on as well):
//
//   - the twin's labels include twin.MirrorLabels(spec.tags), and tag keys
//     hold no '.' (the twin rules refuse them), so a label name means one
//     tag path;
//   - numbers in spec.tags are written as the API server writes them, so a
//     whole number is written as plain digits (3, never 3.0 or 3e0), and
//     MirrorLabels gives it the label value "3";
//   - status.deviceId is set (the document's deviceId falls back to
//     spec.deviceId or the name only before the first reconcile).
//
// A twin the operator has not yet reconciled (just created, or changed
// while it was down) may therefore be missed by a pushed-down query.
type Plan struct {
	// LabelSelector is the label selector to list with, "" for none.
	LabelSelector string
	// FieldSelector is the field selector to list with, "" for none.
	FieldSelector string
	// Residual is the condition evaluated on the listed twins, as query
	// text (for explain); "" without WHERE. It is the whole WHERE
	// condition: the selectors only prefilter.
	Residual string
	// NeedsResidual reports whether the listed twins must be filtered by
	// Residual: true whenever the query has a WHERE condition.
	NeedsResidual bool
}

// Plan returns how to run the query against the Kubernetes API.
func (q *Query) Plan() Plan {
	if q.where == nil {
		return Plan{}
	}
	var (
		lbl  []labels.Requirement
		fld  []fields.Selector
		seen = map[string]bool{}
	)
	addLabel := func(key string, op selection.Operator, values []string) {
		r, err := labels.NewRequirement(key, op, values)
		if err != nil || seen["l:"+r.String()] {
			return
		}
		seen["l:"+r.String()] = true
		lbl = append(lbl, *r)
	}
	addField := func(s fields.Selector) {
		if !seen["f:"+s.String()] {
			seen["f:"+s.String()] = true
			fld = append(fld, s)
		}
	}
	for _, c := range conjuncts(q.where) {
		p, op, values := comparisonOf(c)
		if p == nil {
			continue
		}
		switch {
		case len(p.segs) >= 2 && p.segs[0] == "tags":
			key, ok := labelKey(p.segs[1:])
			if !ok {
				continue
			}
			switch op {
			case "=", "IN":
				texts := make([]string, 0, len(values))
				for _, v := range values {
					t, ok := labelText(v, true)
					if !ok {
						texts = nil
						break
					}
					texts = append(texts, t)
				}
				if len(texts) == 1 {
					addLabel(key, selection.Equals, texts)
				} else if len(texts) > 1 {
					addLabel(key, selection.In, texts)
				}
			case "!=", "NIN":
				var texts []string
				for _, v := range values {
					if t, ok := labelText(v, false); ok {
						texts = append(texts, t)
					}
				}
				if len(texts) == 1 {
					addLabel(key, selection.NotEquals, texts)
				} else if len(texts) > 1 {
					addLabel(key, selection.NotIn, texts)
				}
			}
		case len(p.segs) == 3 && p.segs[0] == "configurations":
			// configurations.[[id]].status is the twin's label
			// configurations.kubetwin.io/<id> (see hubtwin): = and IN
			// select the label's value; != and NIN keep twins without
			// the label, as for tags.
			key := v1alpha1.ConfigurationsLabelPrefix + p.segs[1]
			eq := op == "=" || op == "IN"
			var texts []string
			for _, v := range values {
				if s, ok := v.(string); ok && twin.IsLabelValue(s) {
					texts = append(texts, s)
				} else if eq {
					texts = nil // a value no label has: leave it to the residual
					break
				}
			}
			switch {
			case len(texts) == 0:
			case eq && len(texts) == 1:
				addLabel(key, selection.Equals, texts)
			case eq:
				addLabel(key, selection.In, texts)
			case len(texts) == 1:
				addLabel(key, selection.NotEquals, texts)
			default:
				addLabel(key, selection.NotIn, texts)
			}
		case len(p.segs) == 1 && (p.segs[0] == "deviceId" || p.segs[0] == "connectionState"):
			field := FieldDeviceID
			if p.segs[0] == "connectionState" {
				field = FieldConnectionState
			}
			switch op {
			case "=", "IN":
				if len(values) != 1 {
					continue // field selectors cannot OR
				}
				s, ok := values[0].(string)
				switch {
				case !ok || s == "":
					// No twin matches; leave the work to the residual.
				case field == FieldConnectionState && s == "Disconnected":
					addField(fields.OneTermNotEqualSelector(field, "Connected"))
				default:
					addField(fields.OneTermEqualSelector(field, s))
				}
			case "!=", "NIN":
				for _, v := range values {
					if s, ok := v.(string); ok && s != "" {
						addField(fields.OneTermNotEqualSelector(field, s))
					}
				}
			}
		}
	}
	plan := Plan{Residual: exprString(q.where), NeedsResidual: true}
	if len(lbl) > 0 {
		plan.LabelSelector = labels.NewSelector().Add(lbl...).String()
	}
	if len(fld) > 0 {
		plan.FieldSelector = fields.AndSelectors(fld...).String()
	}
	return plan
}

// conjuncts returns the operands of the ANDs at the top of x.
func conjuncts(x expr) []expr {
	if b, ok := x.(*binary); ok && b.op == "AND" {
		return append(conjuncts(b.l), conjuncts(b.r)...)
	}
	return []expr{x}
}

// comparisonOf recognises path = literal (either way round), path !=
// literal, path IN [...] and path NIN [...], returning the path, the
// operator ("=", "!=", "IN" or "NIN") and the literal values. It returns a
// nil path for anything else.
func comparisonOf(x expr) (*path, string, []any) {
	switch n := x.(type) {
	case *binary:
		if n.op != "=" && n.op != "!=" {
			return nil, "", nil
		}
		p, pok := n.l.(*path)
		lit, lok := n.r.(*literal)
		if !pok || !lok {
			p, pok = n.r.(*path)
			lit, lok = n.l.(*literal)
		}
		if !pok || !lok {
			return nil, "", nil
		}
		return p, n.op, []any{lit.value}
	case *inList:
		p, ok := n.x.(*path)
		if !ok {
			return nil, "", nil
		}
		values := make([]any, len(n.list))
		for i, l := range n.list {
			values[i] = l.value
		}
		if n.not {
			return p, "NIN", values
		}
		return p, "IN", values
	}
	return nil, "", nil
}

// labelKey returns the label name twin.MirrorLabels gives the tag at keys.
func labelKey(keys []string) (string, bool) {
	for _, k := range keys {
		if k == "" || strings.Contains(k, ".") {
			return "", false
		}
	}
	key := strings.Join(keys, ".")
	return key, twin.IsLabelName(key)
}

// labelText returns the label value twin.MirrorLabels writes for a tag
// equal to v, if it is a valid one. With exact, numbers qualify only when
// every tag equal to v is written with that text (whole numbers from 0 to
// 2^52, written as plain digits); without, any text of v's value does (for
// !=, which only needs that no tag different from v has that text).
func labelText(v any, exact bool) (string, bool) {
	var text string
	switch x := v.(type) {
	case string:
		text = x
	case bool:
		text = strconv.FormatBool(x)
	case json.Number:
		f := toFloat(x)
		if exact && (f != math.Trunc(f) || f < 0 || f > twin.MaxInt) {
			return "", false
		}
		text = string(formatNumber(f))
	default:
		return "", false
	}
	return text, twin.IsLabelValue(text)
}
