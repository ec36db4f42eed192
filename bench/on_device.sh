#!/usr/bin/env bash
# One call on a lent GPU machine (the `run` tool): install the carried wheels (.whl/), then run the steps named
# in $@ in order, each under its own time limit, logging to $OUT. Steps: gpu-tests, bench-<size>, cli-<size>,
# anatomy. A failed step does not stop the next one.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >"$OUT/pip.log" 2>&1 || { tail "$OUT/pip.log"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD/trainer:$PWD/operator:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -c 'import torch, transformers, peft, bitsandbytes, liger_kernel, importlib.metadata as m; print("versions:", torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__, m.version("liger-kernel"), torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,memory.total,clocks.sm,driver_version --format=csv,noheader
for step in "$@"; do
  echo "=== $step $(date -u +%H:%M:%S)"
  case $step in
    gpu-tests) timeout 420 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu-tests.log" | tail -25 ;;
    bench-*) size=${step#bench-}; settings=${SETTINGS:-defaults,guide,defaults48,defaults24,lowmem}
      timeout ${BENCH_LIMIT:-400} python3 bench/trainer_speed.py --size "$size" --out /tmp/bench-$size --settings "$settings" \
        --max-steps 12 --full-epoch "${FULL_EPOCH:-defaults}" >"$OUT/bench-$size.log" 2>&1
      grep -v "^{" "$OUT/bench-$size.log" | grep -iE "error|Traceback|^\[|GPU:|^\|" | tail -20
      cp /tmp/bench-$size/results.json "$OUT/results-$size.json" 2>/dev/null; grep -h -o "\"worst_case[a-z_]*\": [^,]*" /tmp/bench-$size/result-*.json ;;
    cli-*) size=${step#cli-}
      timeout 300 python3 bench/trainer_speed.py --size "$size" --out /tmp/bench-$size --cli-packages trainer --cli-training '{}' \
        >"$OUT/cli-$size.log" 2>&1; tail -c 2500 "$OUT/cli-$size.log" ;;
    anatomy) timeout 300 python3 bench/step_anatomy.py --out /tmp/bench-2.4b --model-dir /tmp/bench-2.4b/model-exaone-3.5-2.4b \
        --steps 20 --rounds 2 --variants eager,eager-graphs,trainer,trainer-graphs >"$OUT/anatomy.log" 2>&1; tail -30 "$OUT/anatomy.log" ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
