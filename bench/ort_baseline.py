#!/usr/bin/env python3
"""ONNX Runtime FP32 baseline (dev-only) on the same ONNX graph the Rust engines run.

    lbw export-onnx --model yolo-fastest-voc -o /tmp/yf.onnx
    python3 bench/ort_baseline.py /tmp/yf.onnx --threads 1 2 [--int8] [--iters 200]

Prints one line per configuration: p50/p90/p99 latency in ms at batch 1 with intra-op threads
fixed (inter-op 1, sequential execution, all graph optimisations). With --int8, also a static QDQ
int8 model (per-channel weights, activations calibrated on random inputs in [0, 1]; a speed
reference only, its accuracy is not measured here).
"""
import argparse
import os
import tempfile
import time

import numpy as np
import onnxruntime as ort


def bench(path, threads, iters, warmup):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(warmup):
        sess.run(None, {inp.name: x})
    ms = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, {inp.name: x})
        ms.append((time.perf_counter() - t) * 1e3)
    ms = np.array(ms)
    return np.percentile(ms, 50), np.percentile(ms, 90), np.percentile(ms, 99)


def quantize_int8(path):
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                          quantize_static)

    import onnx
    from onnx import version_converter

    # Per-channel QDQ needs DequantizeLinear's axis attribute (opset 13).
    tmp = tempfile.mkdtemp()
    m = onnx.load(path)
    if m.opset_import[0].version < 13:
        m = version_converter.convert_version(m, 13)
    src = os.path.join(tmp, "fp32-opset13.onnx")
    onnx.save(m, src)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self.data = iter([{inp.name: rng.random(shape, dtype=np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.data, None)

    out = os.path.join(tmp, "int8.onnx")
    quantize_static(src, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--int8", action="store_true")
    a = ap.parse_args()
    models = [("fp32", a.onnx)]
    if a.int8:
        try:
            models.append(("int8-qdq", quantize_int8(a.onnx)))
        except Exception as e:  # a speed reference only: report and go on with FP32
            print(f"int8-qdq skipped: {e}")
    print(f"onnxruntime {ort.__version__}")
    for name, path in models:
        for t in a.threads:
            p50, p90, p99 = bench(path, t, a.iters, a.warmup)
            print(f"{name:9s} threads {t}: p50 {p50:.2f} ms  p90 {p90:.2f}  p99 {p99:.2f}")


if __name__ == "__main__":
    main()
