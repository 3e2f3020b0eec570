// b3-kubelet is the real kubelet of the cluster tests' real node, the upstream command from
// k8s.io/kubernetes unmodified. It is its own binary, not a component of b3-testcluster: the
// kubelet registers process-wide flags and feature gates of its own.
package main

import (
	"context"
	"os"

	"k8s.io/component-base/cli"
	kubelet "k8s.io/kubernetes/cmd/kubelet/app"
)

func main() {
	os.Exit(cli.Run(kubelet.NewKubeletCommand(context.Background())))
}
