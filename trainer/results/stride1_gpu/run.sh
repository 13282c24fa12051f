#!/bin/bash
# One device call (one H200, 16 cores): the one-prefix-per-target defaults (window_stride 1, 512 per
# step, RecBole's SASRec encoder) on ML-100K, every (config, seed) its own 1-thread process.
# Ran from the repo root with OUT set and ONERANKER_CACHE holding the dataset wheels; anywhere else:
# OUT=/some/dir bash trainer/results/stride1_gpu/run.sh (drop --device cuda for CPU: hours).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devcarry/whl/*.whl || exit 1
export ONERANKER_CACHE=$PWD/.devcarry PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export ONERANKER_PEER_PYTHON=$(which python3) ONERANKER_PEER_PYTHONPATH=/tmp/site
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
E="--protocol next-item --dataset movielens-100k --device cuda --threads 1 --epochs 40 --patience 5"
run() { name=$1; seed=$2; shift 2
  ( timeout ${LIMIT:-510} python3 -m trainer.evaluate $E --seed $seed --out $R/$name-s$seed.json "$@" > $R/$name-s$seed.log 2>&1; echo "rc=$?" >> $R/$name-s$seed.log ) & }
for s in 0 1 2; do
  run sasrec $s --models popularity,sasrec
  run gen $s --models oneranker-gen-only
  run gen-win-do3-tp50 $s --models oneranker-gen-only --set window_stride=0 --set batch_size=16 --set dropout=0.3 --set train_positions=50
done
run sasrec-win 0 --models sasrec --set window_stride=0 --set batch_size=16
# The peer at the 8-epoch budget of trainer/results/quality_movielens-100k_e8.json (RecBole 3 seeds at once, then ours)
( timeout ${LIMIT:-510} python3 -c "
from trainer.peer.bench import bench_quality
bench_quality('movielens-100k', [0, 1, 2], 'recbole-sasrec,popularity,sasrec', '$R/quality_movielens-100k_e8.json',
              epochs=8, patience=3, threads=1, jobs=3, device='cuda')
" > $R/quality_e8.log 2>&1; echo "rc=$?" >> $R/quality_e8.log ) &
wait
cd .oneranker/peer/movielens-100k 2>/dev/null && tar czf $R/recbole_logs.tgz recbole-*/seed*.log recbole-*/seed*.json 2>/dev/null
cd $OUT && grep -h "^sasrec: \|^oneranker-gen-only: \|rc=" r/*.log; grep -A8 "^model " r/quality_e8.log
