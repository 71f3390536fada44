// Command kubectl-twin is a kubectl plugin for kubetwin's device twins: on
// the PATH, it runs as `kubectl twin`.
//
//	kubectl twin query "SELECT * FROM devices WHERE tags.location.plant = 'Redmond43'"
//	kubectl twin get mydeviceid
//	kubectl twin explain-query "SELECT ..."
//	kubectl twin version
//
// See internal/kubectltwin for what it does; `make install-plugin` puts it
// on the PATH.
package main

import (
	"os"

	"github.com/kubetwin/kubetwin/internal/kubectltwin"
)

func main() {
	os.Exit(kubectltwin.Run())
}
