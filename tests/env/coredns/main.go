// CoreDNS for the test environment's real node, with only the plugins its Corefile uses
// (start.sh writes it): the full build links every cloud provider's SDK and takes many times
// longer to compile on two cores. build.sh builds this in a wrapper module at $COREDNS_VERSION.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
)

func main() {
	coremain.Run()
}
