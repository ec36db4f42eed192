#!/usr/bin/env bash
# `make demo`: a QLoRA fine-tune run by the operator on a local Kubernetes cluster, end to end, on a CPU.
#
#  1. brings up the local cluster (hack/localcluster; the first start compiles Kubernetes: long, once)
#  2. installs the QLoRAFinetune CRD and starts the operator in the background (log: .demo/operator.log)
#
# Settings (environment): CLUSTER_DIR (.localcluster), DEMO_NAMESPACE (qlora-demo), DEMO_DIR (.demo),
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
    say "Not running yet. The first start on a machine compiles etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl and"
    say "helm from Go modules: about 20-40 minutes on 2 CPU cores, once (cached in ~/.cache/qlora-operator)."
    say "Later starts take seconds."
fi
within "$cluster_timeout" "starting the local cluster" \
    "$py" hack/localcluster/localcluster.py up --dir "$dir"
export KUBECONFIG="$dir/kubeconfig"
kubectl="$dir/bin/kubectl"
k() { within 120 "kubectl $*" "$kubectl" "$@"; }
k get nodes

# ---------------------------------------------------------------------------------- 2. CRD + operator
step "Installing the QLoRAFinetune CRD"
k apply --server-side --force-conflicts -f crds/qlorafinetunes.qlora.io.yaml
k wait --for=condition=Established --timeout=60s crd/qlorafinetunes.qlora.io
k create namespace "$ns" --dry-run=client -o yaml | k apply -f - >/dev/null
say "namespace $ns"

step "Starting the operator (watching namespace $ns; log: $demo/operator.log)"
if [ -f "$demo/operator.pid" ]; then
    old=$(cat "$demo/operator.pid")
    if grep -qs qlora_operator "/proc/$old/cmdline"; then
        say "stopping the operator of an earlier demo (pid $old)"
        kill "$old" 2>/dev/null || true
        for _ in $(seq 20); do kill -0 "$old" 2>/dev/null || break; sleep 0.5; done
    fi
fi
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
health_port=$(free_port)
metrics_port=$(free_port)
"$py" -m qlora_operator --namespaces "$ns" --scrape-interval 1 --status-min-interval 0.5 \
    --health-port "$health_port" --metrics-port "$metrics_port" > "$demo/operator.log" 2>&1 &
operator_pid=$!
echo "$operator_pid" > "$demo/operator.pid"
stop_operator() {  # SIGTERM, up to 20 s for kopf to finish, then SIGKILL
    kill -0 "$operator_pid" 2>/dev/null || return 0
    kill "$operator_pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 "$operator_pid" 2>/dev/null || return 0; sleep 0.5; done
    kill -9 "$operator_pid" 2>/dev/null || true
}
trap 'rc=$?; stop_operator; [ $rc -eq 0 ] || echo "demo: stopped (exit $rc). Logs: $demo/, cluster logs: $dir/logs/" >&2' EXIT
healthy() { kill -0 "$operator_pid" && "$py" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$health_port/healthz', timeout=2)"; }
deadline=$(( $(date +%s) + 60 ))
until healthy >/dev/null 2>&1; do
    kill -0 "$operator_pid" 2>/dev/null || { tail -n 30 "$demo/operator.log" >&2; die "the operator exited at start (log above)"; }
    [ "$(date +%s)" -lt "$deadline" ] || { tail -n 30 "$demo/operator.log" >&2; die "the operator was not healthy within 60s"; }
    sleep 0.5
done
say "operator running (pid $operator_pid), health on :$health_port, its own metrics on :$metrics_port"

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
trap 'rc=$?; kill $watch_pid 2>/dev/null || true; stop_operator; [ $rc -eq 0 ] || echo "demo: stopped (exit $rc). Logs: $demo/, cluster logs: $dir/logs/" >&2' EXIT
phase=""
deadline=$(( $(date +%s) + run_timeout ))
while :; do
    phase=$("$kubectl" -n "$ns" get qft "$name" -o jsonpath='{.status.phase}' 2>/dev/null || true)
    case "$phase" in Succeeded|Failed) break ;; esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        kill "$watch_pid" 2>/dev/null || true
        die "the fine-tune did not finish within ${run_timeout}s (phase: ${phase:-none}); see $demo/operator.log and: $kubectl -n $ns describe qft $name"
    fi
    kill -0 "$operator_pid" 2>/dev/null || die "the operator stopped; see $demo/operator.log"
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
echo "The operator was stopped (its log: $demo/operator.log). Stop the cluster with: make cluster-down CLUSTER_DIR=$dir"
