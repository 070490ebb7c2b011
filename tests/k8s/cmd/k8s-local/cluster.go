package main

// `k8s-local ready` waits until the API server is ready and usable; `k8s-local nodes` registers
// fake GPU nodes. Both talk to the API server through client-go with a kubeconfig.

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/retry"
)

func clientFor(kubeconfig string) (*kubernetes.Clientset, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, err
	}
	cfg.Timeout = 5 * time.Second
	return kubernetes.NewForConfig(cfg)
}

// `k8s-local ready --kubeconfig F [--timeout 90s] [--pids name=PID,...]`: waits until /readyz
// answers ok, the default namespace and its default ServiceAccount exist (pods can be created)
// and, with --controller-manager, the controller-manager's controllers hold their credentials.
// Exits 3 as soon as one of the watched processes is gone.
func readyMain(args []string) int {
	fs := flag.NewFlagSet("ready", flag.ExitOnError)
	kubeconfig := fs.String("kubeconfig", "", "admin kubeconfig")
	timeout := fs.Duration("timeout", 90*time.Second, "how long to wait")
	pids := fs.String("pids", "", "name=PID,... of processes that must stay alive")
	fs.Parse(args)
	client, err := clientFor(*kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "k8s-local ready: %v\n", err)
		return 1
	}
	watched := map[string]int{}
	for _, p := range strings.Split(*pids, ",") {
		if name, pid, ok := strings.Cut(p, "="); ok {
			n, err := strconv.Atoi(pid)
			if err != nil {
				fmt.Fprintf(os.Stderr, "k8s-local ready: bad --pids entry %q\n", p)
				return 2
			}
			watched[name] = n
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	last := "no answer yet"
	for {
		for name, pid := range watched {
			if syscall.Kill(pid, 0) != nil {
				fmt.Fprintf(os.Stderr, "%s (pid %d) exited\n", name, pid)
				return 3
			}
		}
		if ok, why := usable(ctx, client); ok {
			return 0
		} else {
			last = why
		}
		select {
		case <-ctx.Done():
			fmt.Fprintf(os.Stderr, "the API server was not ready after %s: %s\n", *timeout, last)
			return 1
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func usable(ctx context.Context, client *kubernetes.Clientset) (bool, string) {
	body, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").
		Param("verbose", "true").DoRaw(ctx)
	if err != nil {
		return false, fmt.Sprintf("/readyz: %v %s", err, failing(string(body)))
	}
	if _, err := client.CoreV1().ServiceAccounts("default").Get(ctx, "default",
		metav1.GetOptions{}); err != nil {
		return false, fmt.Sprintf("ServiceAccount default/default (made by the "+
			"controller-manager's serviceaccount controller): %v", err)
	}
	return true, ""
}

// The failed checks of a verbose /readyz answer.
func failing(verbose string) string {
	var out []string
	for _, l := range strings.Split(verbose, "\n") {
		if strings.HasPrefix(l, "[-]") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "; ")
}

// `k8s-local nodes --kubeconfig F [--count N] [--prefix P]`: registers N Ready nodes that look
// like GKE n1-standard-8 + NVIDIA T4 nodes to the scheduler-facing API: the chart's default
// worker nodeSelector label (cloud.google.com/gke-accelerator: nvidia-tesla-t4), the
// nvidia.com/gpu=present:NoSchedule taint GKE puts on GPU nodes, capacity nvidia.com/gpu: 1.
// No kubelet runs: the tests bind pods and write their status themselves. The
// node.kubernetes.io/not-ready taint that the TaintNodesByCondition admission plugin adds to
// every new node is removed (the node lifecycle controller would do that on a real cluster once
// the kubelet reports Ready; it does not run here). Nodes that exist are left as they are.
func nodesMain(args []string) int {
	fs := flag.NewFlagSet("nodes", flag.ExitOnError)
	kubeconfig := fs.String("kubeconfig", "", "admin kubeconfig")
	count := fs.Int("count", 2, "number of nodes")
	prefix := fs.String("prefix", "t4-node-", "node name prefix")
	fs.Parse(args)
	client, err := clientFor(*kubeconfig)
	if err != nil {
		fmt.Fprintf(os.Stderr, "k8s-local nodes: %v\n", err)
		return 1
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for i := 0; i < *count; i++ {
		name := fmt.Sprintf("%s%d", *prefix, i)
		if err := registerNode(ctx, client, name); err != nil {
			fmt.Fprintf(os.Stderr, "k8s-local nodes: node %s: %v\n", name, err)
			return 1
		}
	}
	return 0
}

func registerNode(ctx context.Context, client *kubernetes.Clientset, name string) error {
	nodes := client.CoreV1().Nodes()
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{
			Name: name,
			Labels: map[string]string{
				"kubernetes.io/hostname":           name,
				"kubernetes.io/os":                 "linux",
				"kubernetes.io/arch":               "amd64",
				"node.kubernetes.io/instance-type": "n1-standard-8",
				"cloud.google.com/gke-nodepool":    "t4",
				"cloud.google.com/gke-accelerator": "nvidia-tesla-t4",
				"nvidia.com/gpu.present":           "true",
			},
		},
		Spec: corev1.NodeSpec{
			Taints: []corev1.Taint{{Key: "nvidia.com/gpu", Value: "present",
				Effect: corev1.TaintEffectNoSchedule}},
		},
	}
	created, err := nodes.Create(ctx, node, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		return nil
	}
	if err != nil {
		return err
	}
	capacity := corev1.ResourceList{
		corev1.ResourceCPU:              resource.MustParse("8"),
		corev1.ResourceMemory:           resource.MustParse("30Gi"),
		corev1.ResourcePods:             resource.MustParse("110"),
		corev1.ResourceEphemeralStorage: resource.MustParse("100Gi"),
		"nvidia.com/gpu":                resource.MustParse("1"),
	}
	now := metav1.Now()
	cond := func(t corev1.NodeConditionType, s corev1.ConditionStatus, reason string) corev1.NodeCondition {
		return corev1.NodeCondition{Type: t, Status: s, Reason: reason, LastHeartbeatTime: now,
			LastTransitionTime: now}
	}
	created.Status = corev1.NodeStatus{
		Capacity:    capacity,
		Allocatable: capacity,
		Phase:       corev1.NodeRunning,
		Conditions: []corev1.NodeCondition{
			cond(corev1.NodeReady, corev1.ConditionTrue, "KubeletReady"),
			cond(corev1.NodeMemoryPressure, corev1.ConditionFalse, "KubeletHasSufficientMemory"),
			cond(corev1.NodeDiskPressure, corev1.ConditionFalse, "KubeletHasNoDiskPressure"),
			cond(corev1.NodePIDPressure, corev1.ConditionFalse, "KubeletHasSufficientPID"),
		},
		Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "127.0.0.1"},
			{Type: corev1.NodeHostName, Address: name}},
		NodeInfo: corev1.NodeSystemInfo{KubeletVersion: "v1.37.2", OperatingSystem: "linux",
			Architecture: "amd64", ContainerRuntimeVersion: "pawfect-test-kubelet://0"},
	}
	if _, err := nodes.UpdateStatus(ctx, created, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("status: %w", err)
	}
	return retry.RetryOnConflict(retry.DefaultRetry, func() error {
		n, err := nodes.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		var kept []corev1.Taint
		for _, t := range n.Spec.Taints {
			if t.Key != corev1.TaintNodeNotReady {
				kept = append(kept, t)
			}
		}
		if len(kept) == len(n.Spec.Taints) {
			return nil
		}
		n.Spec.Taints = kept
		_, err = nodes.Update(ctx, n, metav1.UpdateOptions{})
		return err
	})
}
