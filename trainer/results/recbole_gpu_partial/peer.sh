#!/bin/bash
# RecBole SASRec (the peer) on the GPU, same split/budget as trainer/results/nextitem_movielens-100k_e40_gpu.json
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .devcarry/whl/*.whl || exit 1
export ONERANKER_CACHE=$PWD/.devcarry PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ONERANKER_PEER_PYTHON=$(which python3) ONERANKER_PEER_PYTHONPATH=/tmp/site
timeout ${LIMIT:-270} python3 -c "
from trainer.peer.bench import bench_quality
bench_quality('movielens-100k', [0, 1, 2], 'recbole-sasrec,popularity,sasrec,oneranker-gen-only', '$OUT/quality_movielens-100k.json',
              epochs=40, patience=5, threads=1, jobs=3, ours_from='trainer/results/nextitem_movielens-100k_e40_gpu.json', device='cuda')
" 2>&1 | grep -v "^\[seed .\]   RecBole SASRec epoch"
cd .oneranker/peer/movielens-100k && tar czf $OUT/recbole_logs.tgz recbole-*/seed*.log recbole-*/seed*.json 2>/dev/null; ls $OUT
