#!/bin/sh
# Rollout throughput against onnxruntime-genai and transformers on the same weights, one run.
# Usage: benches/peers/run.sh [--batch 8 --group 5 --tokens 64 --rounds 3 --warmup 1 --data FILE.jsonl]
# Uses $PEERS_VENV, else the exporter's venv (.venv-export, `make fixture` makes it), else makes
# benches/peers/.venv from models/requirements.txt (torch from PyPI: a large download).
set -e
cd "$(dirname "$0")/../.."
VENV=${PEERS_VENV:-}
if [ -z "$VENV" ]; then
  if [ -x .venv-export/bin/python ]; then VENV=.venv-export; else VENV=benches/peers/.venv; fi
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r models/requirements.txt
fi
make -s ort
cargo build --release --locked -q
ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$PWD/vendor/ort/libonnxruntime.so} "$VENV/bin/python" benches/peers/peers.py "$@"
