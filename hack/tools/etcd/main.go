// Command etcd is etcd's own server entry point, built here because etcd's root module cannot be
// built with `go install` (it has replace directives); the server module is pinned by go.mod.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
