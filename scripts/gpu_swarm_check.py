"""A static two-Scout swarm on one device (``--span``, no libp2p discovery) answering a greedy
request exactly as a single process does: part of scripts/gpu_check.sh.

    python scripts/gpu_swarm_check.py --model FOLDER --device cuda --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oracle.swarm.local_scouts import LocalScout  # noqa: E402

PROMPT = "The quick brown fox"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def complete(url: str, model: str, max_tokens: int) -> str:
    body = json.dumps({"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as r:
        return json.loads(r.read())["choices"][0]["text"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quantize", default="q4_0")
    parser.add_argument("--out", default=".")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    from shard_common.model.loader import load_weights

    n_layers = load_weights(args.model).config.n_layers
    half = n_layers // 2
    common = ["--model", args.model, "--device", args.device, "--quantize", args.quantize]
    single = subprocess.run([sys.executable, "-m", "oracle.cli", "generate", *common, "--raw", PROMPT, "--max-tokens",
                             str(args.max_tokens)], capture_output=True, text=True)
    if single.returncode:
        print(single.stderr[-3000:])
        return 1
    expected = single.stdout.rstrip("\n")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        scout_args = ["--model", args.model, "--device", args.device, "--quantize", args.quantize, "--threads", "4"]
        scouts = [LocalScout(span, root / f"scout-{i}", scout_args) for i, span in enumerate([(0, half), (half, n_layers)])]
        port = free_port()
        log = open(Path(args.out) / "gpu-swarm-oracle.log", "w")
        oracle = subprocess.Popen([sys.executable, "-m", "oracle.cli", "serve", *common, "--scouts",
                                   ",".join(str(s.address) for s in scouts), "--no-auth", "--no-store", "--port", str(port),
                                   "--data-dir", str(root / "oracle"), "--data-port", "0", "--speculative", "off"],
                                  stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    model = json.loads(urllib.request.urlopen(url + "/v1/models", timeout=5).read())["data"][0]["id"]
                    break
                except OSError:
                    if time.monotonic() > deadline or oracle.poll() is not None:
                        print("the Oracle did not start; see gpu-swarm-oracle.log")
                        return 1
                    time.sleep(1)
            got = complete(url, model, args.max_tokens)
        finally:
            oracle.terminate()
            oracle.wait(timeout=60)
            for s in scouts:
                s.stop()
    # `generate` prints the prompt's continuation; the swarm answers the same continuation.
    same = expected == got
    result = {"device": args.device, "spans": [[0, half], [half, n_layers]], "single_process": expected, "swarm": got, "equal": same}
    (Path(args.out) / "gpu-swarm.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
