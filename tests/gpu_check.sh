#!/usr/bin/env bash
# The GPU check (issue 15): one call, at most 10 minutes, on a fresh GPU machine without internet.
#
#   bash tests/gpu_check.sh [WHEELS_DIR]          (default: $WHEELS, else ./wheels)
#
# 1. Installs, from the wheels in WHEELS_DIR only (never committed: wheels/ is git-ignored), the
#    requirements.txt packages this Python cannot import; what the machine has (its torch) is kept.
# 2. Runs tests/test_gpu.py.
# 3. Times the training step at the t4 profile's shape in fp16 and bf16, eager and compiled, each against
#    the plain PyTorch GPT of the same shape in the same run (`bench --reference`), with the peak GPU
#    memory of the t4 micro-batch and whether it fits a 16 GB T4; then 5 steps of the t4 pretraining stage
#    (compile="auto"): compiled or fallen back (and why), and whether the micro-batch had to be fitted.
# 4. Writes one JSON of figures: $GPU_FIGURES, else $OUT/gpu_figures.json where $OUT is set, else
#    runs/gpu_check/gpu_figures.json; the logs go beside it (gpu_check/).
# Without a GPU it says so, runs the GPU tests (they skip) and writes {"gpu": false, ...}; it exits 0
# unless a GPU test fails. PYTHON picks the interpreter (default: the first of python3, python,
# .venv/bin/python that imports torch); GPU_CHECK_PARTS="bench" (or "tests", "fit") runs one part alone, for a rerun.
set -euo pipefail

if [[ -z "${GPU_CHECK_INNER:-}" ]]; then  # the whole check under one hard limit; the steps keep to BUDGET_S
    GPU_CHECK_INNER=1 exec timeout 560 bash "$0" "$@"
fi
cd "$(dirname "$0")/.."
BUDGET_S=540  # every step's timeout is cut from what is left of this, so the JSON is always written
WHEELS_DIR="${1:-${WHEELS:-wheels}}"
PARTS="${GPU_CHECK_PARTS:-tests bench fit}"
FIGURES="${GPU_FIGURES:-${OUT:+$OUT/gpu_figures.json}}"
FIGURES="${FIGURES:-runs/gpu_check/gpu_figures.json}"
WORK="$(dirname "$FIGURES")/gpu_check"
mkdir -p "$WORK"
rm -rf "$WORK"/bench_* "$WORK"/test_figures.json "$WORK"/junit.xml "$WORK"/fit.log "$WORK"/fit_run  # an earlier run's figures are not this one's
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1

left() { echo $((BUDGET_S - SECONDS)); }
say() { echo "[gpu_check $(printf '%3d' "$SECONDS")s] $*"; }

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    for candidate in python3 python .venv/bin/python; do
        if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
            PY="$candidate"
            break
        fi
    done
fi
PY="${PY:-python3}"
say "python: $PY ($("$PY" --version 2>&1))"

# --- 1. what this Python lacks, from the wheels it is handed --------------------------------------
declare -A MODULE=([rouge-score]=rouge_score [absl-py]=absl [pyyaml]=yaml)  # import names that differ
reqs=() mods=()
while read -r line || [[ -n "$line" ]]; do
    req="${line%%#*}" && req="${req//[[:space:]]/}"
    [[ -z "$req" ]] && continue
    name="${req%%[=<>!~;\[]*}"
    reqs+=("$req") && mods+=("${MODULE[$name]:-${name//-/_}}")
done < "${REQUIREMENTS:-requirements.txt}"
mapfile -t absent < <("$PY" -c 'import importlib.util, sys
for m in sys.argv[1:]: print(m) if importlib.util.find_spec(m) is None else None' "${mods[@]}")
: > "$WORK/installed.txt" && : > "$WORK/install_failed.txt"
pip_install() { "$PY" -m pip install -q --no-index --find-links "$WHEELS_DIR" "$1" >> "$WORK/install.log" 2>&1; }
for i in "${!mods[@]}"; do
    [[ " ${absent[*]} " == *" ${mods[$i]} "* ]] || continue
    req="${reqs[$i]}" && name="${req%%[=<>!~;\[]*}"
    say "installing $req from $WHEELS_DIR"
    if [[ -d "$WHEELS_DIR" ]] && pip_install "$req"; then
        echo "$req" >> "$WORK/installed.txt"
    elif [[ -d "$WHEELS_DIR" ]] && pip_install "$name"; then  # another version's wheel: better than none
        echo "$name (the wheel's version: none for $req)" >> "$WORK/installed.txt"
    else
        say "cannot install $req (no wheel for it in $WHEELS_DIR)"
        echo "$req" >> "$WORK/install_failed.txt"
    fi
done

GPU="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
if [[ "$GPU" == 1 ]]; then
    say "GPU: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "x", torch.cuda.device_count())')"
else
    say "no CUDA GPU here: the GPU tests skip and nothing is benchmarked"
fi

# --- 2. the GPU tests ----------------------------------------------------------------------------
tests_rc=0 tests_limit=$(( $(left) < 390 ? $(left) - 60 : 330 ))  # at least 60 s left for the benchmarks
(( tests_limit < 30 )) && tests_limit=30
if [[ " $PARTS " == *" tests "* ]]; then
    say "tests/test_gpu.py (at most ${tests_limit}s)"
    POCKETGPT_GPU_FIGURES="$WORK/test_figures.json" timeout "$tests_limit" \
        "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/test_gpu.py --junitxml "$WORK/junit.xml" \
        2>&1 | tee "$WORK/pytest.log" || tests_rc=$?
    say "tests: exit $tests_rc"
fi

# --- 3. the benchmarks at the t4 shape -----------------------------------------------------------
if [[ "$GPU" == 1 && " $PARTS " == *" bench "* ]]; then
    for compiled in False True; do
        for precision in fp16 bf16; do
            name="${precision}_$([[ $compiled == True ]] && echo compiled || echo eager)"
            limit=$(( $(left) < 195 ? $(left) - 15 : 180 ))
            if (( limit < 20 )); then
                say "bench $name: not run, out of time"
                echo '{"error": "not run: out of time"}' > "$WORK/bench_$name.json"
                continue
            fi
            say "bench $name (at most ${limit}s)"
            rc=0
            timeout "$limit" "$PY" pocketgpt_utils.py bench --profile t4 --reference -p precision "$precision" \
                -p compile "$compiled" > "$WORK/bench_$name.out" 2> "$WORK/bench_$name.log" || rc=$?
            if grep -q '^{' "$WORK/bench_$name.out"; then
                grep '^{' "$WORK/bench_$name.out" | tail -n 1 > "$WORK/bench_$name.json"
                tail -n 1 "$WORK/bench_$name.json"
            else
                why="$(tail -n 1 "$WORK/bench_$name.log" 2>/dev/null || true)"
                (( rc == 124 )) && why="timed out after ${limit}s"
                "$PY" -c 'import json, sys; print(json.dumps({"error": sys.argv[1]}))' "exit $rc: $why" \
                    > "$WORK/bench_$name.json"
                say "bench $name failed: exit $rc: $why"
            fi
        done
    done
fi

# --- 3b. what the other issues need from a GPU: Newton-Schulz in bf16 and fp32; the t4 profile at a 1024 context
if [[ "$GPU" == 1 && " $PARTS " == *" bench "* ]]; then
    limit=$(( $(left) < 75 ? $(left) - 15 : 60 ))
    if (( limit >= 20 )); then
        say "Newton-Schulz precision (at most ${limit}s)"
        timeout "$limit" "$PY" tools/ns_precision.py --profile t4 --repeat 5 > "$WORK/ns_precision.jsonl" \
            2> "$WORK/ns_precision.log" || say "ns_precision: exit $?"
    fi
    for batch in 32 16 8; do  # the t4 micro-batch at n_positions=1024: the largest that fits 16 GB
        limit=$(( $(left) < 75 ? $(left) - 15 : 60 ))
        (( limit < 20 )) && break
        say "bench t4 at n_positions 1024, batch_size $batch (at most ${limit}s)"
        timeout "$limit" "$PY" pocketgpt_utils.py bench --profile t4 -p n_positions 1024 -p batch_size "$batch" \
            -p precision fp16 -p compile False --steps 3 > "$WORK/ctx1024_b$batch.out" 2>> "$WORK/ctx1024.log" || true
        grep '^{' "$WORK/ctx1024_b$batch.out" | tail -n 1 > "$WORK/ctx1024_b$batch.json" || true
    done
fi

# --- 3c. the t4 profile's first minutes as a stage lives them (issue 30): compile="auto" (compiled, or the
# fallback and why), and whether the micro-batch had to be fitted (metrics.json: micro_batch, grad_accum_steps)
if [[ "$GPU" == 1 && " $PARTS " == *" fit "* ]]; then
    limit=$(( $(left) < 195 ? $(left) - 15 : 180 ))
    if (( limit >= 60 )); then
        say "t4 profile: 5 pretraining steps with compile=auto (at most ${limit}s)"
        rm -rf "$WORK/fit_run"
        timeout "$limit" bash -c '"$1" pocketgpt_utils.py demo-data --out "$2/data" --max-bytes 3000000 \
            && "$1" pocketgpt_utils.py stage tokenizer --profile t4 -p corpus_path "$2/data/corpus.txt" -p run_dir "$2" \
            && "$1" pocketgpt_utils.py stage pretrain --profile t4 -p run_dir "$2" -p max_steps 5 -p log_interval 1 \
                -p eval_interval 5 -p eval_windows 64 -p warmup_steps 2' _ "$PY" "$WORK/fit_run" \
            > "$WORK/fit.log" 2>&1 || say "t4 first steps: exit $? (see $WORK/fit.log)"
    else
        say "t4 first steps: not run, out of time"
    fi
fi

# --- 4. one JSON of figures ----------------------------------------------------------------------
"$PY" -c 'import glob, json, os, sys, xml.etree.ElementTree as ET
work, out, gpu, rc, secs = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
def read(path, default=None):
    return json.load(open(path)) if os.path.exists(path) else default
def lines(path):
    return [l.strip() for l in open(path)] if os.path.exists(path) else []
tests = {"exit": rc}
if not os.path.exists(f"{work}/junit.xml"):
    tests["note"] = "no report: not run (GPU_CHECK_PARTS), or stopped (exit 124: out of time)"
else:
    root = ET.parse(f"{work}/junit.xml").getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ["tests", "failures", "errors", "skipped"]}
    tests.update(total=n["tests"], passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"],
                 failed=n["failures"], errors=n["errors"], skipped=n["skipped"], seconds=float(suite.get("time", 0)),
                 not_passed=[c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None
                             or c.find("error") is not None])
figures = {"gpu": gpu, "tests": tests, "installed": lines(f"{work}/installed.txt"),
           "install_failed": lines(f"{work}/install_failed.txt"), **read(f"{work}/test_figures.json", {})}
try:
    import torch
    figures.update(torch=torch.__version__, device=torch.cuda.get_device_name(0) if gpu else "CPU")
except ImportError:
    figures.update(torch=None)
bench = {}
for path in sorted(glob.glob(f"{work}/bench_*.json")):
    b = read(path)
    ref = b.get("reference", {})
    bench[os.path.basename(path)[6:-5]] = b if "error" in b else {
        k: v for k, v in {**b, "reference_tokens_per_s": ref.get("tokens_per_s"), "reference_mfu": ref.get("mfu")}.items()
        if k not in ("reference", "torch", "device", "profile")}
if gpu:
    figures["bench"] = bench
    t4 = next((bench[k] for k in ["fp16_compiled", "fp16_eager"] if bench.get(k, {}).get("fits_t4") is not None), {})
    figures["t4_micro_batch_fits_16gb"] = t4.get("fits_t4")  # a T4 runs fp16, compiled by default
    figures["t4_memory"] = t4.get("t4_memory")
else:
    figures["note"] = "no CUDA GPU here: the GPU tests skipped and nothing was benchmarked"
figures["newton_schulz"] = [json.loads(l) for l in lines(f"{work}/ns_precision.jsonl") if l.startswith("{")]
figures["t4_context_1024"] = {os.path.basename(p)[9:-5]: {k: read(p, {}).get(k) for k in ("tokens_per_s", "fits_t4",
                              "peak_reserved_gib", "t4_memory")} for p in sorted(glob.glob(f"{work}/ctx1024_b*.json"))
                              if os.path.getsize(p)}
fit = read(f"{work}/fit_run/pretrain/metrics.json", {})
figures["t4_first_steps"] = {k: fit.get(k) for k in ("compiled", "compile_error", "micro_batch", "grad_accum_steps",
                             "precision", "tokens_per_s")} if fit else {"error": (lines(f"{work}/fit.log") or ["not run"])[-1]}
if fit:  # a micro-batch smaller than the batch_size asked for: the fit was needed
    asked = read(f"{work}/fit_run/pretrain/manifest.json", {}).get("params", {}).get("batch_size")
    figures["t4_first_steps"].update(batch_size=asked, fit_needed=fit.get("micro_batch") != asked)
figures["seconds"] = secs
json.dump(figures, open(out, "w"), indent=1)
print(json.dumps(figures, indent=1))' "$WORK" "$FIGURES" "$GPU" "$tests_rc" "$SECONDS"
say "figures: $FIGURES"
exit "$tests_rc"
