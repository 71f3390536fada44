package query

// WherePaths returns the paths the WHERE condition reads, each as its keys
// (root names spelled as the twin document spells them); nil without WHERE.
// A document holding only the values at these paths gives [Query.Match]
// the same answer as the whole document.
func (q *Query) WherePaths() [][]string {
	if q.where == nil {
		return nil
	}
	return collectPaths(q.where, nil)
}

// Paths returns every path the query reads: WHERE, the projections and
// GROUP BY. For a query that is not SELECT *, [Query.Run] over documents
// holding only these values (and deviceId, which orders the result) gives
// the same result as over whole documents.
func (q *Query) Paths() [][]string {
	var ps [][]string
	if q.where != nil {
		ps = collectPaths(q.where, ps)
	}
	for _, pr := range q.proj {
		ps = collectPaths(pr.x, ps)
	}
	if q.groupBy != nil {
		ps = append(ps, q.groupBy.segs)
	}
	return ps
}

func collectPaths(x expr, ps [][]string) [][]string {
	switch n := x.(type) {
	case *path:
		ps = append(ps, n.segs)
	case *unary:
		ps = collectPaths(n.x, ps)
	case *binary:
		ps = collectPaths(n.r, collectPaths(n.l, ps))
	case *inList:
		ps = collectPaths(n.x, ps)
	case *call:
		for _, a := range n.args {
			ps = collectPaths(a, ps)
		}
	}
	return ps
}
