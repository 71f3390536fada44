package kubectltwin

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/client-go/rest"

	"github.com/kubetwin/kubetwin/internal/query"
	"github.com/kubetwin/kubetwin/internal/queryapi/wire"
)

// ExecuteShards answers q over every namespace when the cluster runs one
// operator per namespace (shards, each serving its namespace's query API
// group, wire.ShardGroup) and no operator over all of them: it asks each
// shard whose group kube-apiserver serves for the twins q's condition
// matches (q.Matching: SELECT * with q's WHERE), lists those of every
// other namespace (a field selector leaves the shards' out), merges them
// in the result's order (device id, namespace, name) and runs q over
// their documents: projections, TOP, GROUP BY and aggregates as well as
// SELECT *. The answer is the one Execute computes from a LIST of every
// namespace. It returns nil and no error when no shard serves its group;
// an error when a shard fails (then the caller lists), for instance when
// its matches exceed the answer its query API sends at once and it is
// too old to send them in parts (QueryAPI.Execute).
func ExecuteShards(ctx context.Context, cfg *rest.Config, c rest.Interface, q *query.Query, chunkSize int64) (*Answer, error) {
	raw, err := c.Get().AbsPath("/apis").DoRaw(ctx)
	if err != nil {
		return nil, fmt.Errorf("discovery of the API groups: %w", err)
	}
	var groups metav1.APIGroupList
	if err := json.Unmarshal(raw, &groups); err != nil {
		return nil, fmt.Errorf("discovery of the API groups is not an APIGroupList: %w", err)
	}
	matching := q.Matching()
	merged := &Answer{Via: ViaShards}
	var twins []*Twin
	for _, g := range groups.Groups {
		ns, ok := strings.CutSuffix(g.Name, "."+wire.Group)
		if !ok || len(validation.IsDNS1123Label(ns)) > 0 {
			continue
		}
		api, err := NewQueryAPI(cfg, g.Name)
		if err != nil {
			return nil, err
		}
		if served, _ := api.Served(ctx); !served {
			continue // registered but not available: its namespace is listed
		}
		ans, err := api.Execute(ctx, ns, matching)
		if err != nil {
			return nil, fmt.Errorf("the query API of shard %s (%s): %w", ns, g.Name, err)
		}
		if len(ans.Twins) != len(ans.Items) {
			return nil, fmt.Errorf("the query API of shard %s answers %d items for %d twins", ns, len(ans.Items), len(ans.Twins))
		}
		merged.Shards = append(merged.Shards, ns)
		merged.Evaluated += ans.Listed
		twins = append(twins, ans.Twins...)
	}
	if len(merged.Shards) == 0 {
		return nil, nil
	}
	slices.Sort(merged.Shards)
	rest, err := executeList(ctx, c, "", merged.Shards, matching, chunkSize)
	if err != nil {
		return nil, err
	}
	merged.Listed, merged.Pages = rest.Listed, rest.Pages
	twins = append(twins, rest.Twins...)
	slices.SortStableFunc(twins, func(a, b *Twin) int {
		return cmp.Or(strings.Compare(docDeviceID(a.Doc), docDeviceID(b.Doc)),
			strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	docs := make([]map[string]any, len(twins))
	for i, t := range twins {
		docs[i] = t.Doc
	}
	if merged.Result, err = q.Run(docs); err != nil {
		return nil, err
	}
	merged.Twins = twinsOfItems(merged.Result, twins)
	return merged, nil
}

func docDeviceID(doc map[string]any) string {
	s, _ := doc["deviceId"].(string)
	return s
}
