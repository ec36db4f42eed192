// Command pause is the process of every pod's sandbox container: it holds the pod's namespaces, reaps
// the children it adopts as PID 1 of a shared process namespace, and exits on SIGINT or SIGTERM. Built
// static (CGO_ENABLED=0) into a one-layer image, so the node pulls no pause image from a registry.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
