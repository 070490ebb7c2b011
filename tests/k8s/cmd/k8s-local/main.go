// k8s-local is kube-apiserver, kube-controller-manager, etcd and kubectl in one binary, so that
// the packages they share are compiled and linked once. It runs the program named by the name it
// is called by (scripts/local-k8s.sh links etcd, kube-apiserver, kube-controller-manager and
// kubectl to it) or by its first argument: `k8s-local kube-apiserver --help`. It also has the few
// helpers the script needs (certificates, readiness, fake nodes), so that the script needs
// neither openssl nor curl. kubectl is the one the tests drive the cluster with as a user would
// (`kubectl wait`, `kubectl scale`, `kubectl rollout restart`).
package main

import (
	"fmt"
	"os"
	"path/filepath"
	_ "time/tzdata" // CronJob time zones, as in the upstream main packages

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	kubectl "k8s.io/kubectl/pkg/cmd"
	kubectlutil "k8s.io/kubectl/pkg/cmd/util"
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

var programs = map[string]func(args []string) int{
	"etcd": func(args []string) int {
		etcdmain.Main(append([]string{"etcd"}, args...))
		return 0
	},
	"kube-apiserver": func(args []string) int {
		return runCobra(apiserver.NewAPIServerCommand(), args)
	},
	"kube-controller-manager": func(args []string) int {
		return runCobra(controllermanager.NewControllerManagerCommand(), args)
	},
	"kubectl": func(args []string) int {
		// As k8s.io/kubernetes/cmd/kubectl does: kubectl prints its own errors.
		cmd := kubectl.NewDefaultKubectlCommand()
		cmd.SetArgs(args)
		if err := cli.RunNoErrOutput(cmd); err != nil {
			kubectlutil.CheckErr(err)
		}
		return 0
	},
	// Helpers of scripts/local-k8s.sh.
	"pki":   pkiMain,
	"ready": readyMain,
	"nodes": nodesMain,
}

func runCobra(cmd *cobra.Command, args []string) int {
	cmd.SetArgs(args)
	return cli.Run(cmd)
}

func main() {
	if run, ok := programs[filepath.Base(os.Args[0])]; ok {
		os.Exit(run(os.Args[1:]))
	}
	if len(os.Args) > 1 {
		if run, ok := programs[os.Args[1]]; ok {
			os.Exit(run(os.Args[2:]))
		}
	}
	fmt.Fprintln(os.Stderr, "usage: k8s-local etcd|kube-apiserver|kube-controller-manager|kubectl|pki|ready|nodes [flags]")
	os.Exit(2)
}
