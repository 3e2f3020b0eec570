// b3-testcluster is the real Kubernetes control plane of the cluster tests, one component per
// process (each keeps process-wide flags, feature gates and signal handling):
//
//	b3-testcluster etcd --data-dir DIR --client-port N --peer-port M
//	b3-testcluster kube-apiserver [kube-apiserver flags]
//	b3-testcluster kube-controller-manager [kube-controller-manager flags]
//	b3-testcluster kube-scheduler [kube-scheduler flags]
//
// The Kubernetes components are the upstream commands, unmodified; etcd is the upstream
// server, embedded. tests/cluster/control_plane.py starts and wires them.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"go.etcd.io/etcd/server/v3/embed"
	"k8s.io/component-base/cli"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: b3-testcluster etcd|kube-apiserver|kube-controller-manager|kube-scheduler [flags]")
		os.Exit(2)
	}
	component := os.Args[1]
	os.Args = append([]string{os.Args[0] + " " + component}, os.Args[2:]...) // cobra reads os.Args[1:]
	switch component {
	case "etcd":
		runEtcd()
	case "kube-apiserver":
		os.Exit(cli.Run(apiserver.NewAPIServerCommand()))
	case "kube-controller-manager":
		os.Exit(cli.Run(controllermanager.NewControllerManagerCommand()))
	case "kube-scheduler":
		os.Exit(cli.Run(scheduler.NewSchedulerCommand()))
	default:
		fmt.Fprintf(os.Stderr, "b3-testcluster: unknown component %q\n", component)
		os.Exit(2)
	}
}

// runEtcd serves a single-member etcd on 127.0.0.1 until SIGTERM or SIGINT.
func runEtcd() {
	flags := flag.NewFlagSet("etcd", flag.ExitOnError)
	dataDir := flags.String("data-dir", "", "where etcd keeps its data")
	clientPort := flags.Int("client-port", 2379, "client port on 127.0.0.1")
	peerPort := flags.Int("peer-port", 2380, "peer port on 127.0.0.1")
	_ = flags.Parse(os.Args[1:])
	if *dataDir == "" {
		log.Fatal("etcd: --data-dir is required")
	}
	client := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", *clientPort)}
	peer := url.URL{Scheme: "http", Host: fmt.Sprintf("127.0.0.1:%d", *peerPort)}
	cfg := embed.NewConfig()
	cfg.Dir = *dataDir
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.UnsafeNoFsync = true // a test cluster: speed over durability
	cfg.LogLevel = "error"
	server, err := embed.StartEtcd(cfg)
	if err != nil {
		log.Fatalf("etcd: %v", err)
	}
	defer server.Close()
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-server.Server.ReadyNotify():
		fmt.Printf("etcd ready on %s\n", client.String())
	case <-stop:
		return
	}
	select {
	case err := <-server.Err():
		log.Fatalf("etcd: %v", err)
	case <-stop:
	}
}
