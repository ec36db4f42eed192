//go:build tools

// Package tools pins helm in this module's go.mod so `go build helm.sh/helm/v3/cmd/helm` is reproducible.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
