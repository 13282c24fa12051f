"""An int8 corpus table for the serving graph: the whole-corpus scan reads a quarter of the bytes.

The scan ``[task | s_target] · corpus_t`` ([d+k, N], fp32) is the one memory-bound step of a request:
at the paper's size and 100k ads it reads 64 MB, 5 of a 17 ms request on one core (and 50 ms at 1M
ads). Here its MatMul becomes onnxruntime's ``MatMulNBits`` (com.microsoft) with the table
quantised to 8 bits, symmetric, one scale per block of 32 along d+k, and ``accuracy_level`` 4 (the
query is quantised to int8 too and the dot products run on the CPU's int8 units): 2.96 vs 5.6 ms
for the scan alone at 100k ads on this machine.

Only the shortlist reads the int8 scores: a graph exported with ``ServingGraph(shortlist=m)``
rescores each head's top m exactly from the fp32 item table, so the retrieved set and every score
Step 3 sees are exact unless a true top-N item falls outside the quantised top m. The exporter's
parity check compares the result with exact torch scoring either way.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

CORPUS_INPUT = "corpus_t"  # the ServingGraph buffers' initializer names
BIAS_INPUT = "corpus_bias"
BIAS_SLOT = 5  # MatMulNBits inputs: A, B, scales, zero_points, g_idx, bias
BLOCK = 32
ACCURACY_LEVEL = 4  # int8 activations: the VNNI / AVX2 integer kernels


def corpus_matmul(proto) -> str:
    """The name of the MatMul node that reads the corpus table (exactly one)."""
    names = [n.name for n in proto.graph.node if n.op_type == "MatMul" and CORPUS_INPUT in n.input]
    if len(names) != 1:
        raise ValueError(f"expected one MatMul reading {CORPUS_INPUT!r}, found {names}")
    return names[0]


def quantize_corpus(path: Path, bits: int = 8) -> dict:
    """Rewrite ``path`` (an exported serving graph) with its corpus scan as ``MatMulNBits``.
    Returns what changed: the node, bytes of the table before and after, seconds."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line a node
    t0 = time.perf_counter()
    proto = onnx.load(str(path))
    node = corpus_matmul(proto)
    before = sum(len(i.raw_data) for i in proto.graph.initializer if i.name == CORPUS_INPUT)
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=BLOCK, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL, nodes_to_include=[node])
    quantizer.process()
    out = quantizer.model.model
    scans = [n for n in out.graph.node if any(i.startswith(CORPUS_INPUT) for i in n.input)]
    if [n.op_type for n in scans] != ["MatMulNBits"]:
        raise ValueError(f"the corpus scan was not quantised (nodes reading it: {[n.op_type for n in scans]})")
    fused = fuse_bias(out.graph, scans[0])
    after = sum(len(i.raw_data) for i in out.graph.initializer if i.name.startswith(CORPUS_INPUT))
    onnx.save_model(out, str(path))
    info = {"node": node, "bits": bits, "block": BLOCK, "accuracy_level": ACCURACY_LEVEL, "bias_fused": fused,
            "table_bytes": before, "quantized_bytes": after, "s": round(time.perf_counter() - t0, 2)}
    log.info("corpus scan quantised: %s", info)
    return info


def fuse_bias(graph, scan) -> bool:
    """Move ``scan + corpus_bias`` (an Add: one more pass over the whole [B, T, N] score tensor)
    into the MatMulNBits node's own bias input, added as each output block is written."""
    adds = [n for n in graph.node if n.op_type == "Add" and scan.output[0] in n.input and BIAS_INPUT in n.input]
    if len(adds) != 1 or sum(scan.output[0] in n.input for n in graph.node) != 1:
        return False
    add = adds[0]
    inputs = list(scan.input) + [""] * (BIAS_SLOT - len(scan.input))
    del scan.input[:]
    scan.input.extend(inputs[:BIAS_SLOT] + [BIAS_INPUT])
    scan.output[0] = add.output[0]
    graph.node.remove(add)
    return True
