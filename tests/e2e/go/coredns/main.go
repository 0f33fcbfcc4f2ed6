// Command coredns is CoreDNS with only the plugins the e2e cluster's DNS needs (the upstream
// default build compiles every cloud provider's plugin too), the way CoreDNS documents external
// builds: import the plugins, set the directive order, run coremain.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func init() {
	// Execution order, as in upstream's plugin.cfg.
	if err := dnsserver.SetDirectives([]string{"errors", "log", "health", "ready", "cache", "loadbalance", "kubernetes"}); err != nil {
		panic(err)
	}
}

func main() { coremain.Run() }
