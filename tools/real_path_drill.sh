#!/usr/bin/env bash
# The path users take, by hand: budget-limited sessions, kill -9 then resume auto, 2 processes.
set -u
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TQDM_DISABLE=1 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
PY=.venv/bin/python
TOK=${1:?usage: tools/real_path_drill.sh TOKENIZER_DIR [WORK_DIR]}
D=${2:-/tmp/pocketgpt-drill}; mkdir -p $D; rm -rf $D/a $D/b $D/c $D/full
common="-p tokenizer_dir $TOK -p precision fp32 -p max_steps 600 -p log_interval 50 -p eval_interval 200"
m() { $PY -c "import json,sys; m=json.load(open(sys.argv[1])); print({k:m.get(k) for k in ['steps','session_steps','stop_reason','finished','final_val_loss','tokens_per_s','processes','session_hours']})" $1; }
echo "== A: three 20-second sessions (max_hours 0.0056), one plan of 600 steps"
for s in 1 2 3; do
  extra=""; [ $s -gt 1 ] && extra="-p resume_from auto"
  t=$(date +%s.%N); $PY pocketgpt_utils.py stage pretrain --profile demo $common -p run_dir $D/a -p max_hours 0.0056 $extra > $D/a$s.log 2>&1; echo "rc=$? wall=$(echo "$(date +%s.%N) - $t" | bc)"
  m $D/a/pretrain/metrics.json
done
echo "== B: kill -9 at ~25 s (checkpoint every 6 s), then resume_from=auto; against an uninterrupted run"
$PY pocketgpt_utils.py stage pretrain --profile demo $common -p run_dir $D/b -p max_hours 1 -p checkpoint_minutes 0.1 > $D/b1.log 2>&1 &
pid=$!; sleep 25; kill -9 $pid; wait $pid 2>/dev/null; echo "killed; left: $(ls $D/b)"; ls -la $D/b/pretrain.partial/ckpt.pt 2>/dev/null
$PY -c "from pocketgpt.checkpoint import load_checkpoint; print('checkpoint step', load_checkpoint('$D/b/pretrain.partial')['state']['step'])"
t=$(date +%s.%N); $PY pocketgpt_utils.py stage pretrain --profile demo $common -p run_dir $D/b -p max_hours 1 -p checkpoint_minutes 0.1 -p resume_from auto > $D/b2.log 2>&1; echo "rc=$? wall=$(echo "$(date +%s.%N) - $t" | bc)"; grep -m1 resum $D/b2.log
m $D/b/pretrain/metrics.json
t=$(date +%s.%N); $PY pocketgpt_utils.py stage pretrain --profile demo $common -p run_dir $D/full -p max_hours 1 > $D/full.log 2>&1; echo "uninterrupted rc=$? wall=$(echo "$(date +%s.%N) - $t" | bc)"
m $D/full/pretrain/metrics.json
echo "== C: 2 processes (torchrun, gloo): a 20-second session, then resumed on 2, then on 1"
TR="$PY -m torch.distributed.run --standalone --nproc_per_node 2"
$TR pocketgpt_utils.py stage pretrain --profile demo $common -p run_dir $D/c -p max_hours 0.0056 > $D/c1.log 2>&1; echo "rc=$?"; m $D/c/pretrain/metrics.json
$TR pocketgpt_utils.py stage pretrain --profile demo $common -p run_dir $D/c -p max_hours 0.0056 -p resume_from auto > $D/c2.log 2>&1; echo "rc=$?"; m $D/c/pretrain/metrics.json
$PY pocketgpt_utils.py stage pretrain --profile demo $common -p run_dir $D/c -p max_hours 1 -p resume_from auto > $D/c3.log 2>&1; echo "rc=$?"; grep -m2 "resum\|process" $D/c3.log; m $D/c/pretrain/metrics.json
$PY -c "
from pocketgpt.train import read_log
rows=read_log('$D/c/pretrain/log.csv'); s=[int(r['step']) for r in rows]
print('log rows', len(rows), 'steps unique and sorted', s==sorted(set(s)), 'header lines', open('$D/c/pretrain/log.csv').read().count('step,tokens'))"
