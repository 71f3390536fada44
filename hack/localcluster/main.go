// Command localcluster runs a local control plane (etcd + kube-apiserver
// from KUBEBUILDER_ASSETS, through controller-runtime's envtest) with the
// kubetwin CRDs installed, writes an admin kubeconfig, and serves until it is
// signalled. The demo uses it.
//
// With --twin-store, DeviceTwins (the whole kubetwin.io group) are kept in
// an etcd of their own, behind a second kube-apiserver that the main one
// delegates the group to (see package plane and docs/scaling.md).
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/kubetwin/kubetwin/hack/localcluster/plane"
)

func main() {
	kubeconfig := flag.String("write-kubeconfig", ".demo/kubeconfig", "Where to write the admin kubeconfig.")
	crds := flag.String("crd-dir", "config/crd/bases", "Folder of CRDs to install.")
	store := flag.Bool("twin-store", false,
		"Keep the kubetwin.io group (DeviceTwins) in an etcd of its own: a second etcd and kube-apiserver, to which the main API server delegates the group (an APIService).")
	storeKubeconfig := flag.String("write-store-kubeconfig", "",
		"With --twin-store: where to write an admin kubeconfig of the twin store's own API server (to register the DeviceTwin webhooks there; clients use the main one).")
	audit := flag.String("audit-log", "", "Write the main API server's audit log (every request's metadata, JSON lines) to this file.")
	flag.Parse()

	p, err := plane.Start(plane.Options{CRDDir: *crds, TwinStore: *store, AuditLogPath: *audit})
	if err != nil {
		fmt.Fprintf(os.Stderr, "localcluster: %v\n", err)
		os.Exit(1)
	}
	defer func() {
		if err := p.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "localcluster: stopping: %v\n", err)
		}
	}()

	kc, _, err := p.AddAdmin("demo-admin")
	if err != nil {
		fmt.Fprintf(os.Stderr, "localcluster: %v\n", err)
		return
	}
	if err := writeFile(*kubeconfig, kc); err != nil {
		fmt.Fprintf(os.Stderr, "localcluster: writing kubeconfig: %v\n", err)
		return
	}
	fmt.Printf("control plane up; kubeconfig at %s; etcd %s\n", *kubeconfig, p.EtcdURL())
	if u := p.StoreEtcdURL(); u != nil {
		fmt.Printf("kubetwin.io objects are stored in the twin store's etcd %s (API server %s)\n", u, p.Store.Config.Host)
		if *storeKubeconfig != "" {
			if err := writeStoreKubeconfig(p, *storeKubeconfig); err != nil {
				fmt.Fprintf(os.Stderr, "localcluster: %v\n", err)
				return
			}
			fmt.Printf("twin store kubeconfig at %s\n", *storeKubeconfig)
		}
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	fmt.Println("stopping control plane")
}

// writeStoreKubeconfig writes an admin kubeconfig of the twin store.
func writeStoreKubeconfig(p *plane.Plane, path string) error {
	u, err := p.Store.ControlPlane.AddUser(envtest.User{Name: "demo-store-admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return fmt.Errorf("adding the twin store's admin: %w", err)
	}
	kc, err := u.KubeConfig()
	if err != nil {
		return err
	}
	return writeFile(path, kc)
}

// writeFile writes a kubeconfig, creating its folder.
func writeFile(path string, b []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o600)
}
