// The real node's NetworkPolicy engine: the controller of sigs.k8s.io/kube-network-policies
// (nftables rules that send a pod's new connections to an nfqueue, where the policies decide),
// run as a host process. Upstream's command reads only the in-cluster configuration, which a
// host process does not have; this one takes a kubeconfig. build.sh builds it in a wrapper
// module at $KUBE_NETWORK_POLICIES_VERSION.
package main

import (
	"context"
	"flag"
	"os"
	"os/signal"
	"syscall"
	"time"

	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
	"sigs.k8s.io/kube-network-policies/pkg/networkpolicy"
)

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the cluster")
	node := flag.String("hostname-override", "", "name of the node whose pods the policies guard")
	queue := flag.Int("nfqueue-id", 100, "number of the nfqueue")
	klog.InitFlags(nil)
	flag.Parse()

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()

	config, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		klog.Fatalf("kubeconfig %s: %v", *kubeconfig, err)
	}
	client, err := kubernetes.NewForConfig(config)
	if err != nil {
		klog.Fatalf("client: %v", err)
	}
	factory := informers.NewSharedInformerFactory(client, 0)
	controller, err := networkpolicy.NewController(client,
		factory.Networking().V1().NetworkPolicies(), factory.Core().V1().Namespaces(),
		factory.Core().V1().Pods(), nil, nil, nil, nil,
		networkpolicy.Config{
			QueueID:  *queue,
			NodeName: *node,
			// The kernels this runs on (6.12 and later) have the conntrack fix.
			NetfilterBug1766Fix: false,
			// containerd 1.6 has no NRI: pod IPs come from the API server.
			NRIdisabled: true,
		})
	if err != nil {
		klog.Fatalf("network policy controller: %v", err)
	}
	go func() {
		if err := controller.Run(ctx); err != nil {
			klog.Errorf("network policy controller: %v", err)
		}
	}()
	factory.Start(ctx.Done())
	<-ctx.Done()
	// The controller removes its nftables table when its context ends; give it the time.
	time.Sleep(2 * time.Second)
	os.Exit(0)
}
