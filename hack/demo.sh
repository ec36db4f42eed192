#!/usr/bin/env bash
# `make demo`: brings up the local Kubernetes cluster and shows it.
# The full demo (operator + a real fine-tune) is wired in once the operator lands; see the README.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${CLUSTER_DIR:-.localcluster}"

echo "==> Starting the local Kubernetes control plane in $dir"
echo "    The first start builds etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and helm"
echo "    from Go modules (about 20-40 minutes on 2 cores); later starts take seconds."
.venv/bin/python hack/localcluster/localcluster.py up --dir "$dir"
export KUBECONFIG="$PWD/$dir/kubeconfig"
kubectl="$dir/bin/kubectl"
echo "==> The node (a GPU node run by the local node agent)"
"$kubectl" get nodes -o wide
"$kubectl" get node -o custom-columns='NAME:.metadata.name,GPUS:.status.capacity.nvidia\.com/gpu,CPU:.status.capacity.cpu,MEMORY:.status.capacity.memory'
echo "==> Control plane health"
"$kubectl" get --raw='/readyz?verbose' | tail -n 3
echo
echo "The cluster stays up. Use it with: export KUBECONFIG=$PWD/$dir/kubeconfig; $dir/bin/kubectl get nodes"
echo "Stop it with: make cluster-down"
