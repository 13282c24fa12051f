#!/bin/bash
# Third device call: our SASRec at 40/5 on 3 seeds + the disjoint-window variant on seed 0 (their JSONs from
# run.sh did not come back: the device returns at most 8 files, so everything is tarred into one here).
export ONERANKER_CACHE=$PWD/.devcarry PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
R=$OUT/r; mkdir -p $R
E="--protocol next-item --dataset movielens-100k --device cuda --threads 1 --epochs 40 --patience 5"
for s in 0 1 2; do
  ( timeout ${LIMIT:-170} python3 -m trainer.evaluate $E --models popularity,sasrec --seed $s --out $R/sasrec-s$s.json > $R/sasrec-s$s.log 2>&1; echo "rc=$?" >> $R/sasrec-s$s.log ) &
done
( timeout ${LIMIT:-170} python3 -m trainer.evaluate $E --models sasrec --seed 0 --set window_stride=0 --set batch_size=16 --out $R/sasrec-win-s0.json > $R/sasrec-win-s0.log 2>&1; echo "rc=$?" >> $R/sasrec-win-s0.log ) &
wait
grep -H "^sasrec: \|rc=" $R/*.log
cd $OUT && tar czf all.tgz r && rm -rf r
