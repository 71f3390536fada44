package twin

import (
	"encoding/json"
	"strconv"
	"time"
)

// Members of a $metadata node.
const (
	// LastUpdatedKey holds when the node last changed, formatted with
	// TimeFormat.
	LastUpdatedKey = "$lastUpdated"
	// LastUpdatedVersionKey holds the desired $version of the node's last
	// change (desired metadata only), as a number.
	LastUpdatedVersionKey = "$lastUpdatedVersion"
)

// TimeFormat is the layout of $lastUpdated: RFC 3339 in UTC with exactly
// nine fractional digits, so that timestamps sort as strings.
const TimeFormat = "2006-01-02T15:04:05.000000000Z07:00"

// UpdateMetadata returns the $metadata tree of a section after the merge
// patch change (a device's patch, or a [Diff]) was applied to it; doc is the
// section after the change and meta its metadata before (nil is empty).
//
// A metadata tree mirrors its section: every object and every leaf has a
// node {"$lastUpdated": time, "$lastUpdatedVersion": n}, and an object's
// node also holds its members' nodes under their keys. "$lastUpdatedVersion"
// is written only when version > 0 (desired); for reported pass 0.
//
// Every node the change touches (each key present in change, at any depth,
// hence also every ancestor of a changed leaf) and the root get
// $lastUpdated = now (as UTC, formatted with [TimeFormat]) and, when
// version > 0, $lastUpdatedVersion = version. Keys deleted by the change lose
// their nodes; an object that replaced a non-object gets fresh nodes
// throughout; nodes the change did not touch keep theirs. The result always
// has exactly the shape of doc: a node that meta lacks (say, the first time)
// is created fresh, nodes for keys doc lacks are dropped, and members of
// doc whose key starts with '$' get none. meta is not modified and the
// result shares nothing with it.
func UpdateMetadata(meta Doc, doc Doc, change Doc, now time.Time, version int64) Doc {
	s := newStamp(now, version)
	return touchNode(meta, doc, change, s)
}

// stamp is the $lastUpdated and $lastUpdatedVersion given to touched nodes.
type stamp struct {
	at      string
	version json.Number // "" when not written
}

func newStamp(now time.Time, version int64) stamp {
	s := stamp{at: now.UTC().Format(TimeFormat)}
	if version > 0 {
		s.version = json.Number(strconv.FormatInt(version, 10))
	}
	return s
}

// node returns a fresh node carrying the stamp.
func (s stamp) node() Doc {
	n := Doc{LastUpdatedKey: s.at}
	if s.version != "" {
		n[LastUpdatedVersionKey] = s.version
	}
	return n
}

// touchNode returns the node of an object that the change touched: stamped,
// with members' nodes according to the change.
func touchNode(old, doc, change Doc, s stamp) Doc {
	node := s.node()
	for k, dv := range doc {
		if hasDollarPrefix(k) {
			continue
		}
		oldChild, _ := old[k].(map[string]any)
		cv, touched := change[k]
		if !touched {
			node[k] = keepNode(oldChild, dv, s)
			continue
		}
		dObj, isObj := dv.(map[string]any)
		cObj, changeIsObj := cv.(map[string]any)
		switch {
		case isObj && changeIsObj:
			node[k] = touchNode(oldChild, dObj, cObj, s)
		case isObj:
			// The change replaced the value with this object wholesale.
			node[k] = keepNode(nil, dv, s)
		default:
			node[k] = s.node()
		}
	}
	return node
}

// keepNode returns the node of a value the change did not touch: old's
// stamps if it has them (fresh ones if not), and for an object its members'
// nodes likewise.
func keepNode(old Doc, v any, s stamp) Doc {
	var node Doc
	if at, ok := old[LastUpdatedKey]; ok {
		node = Doc{LastUpdatedKey: copyValue(at)}
		if ver, ok := old[LastUpdatedVersionKey]; ok {
			node[LastUpdatedVersionKey] = copyValue(ver)
		}
	} else {
		node = s.node()
	}
	if obj, ok := v.(map[string]any); ok {
		for k, cv := range obj {
			if hasDollarPrefix(k) {
				continue
			}
			oldChild, _ := old[k].(map[string]any)
			node[k] = keepNode(oldChild, cv, s)
		}
	}
	return node
}
