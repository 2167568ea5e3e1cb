#!/usr/bin/env bash
# GPU smoke checks: what a person with one CUDA GPU runs to see tandem work on vLLM end to end with a
# 0.5B-8B model: eval, a "p -> w -> p" BetterTogether run whose adapter the running engine serves,
# and the same through vLLM's OpenAI-compatible server with an adapter loaded at runtime. Prints
# what it saw; exits non-zero at the first check that fails.
#
#   pip install -e ".[vllm]"                       # CUDA vLLM and its torch, in a fresh venv
#   bash bench/gpu_smoke.sh Qwen/Qwen2.5-0.5B-Instruct   # any HF id the machine can fetch, or a folder
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-Qwen/Qwen2.5-0.5B-Instruct}
OUT=${OUT:-runs/gpu-smoke}
PORT=${PORT:-8011}
mkdir -p "$OUT"
python - <<'PY'
import torch, vllm
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print(f"torch {torch.__version__}, vLLM {vllm.__version__}, {torch.cuda.get_device_name(0)}")
PY

echo "== 1. eval on vLLM (GSM8K, 64 test questions)"
tandem eval --task gsm8k --model "$MODEL" --engine vllm --device cuda --dtype bfloat16 --split test --limit 64 \
    --no-cache | tee "$OUT/eval.txt"
grep -q "0 failed" "$OUT/eval.txt" && echo "ok: every reply parsed"

echo "== 2. p -> w -> p on vLLM (Iris, tiny budget, --engine and --device auto): the weight step trains on the GPU"
echo "   while vLLM sleeps, and its adapter is served by the running engine"
tandem -v optimize --task iris --model "$MODEL" --strategy "p -> w -> p" \
    --budget tiny --run-dir "$OUT/iris" --no-cache 2>&1 | tee "$OUT/optimize.txt"
grep -q '"device": "cuda"' "$OUT/iris/config.json" && echo "ok: the run trained and served on cuda"
grep "vLLM sleeps while the weight step trains" "$OUT/optimize.txt" && echo "ok: vLLM slept while training"
grep -q "serving adapter" "$OUT/optimize.txt" && echo "ok: adapter served without a restart"

echo "== 3. the same model behind vLLM's OpenAI-compatible server, an adapter loaded at runtime"
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True python -m vllm.entrypoints.openai.api_server --model "$MODEL" \
    --port "$PORT" --enable-lora --max-lora-rank 64 > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break; sleep 1; done
tandem eval --task iris --model "$MODEL" --engine openai --base-url "http://127.0.0.1:$PORT/v1" --split test --no-cache
tandem -v optimize --task iris --model "$MODEL" --engine openai --base-url "http://127.0.0.1:$PORT/v1" --device cuda \
    --strategy "p -> w" --budget tiny --run-dir "$OUT/iris-server" --no-cache 2>&1 | tee "$OUT/server-optimize.txt"
grep -q "loaded adapter" "$OUT/server-optimize.txt" && echo "ok: adapter loaded into the server at runtime"

echo "== 4. engines side by side on this GPU"
python bench/engines.py --model "$MODEL" --dtype bfloat16 --device cuda --examples 64 --baseline-examples 8
