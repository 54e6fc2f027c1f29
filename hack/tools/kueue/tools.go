//go:build tools

// Package tools records the Kueue command hack/local-env builds, so go mod tidy keeps its dependencies.
package tools

import _ "sigs.k8s.io/kueue/cmd/kueue"
