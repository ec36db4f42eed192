#!/usr/bin/env bash
# `make demo`: a QLoRA fine-tune run by the operator on a local Kubernetes cluster, end to end, on a CPU.
#
#  1. brings up the local cluster with its real node (hack/localcluster; the first start compiles Kubernetes
#     and builds the images: long, once) and puts the operator and trainer images on the node
#  2. installs the operator with its Helm chart (the chart's RBAC and Deployment; release `qlora` in
#     namespace qlora-system), watching the demo's namespace
#
# Settings (environment): CLUSTER_DIR (.localcluster), DEMO_NAMESPACE (qlora-demo), DEMO_OPERATOR_NAMESPACE
# (qlora-system, the Helm release's), DEMO_DIR (.demo),
# DEMO_RUN_TIMEOUT (1200 s for the fine-tune), DEMO_CLUSTER_TIMEOUT (5400 s for the first cluster start).
#  3. makes the inputs: a tiny random-weight model and a bilingual (Korean/English) QA data set
#  4. applies hack/demo/finetune.yaml and shows `kubectl get qft -w` until it ends
#  5. prints where the adapter is, and one answer of the model before and after training
#
# Every wait has a timeout and says what it waited for. The cluster stays up afterwards (make cluster-down).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
dir="${CLUSTER_DIR:-.localcluster}"
case "$dir" in /*) ;; *) dir="$repo/$dir" ;; esac
demo="${DEMO_DIR:-$repo/.demo}"
ns="${DEMO_NAMESPACE:-qlora-demo}"
opns="${DEMO_OPERATOR_NAMESPACE:-qlora-system}"
name="demo-bot"
run_timeout="${DEMO_RUN_TIMEOUT:-1200}"
cluster_timeout="${DEMO_CLUSTER_TIMEOUT:-5400}"
py="$repo/.venv/bin/python"
export PYTHONPATH="$repo/operator:$repo/trainer:$repo"
export PYTHONUNBUFFERED=1
mkdir -p "$demo"

t0=$(date +%s)
step() { printf '\n\033[1m==> [%3ss] %s\033[0m\n' "$(( $(date +%s) - t0 ))" "$*"; }
say() { echo "    $*"; }
die() { echo; echo "demo: $*" >&2; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || echo "demo: stopped (exit $rc). Logs: $demo/, cluster logs: $dir/logs/" >&2' EXIT

[ -x "$py" ] || die "no Python environment at .venv; run 'make venv' first (make demo does it for you)"

# Run a command with a time limit; on timeout say what took too long.
within() {
    local seconds=$1 what=$2; shift 2
    local rc=0
    timeout "$seconds" "$@" || rc=$?
    if [ "$rc" -eq 124 ]; then die "$what did not finish within ${seconds}s"; fi
    return "$rc"
}
# Poll a command until it succeeds, at most $1 seconds.
wait_until() {
    local seconds=$1 what=$2; shift 2
    local deadline=$(( $(date +%s) + seconds ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -lt "$deadline" ] || die "timed out after ${seconds}s waiting for $what"
        sleep 1
    done
}

# ------------------------------------------------------------------------------------------ 1. cluster
step "Starting the local Kubernetes cluster in $dir"
if ! "$py" hack/localcluster/localcluster.py status --dir "$dir" >/dev/null 2>&1; then
    say "Not running yet. The first start on a machine compiles etcd, kube-apiserver, kube-controller-manager, kube-scheduler,"
    say "kubectl, helm, the kubelet, containerd and runc from Go modules: about 20-40 minutes on 2 CPU cores, once"
    say "(cached in ~/.cache/qlora-operator). Later starts take seconds."
fi
within "$cluster_timeout" "starting the local cluster" \
    "$py" hack/localcluster/localcluster.py up --dir "$dir" --node real
export KUBECONFIG="$dir/kubeconfig"
kubectl="$dir/bin/kubectl"
k() { within 120 "kubectl $*" "$kubectl" "$@"; }
k get nodes -o wide

step "Putting the operator and trainer images on the node"
say "Built from Dockerfile.operator and Dockerfile.trainer with buildah on a Debian base when the cached archives"
say "are missing (the first trainer build downloads torch: about 10 minutes), then imported into containerd."
within "$cluster_timeout" "building and loading the images" \
    "$py" hack/localcluster/localcluster.py load --dir "$dir" operator trainer

# ---------------------------------------------------------------------------------- 2. operator (Helm)
step "Installing the operator with its Helm chart (release qlora in $opns, watching $ns)"
# Helm installs crds/ only on a first install, never upgrades it: the current CRD goes in first.
k apply --server-side --force-conflicts -f crds/qlorafinetunes.qlora.io.yaml >/dev/null
k wait --for=condition=Established --timeout=60s crd/qlorafinetunes.qlora.io >/dev/null
k create namespace "$ns" --dry-run=client -o yaml | k apply -f - >/dev/null
within 360 "helm upgrade --install" "$dir/bin/helm" upgrade --install qlora charts/qlora-operator \
    --namespace "$opns" --create-namespace --wait --timeout 5m \
    --set "watchNamespaces[0]=$ns" --set metrics.scrapeInterval=1 --set-json status.minInterval=0.5 >/dev/null
k -n "$opns" get pods -l app.kubernetes.io/instance=qlora -o wide
operator_logs() { "$kubectl" -n "$opns" logs deploy/qlora-qlora-operator --tail="${1:-40}" 2>&1; }

# ------------------------------------------------------------------------------------------ 3. inputs
step "Making the demo's inputs: a tiny random-weight model and a Korean/English QA set"
model="$demo/inputs/tiny-llama"
if [ ! -f "$model/model.safetensors" ]; then
    within 600 "making the tiny model" "$py" hack/demo/inputs.py model "$model" >/dev/null 2>"$demo/inputs.log" \
        || { tail -n 20 "$demo/inputs.log" >&2; die "could not make the tiny model (log above)"; }
fi
"$py" hack/demo/inputs.py data "$demo/inputs/data.jsonl" >/dev/null
say "model: $model (Llama-style, 2 layers, hidden size 64, byte-level BPE tokenizer with a chat template)"
say "data:  $(wc -l < "$demo/inputs/data.jsonl") question/answer records, for example:"
head -n 2 "$demo/inputs/data.jsonl" | sed 's/^/         /'

k apply -n "$ns" -f hack/demo/volumes.yaml >/dev/null
pvc_bound() { [ "$("$kubectl" -n "$ns" get pvc "$1" -o jsonpath='{.status.phase}')" = Bound ]; }
volume_dir() {  # the host folder of a bound PVC (the local cluster provisions volumes as folders)
    local pv
    wait_until 60 "PVC $1 to be bound" pvc_bound "$1"
    pv=$(k -n "$ns" get pvc "$1" -o jsonpath='{.spec.volumeName}')
    k get pv "$pv" -o jsonpath='{.spec.hostPath.path}'
}
models_dir=$(volume_dir models)
adapters_dir=$(volume_dir adapters)
rm -rf "$models_dir/tiny-llama" && cp -r "$model" "$models_dir/tiny-llama"
say "copied the model into PVC models (tiny-llama/)"
k -n "$ns" create configmap demo-qa --from-file=data.jsonl="$demo/inputs/data.jsonl" --dry-run=client -o yaml \
    | k -n "$ns" apply -f - >/dev/null
say "ConfigMap demo-qa holds the data set (key data.jsonl)"

# --------------------------------------------------------------------------------------- 4. fine-tune
step "Applying hack/demo/finetune.yaml (QLoRAFinetune $name: 60 steps, NF4 4-bit, LoRA r=8, on the CPU)"
if "$kubectl" -n "$ns" get qft "$name" >/dev/null 2>&1; then
    say "deleting the $name of an earlier demo"
    k -n "$ns" delete qft "$name" --wait=true --timeout=90s >/dev/null
fi
rm -rf "${adapters_dir:?}/$name"  # an earlier demo's checkpoints would make this run resume at its end
k -n "$ns" apply -f hack/demo/finetune.yaml
say "Watching it (kubectl get qft -w). Loading takes a few seconds, then each step well under a second."
echo
"$kubectl" -n "$ns" get qft "$name" -w &
watch_pid=$!
trap 'rc=$?; kill $watch_pid 2>/dev/null || true; [ $rc -eq 0 ] || { operator_logs > "$demo/operator.log"; echo "demo: stopped (exit $rc). Logs: $demo/, cluster logs: $dir/logs/" >&2; }' EXIT
phase=""
deadline=$(( $(date +%s) + run_timeout ))
while :; do
    phase=$("$kubectl" -n "$ns" get qft "$name" -o jsonpath='{.status.phase}' 2>/dev/null || true)
    case "$phase" in Succeeded|Failed) break ;; esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        kill "$watch_pid" 2>/dev/null || true
        die "the fine-tune did not finish within ${run_timeout}s (phase: ${phase:-none}); see $demo/operator.log and: $kubectl -n $ns describe qft $name"
    fi
    sleep 2
done
sleep 1
kill "$watch_pid" 2>/dev/null || true
wait "$watch_pid" 2>/dev/null || true
echo
k -n "$ns" get qft "$name" -o wide

if [ "$phase" != Succeeded ]; then
    echo
    say "status message: $("$kubectl" -n "$ns" get qft "$name" -o jsonpath='{.status.message}')"
    pod=$("$kubectl" -n "$ns" get pods -l "qlora.io/finetune=$name" -o jsonpath='{.items[-1:].metadata.name}' 2>/dev/null || true)
    [ -n "$pod" ] && { say "last lines of the trainer's log ($pod):"; "$kubectl" -n "$ns" logs "$pod" --tail=20 2>&1 | sed 's/^/      /'; }
    die "the fine-tune failed"
fi

# ------------------------------------------------------------------------------------------ 5. result
step "Done: where the adapter is"
jp() { "$kubectl" -n "$ns" get qft "$name" -o jsonpath="$1"; }
say "status.outputPath:     $(jp '{.status.outputPath}')   (on this machine: $adapters_dir/$name)"
say "steps $(jp '{.status.step}')/$(jp '{.status.totalSteps}'), loss $(jp '{.status.loss}'), eval loss $(jp '{.status.evalLoss}'), last checkpoint step $(jp '{.status.lastCheckpoint.step}')"
say "files: $(cd "$adapters_dir/$name" && ls | tr '\n' ' ')"
initial=$("$py" -c "import json,sys; s=json.load(open(sys.argv[1])); print(f\"{s['initialEvalLoss']:.4f} -> {s['evalLoss']:.4f}\")" "$adapters_dir/$name/summary.json" 2>/dev/null || echo "?")
say "eval loss before -> after training (summary.json): $initial"

step "One answer of the model before and after training (greedy decoding, CPU)"
question=$("$py" -c 'from hack.demo.inputs import DEMO_QUESTION; print(DEMO_QUESTION)')
within 300 "answering" "$py" hack/demo/answer.py --model "$model" --adapter "$adapters_dir/$name" "$question" \
    2>"$demo/answer.log" || { tail -n 20 "$demo/answer.log" >&2; die "could not load the adapter (log above)"; }
say "(expected after training: $("$py" -c 'from hack.demo.inputs import QA_PAIRS, DEMO_QUESTION; print(dict(QA_PAIRS)[DEMO_QUESTION])'))"

echo
echo "The demo took $(( $(date +%s) - t0 ))s. The cluster stays up:"
echo "  export KUBECONFIG=$KUBECONFIG"
echo "  $kubectl -n $ns get qft $name -o yaml"
echo "The operator keeps running (kubectl -n $opns logs deploy/qlora-qlora-operator; helm -n $opns uninstall qlora removes it)."
echo "Stop the cluster with: make cluster-down CLUSTER_DIR=$dir"
