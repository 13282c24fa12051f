#!/bin/bash
# The peer comparison at the 8-epoch budget (second device call: the first one's bench ran out of time after
# RecBole's 3 seeds, which bench_quality cached and reuses here). Ours: 3 seeds at once, then one table.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devcarry/whl/*.whl 2>/dev/null
export ONERANKER_CACHE=$PWD/.devcarry PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export ONERANKER_PEER_PYTHON=$(which python3) ONERANKER_PEER_PYTHONPATH=/tmp/site
R=$OUT/r; mkdir -p $R
for s in 0 1 2; do
  timeout ${LIMIT:-200} python3 -m trainer.evaluate --protocol next-item --dataset movielens-100k --device cuda --threads 1 \
    --epochs 8 --patience 3 --models popularity,sasrec --seed $s --out $R/sasrec-e8-s$s.json > $R/sasrec-e8-s$s.log 2>&1 &
done
wait
python3 -c "
import json; runs=[json.load(open('$R/sasrec-e8-s%d.json' % s)) for s in (0,1,2)]
json.dump({'protocol': 'next-item', 'runs': runs}, open('$R/nextitem_e8.json', 'w'), indent=2)"
timeout 60 python3 -c "
from trainer.peer.bench import bench_quality
bench_quality('movielens-100k', [0, 1, 2], 'recbole-sasrec,popularity,sasrec', '$R/quality_movielens-100k_e8.json',
              epochs=8, patience=3, threads=1, jobs=3, device='cuda', ours_from='$R/nextitem_e8.json', ours_missing='skip')
" > $R/quality_e8.log 2>&1
tail -12 $R/quality_e8.log
tar czf $R/recbole_logs.tgz -C .oneranker/peer/movielens-100k . --exclude atomic 2>/dev/null
cd $OUT && tar czf all.tgz r && rm -rf r
