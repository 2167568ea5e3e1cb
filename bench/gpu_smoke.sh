#!/usr/bin/env bash
# GPU smoke checks: what a person with one CUDA GPU runs the first time one is at hand, to see tandem work
# on vLLM end to end with a 0.5B-8B model and to see the GPU's memory come back after every weight step:
#   1. eval on vLLM in process
#   2. p -> r -> p on vLLM: each r round sleeps vLLM, trains, moves the trainer copy off the GPU, wakes vLLM
#   3. g -> w on vLLM: instructions written by the model itself, then a LoRA step
#   4. vLLM's OpenAI-compatible server: eval, p -> w with the adapter loaded at runtime
#   5. the DSPy provider (tandem.integrations.dspy) against that server: one job, device auto
#   6. engines side by side
# Each check prints the peak GPU memory it saw (nvidia-smi, every process on the GPU) and tandem's own
# lines about each weight step (the trainer copy's peak, vLLM asleep and awake again); it exits non-zero
# at the first check that fails.
#
#   pip install -e ".[vllm,dspy]"                        # CUDA vLLM and its torch, in a fresh venv
#   bash bench/gpu_smoke.sh Qwen/Qwen2.5-0.5B-Instruct   # any HF id the machine can fetch, or a folder
#   SKIP="5 6" bash bench/gpu_smoke.sh MODEL              # leave checks out by number
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-Qwen/Qwen2.5-0.5B-Instruct}
OUT=${OUT:-runs/gpu-smoke}
PORT=${PORT:-8011}
SKIP=${SKIP:-}
mkdir -p "$OUT"
python - <<'PY'
import torch, vllm
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"torch {torch.__version__}, vLLM {vllm.__version__}, {torch.cuda.get_device_name(0)}")
PY

# GPU memory in use (MiB, all processes), sampled every 200 ms for the whole script.
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 200 > "$OUT/gpu-memory.log" &
SAMPLER=$!
SERVER=
cleanup() { kill "$SAMPLER" 2>/dev/null || true; [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null || true; }
trap cleanup EXIT

MARK=0
start() {  # start a check: its title, and where its memory samples begin
    echo "== $1"
    MARK=$(wc -l < "$OUT/gpu-memory.log")
}
peak() {  # the peak GPU memory since `start`, and tandem's own lines about weight steps in log file $1
    sleep 0.5
    tail -n +"$((MARK + 1))" "$OUT/gpu-memory.log" | sort -n | tail -1 | awk '{printf "   peak GPU memory in use: %d MiB (nvidia-smi)\n", $1}'
    if [ -n "${1:-}" ]; then
        grep -hoE "vLLM sleeps while.*|the trainer copy (of|left).*|vLLM is awake again.*|training a LoRA on .*" "$1" \
            | sed 's/^/   /' || true
        if grep -q "less GPU memory is free than before the weight step" "$1"; then
            echo "FAIL: a weight step left GPU memory taken (see $1)"; exit 1
        fi
    fi
}
skip() { [[ " $SKIP " == *" $1 "* ]]; }
ok() {  # ok "what holds" command...: says ok, or FAIL and stops the script
    local what=$1; shift
    if "$@"; then echo "ok: $what"; else echo "FAIL: $what"; exit 1; fi
}

if ! skip 1; then
    start "1. eval on vLLM (GSM8K, 64 test questions)"
    tandem eval --task gsm8k --model "$MODEL" --engine vllm --device cuda --dtype bfloat16 --split test --limit 64 \
        --no-cache | tee "$OUT/eval.txt"
    ok "every reply parsed" grep -q "0 failed" "$OUT/eval.txt"
    peak
fi

if ! skip 2; then
    start "2. p -> r -> p on vLLM (Iris, tiny budget): every r round trains on the GPU while vLLM sleeps"
    tandem -v optimize --task iris --model "$MODEL" --engine vllm --device cuda --strategy "p -> r -> p" \
        --budget tiny --run-dir "$OUT/iris-r" --no-cache 2>&1 | tee "$OUT/r.txt"
    rounds=$(grep -c "vLLM is awake again" "$OUT/r.txt" || true)
    ok "$rounds policy updates, vLLM awake again after each" [ "$rounds" -ge 1 ]
    ok "the trainer copy left the GPU before every wake-up" \
        [ "$(grep -c "the trainer copy left cuda" "$OUT/r.txt" || true)" -eq "$rounds" ]
    peak "$OUT/r.txt"
fi

if ! skip 3; then
    start "3. g -> w on vLLM (Iris, tiny budget): the model writes its instructions, then a LoRA step"
    tandem -v optimize --task iris --model "$MODEL" --engine vllm --device cuda --strategy "g -> w" \
        --budget tiny --run-dir "$OUT/iris-gw" --no-cache 2>&1 | tee "$OUT/gw.txt"
    ok "the run trained and served on cuda" grep -q '"device": "cuda"' "$OUT/iris-gw/config.json"
    ok "the adapter served without a restart" grep -q "serving adapter" "$OUT/gw.txt"
    ok "vLLM awake again after the weight step" grep -q "vLLM is awake again" "$OUT/gw.txt"
    peak "$OUT/gw.txt"
fi

if ! skip 4 || ! skip 5; then
    echo "== the same model behind vLLM's OpenAI-compatible server (half the GPU; the trainer copy beside it)"
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True python -m vllm.entrypoints.openai.api_server --model "$MODEL" \
        --port "$PORT" --enable-lora --max-lora-rank 64 --gpu-memory-utilization 0.5 > "$OUT/server.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break; sleep 1; done
    curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null || { echo "FAIL: the server did not come up"; tail "$OUT/server.log"; exit 1; }
fi

if ! skip 4; then
    start "4. eval and p -> w through the server, the adapter loaded at runtime"
    tandem eval --task iris --model "$MODEL" --engine openai --base-url "http://127.0.0.1:$PORT/v1" --split test \
        --no-cache
    tandem -v optimize --task iris --model "$MODEL" --engine openai --base-url "http://127.0.0.1:$PORT/v1" \
        --device auto --strategy "p -> w" --budget tiny --run-dir "$OUT/iris-server" --no-cache 2>&1 \
        | tee "$OUT/server-optimize.txt"
    ok "the adapter loaded into the server at runtime" grep -q "loaded adapter" "$OUT/server-optimize.txt"
    peak "$OUT/server-optimize.txt"
fi

if ! skip 5; then
    start "5. the DSPy provider against the server: one LoRA job (device auto), served at once"
    python - "$MODEL" "$PORT" "$OUT" 2>&1 <<'PY' | tee "$OUT/dspy.txt"
import json, logging, sys
import dspy
from dspy.clients.utils_finetune import TrainDataFormat
from tandem.integrations.dspy import TandemProvider
from tandem.settings import LoraSettings

logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
model, port, out = sys.argv[1], sys.argv[2], sys.argv[3]
url = f"http://127.0.0.1:{port}/v1"
provider = TandemProvider(url, out_dir=f"{out}/dspy-jobs", lora=LoraSettings(rank=16, epochs=1), progress=False)
lm = dspy.LM(f"openai/{model}", api_base=url, api_key="none", provider=provider, finetuning_model=model,
             temperature=0.0, max_tokens=16, cache=False)
data = [{"messages": [{"role": "user", "content": f"Say the word {w}."}, {"role": "assistant", "content": w}]}
        for w in ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")]
tuned = lm.finetune(data, TrainDataFormat.CHAT).result()
assert isinstance(tuned, dspy.LM), tuned
training = provider.jobs[0].record["training"]
print(f"ok: job trained on {training['device']} in {training['dtype']} at {training['tokens_per_second']:.0f} tok/s, "
      f"loss {training['first_loss']:.3f} -> {training['last_loss']:.3f}; served as {tuned.model}: {tuned('Say the word beta.')}")
program = dspy.Predict("word -> reply")
program.set_lm(tuned)
program.save(f"{out}/dspy-program", save_program=True)
print("ok: the program saved with its provider (save_program=True)")
PY
    peak "$OUT/dspy.txt"
fi

if ! skip 6; then
    start "6. engines side by side on this GPU"
    [ -n "$SERVER" ] && { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=; }
    python bench/engines.py --model "$MODEL" --dtype bfloat16 --device cuda --examples 64 --baseline-examples 8
    peak
fi
echo "all checks passed; logs in $OUT"
