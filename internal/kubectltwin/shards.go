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

// ExecuteShards answers a SELECT * over every namespace when the cluster
// runs one operator per namespace (shards, each serving its namespace's
// query API group, wire.ShardGroup) and no operator over all of them: it
// asks each shard whose group kube-apiserver serves, lists the twins of
// every other namespace (a field selector leaves the shards' out), and
// merges the answers in the result's order (device id, namespace, name),
// cut to TOP. The answer is the one Execute computes from a LIST of every
// namespace. It returns nil and no error when no shard serves its group.
//
// Only SELECT * is merged: its items carry the device id and the twin
// behind them, which order the result; rows of projections and groups do
// not, so those are listed.
func ExecuteShards(ctx context.Context, cfg *rest.Config, c rest.Interface, q *query.Query, chunkSize int64) (*Answer, error) {
	if q.ItemType() != query.ItemTypeTwin {
		return nil, nil
	}
	raw, err := c.Get().AbsPath("/apis").DoRaw(ctx)
	if err != nil {
		return nil, fmt.Errorf("discovery of the API groups: %w", err)
	}
	var groups metav1.APIGroupList
	if err := json.Unmarshal(raw, &groups); err != nil {
		return nil, fmt.Errorf("discovery of the API groups is not an APIGroupList: %w", err)
	}
	merged := &Answer{Via: ViaShards}
	merged.ItemType = query.ItemTypeTwin
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
		ans, err := api.Execute(ctx, ns, q)
		if err != nil {
			return nil, fmt.Errorf("the query API of shard %s (%s): %w", ns, g.Name, err)
		}
		if len(ans.Twins) != len(ans.Items) {
			return nil, fmt.Errorf("the query API of shard %s answers %d items for %d twins", ns, len(ans.Items), len(ans.Twins))
		}
		merged.Shards = append(merged.Shards, ns)
		merged.Evaluated += ans.Listed
		merged.Twins = append(merged.Twins, ans.Twins...)
	}
	if len(merged.Shards) == 0 {
		return nil, nil
	}
	slices.Sort(merged.Shards)
	rest, err := executeList(ctx, c, "", merged.Shards, q, chunkSize)
	if err != nil {
		return nil, err
	}
	merged.Listed, merged.Pages = rest.Listed, rest.Pages
	merged.Twins = append(merged.Twins, rest.Twins...)
	slices.SortStableFunc(merged.Twins, func(a, b *Twin) int {
		return cmp.Or(strings.Compare(docDeviceID(a.Doc), docDeviceID(b.Doc)),
			strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	if top, ok := q.Top(); ok && len(merged.Twins) > top {
		merged.Twins = merged.Twins[:top]
	}
	merged.Items = make([]map[string]any, len(merged.Twins))
	for i, t := range merged.Twins {
		merged.Items[i] = t.Doc
	}
	return merged, nil
}

func docDeviceID(doc map[string]any) string {
	s, _ := doc["deviceId"].(string)
	return s
}
