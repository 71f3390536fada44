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

	"github.com/kubetwin/kubetwin/hack/localcluster/plane"
)

func main() {
	kubeconfig := flag.String("write-kubeconfig", ".demo/kubeconfig", "Where to write the admin kubeconfig.")
	crds := flag.String("crd-dir", "config/crd/bases", "Folder of CRDs to install.")
	store := flag.Bool("twin-store", false,
		"Keep the kubetwin.io group (DeviceTwins) in an etcd of its own: a second etcd and kube-apiserver, to which the main API server delegates the group (an APIService).")
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
	if err := os.MkdirAll(filepath.Dir(*kubeconfig), 0o755); err != nil {
		fmt.Fprintf(os.Stderr, "localcluster: %v\n", err)
		return
	}
	if err := os.WriteFile(*kubeconfig, kc, 0o600); err != nil {
		fmt.Fprintf(os.Stderr, "localcluster: writing kubeconfig: %v\n", err)
		return
	}
	fmt.Printf("control plane up; kubeconfig at %s; etcd %s\n", *kubeconfig, p.EtcdURL())
	if u := p.StoreEtcdURL(); u != nil {
		fmt.Printf("kubetwin.io objects are stored in the twin store's etcd %s (API server %s)\n", u, p.Store.Config.Host)
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	fmt.Println("stopping control plane")
}
