"""Peer libraries run side by side with our models on the same split (``oneranker bench quality``).

atomic.py writes our next-item split as RecBole atomic files; recbole_sasrec.py is a standalone
script for the peer environment (.venv-recbole, ``make peer-venv``); bench.py runs both sides.
"""
