// Command localcluster runs a local control plane (etcd + kube-apiserver
// from KUBEBUILDER_ASSETS, through controller-runtime's envtest) with the
// kubetwin CRD installed, writes an admin kubeconfig, and serves until it is
// signalled. The demo uses it.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

func main() {
	kubeconfig := flag.String("write-kubeconfig", ".demo/kubeconfig", "Where to write the admin kubeconfig.")
	crds := flag.String("crd-dir", "config/crd/bases", "Folder of CRDs to install.")
	flag.Parse()

	env := &envtest.Environment{
		CRDDirectoryPaths:     []string{*crds},
		ErrorIfCRDPathMissing: true,
	}
	if _, err := env.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "localcluster: starting control plane (KUBEBUILDER_ASSETS=%q): %v\n", os.Getenv("KUBEBUILDER_ASSETS"), err)
		os.Exit(1)
	}
	defer func() { _ = env.Stop() }()

	user, err := env.ControlPlane.AddUser(envtest.User{Name: "demo-admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		fmt.Fprintf(os.Stderr, "localcluster: adding admin user: %v\n", err)
		return
	}
	kc, err := user.KubeConfig()
	if err != nil {
		fmt.Fprintf(os.Stderr, "localcluster: kubeconfig: %v\n", err)
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
	fmt.Printf("control plane up; kubeconfig at %s\n", *kubeconfig)

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	fmt.Println("stopping control plane")
}
