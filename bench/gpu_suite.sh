#!/usr/bin/env bash
# The GPU benchmarks in one call on one GPU, within 8 minutes, into one JSON file:
#   bench/gpu_suite.sh [--smoke] [--out FILE]     (default bench/results/gpu_suite.json)
# gpu_train (real, real_square, ideal), then gpu_infer (forward, pipeline, eager and
# compiled), each under its own timeout so that one hung part still leaves the other's
# numbers. The file holds the commit, and per part its exit status, seconds, results and,
# when it failed, the tail of its log. --smoke: the same code on CPU with the tiny recipe
# (make test runs it, so the script cannot rot).
set -uo pipefail
cd "$(dirname "$0")/.."

smoke="" out="bench/results/gpu_suite.json"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke="--smoke"; shift ;;
    --out) [ $# -ge 2 ] || { echo "--out needs a file name" >&2; exit 2; }; out="$2"; shift 2 ;;
    *) echo "unknown argument $1; use --smoke and --out FILE" >&2; exit 2 ;;
  esac
done
py="${PYTHON:-}"
[ -n "$py" ] || { [ -x .venv/bin/python ] && py=.venv/bin/python || py=python3; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# name, timeout (s), module, extra arguments; 270 + 210 s keep the whole suite within 8 min
run() {
  local name="$1" limit="$2" module="$3"; shift 3
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$py" -m "$module" $smoke --out "$work/$name.json" "$@" \
    >"$work/$name.log" 2>&1
  echo "$? $((SECONDS - start))" >"$work/$name.status"
  tail -n 5 "$work/$name.log" >&2
}
run gpu_train 270 bench.gpu_train
run gpu_infer 210 bench.gpu_infer --compile

"$py" - "$work" "$out" "${smoke:+1}" <<'EOF'
import json, subprocess, sys
from pathlib import Path

from lens_model import atomic

work, out, smoke = Path(sys.argv[1]), sys.argv[2], bool(sys.argv[3])
commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
suite = {"benchmark": "gpu_suite", "smoke": smoke,
         "commit": commit.stdout.strip() or None, "parts": {}}
for name in ("gpu_train", "gpu_infer"):
    code, seconds = map(int, (work / f"{name}.status").read_text().split())
    result = work / f"{name}.json"
    part = {"exit": code, "timed_out": code in (124, 137), "seconds": seconds,
            "result": json.loads(result.read_text()) if result.is_file() else None}
    if code:
        part["log_tail"] = (work / f"{name}.log").read_text()[-3000:]
    suite["parts"][name] = part
atomic.write_text(out, json.dumps(suite, indent=2) + "\n")
failed = [n for n, p in suite["parts"].items() if p["exit"]]
print(f"wrote {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
sys.exit(1 if failed else 0)
EOF
