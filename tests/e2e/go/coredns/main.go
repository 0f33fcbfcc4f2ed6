// Command coredns is CoreDNS with only the plugins the e2e cluster's DNS needs (the upstream
// default build compiles every cloud provider's plugin too), the way CoreDNS documents external
// builds: import the plugins, set the directive order, run coremain. The set is the one kubeadm's
// Corefile uses.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

func init() {
	// Execution order, as in upstream's plugin.cfg.
	if err := dnsserver.SetDirectives([]string{"reload", "ready", "health", "prometheus", "errors", "log",
		"loadbalance", "cache", "kubernetes", "loop", "forward"}); err != nil {
		panic(err)
	}
}

func main() { coremain.Run() }
