// Command etcd is the stock etcd server (go.etcd.io/etcd/server/v3), built
// here so the version is pinned by this module's go.mod alongside k8s.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
