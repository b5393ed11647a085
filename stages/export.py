"""Export stage: the final checkpoint as an ONNX model, checked with onnxruntime.

Reads:  MODEL (models/model.pt), DATA_DIR/test.pt and DATA_DIR/stats.json.
Writes: ONNX (models/model.onnx): input `digits` (batch, 1, 28, 28) float32, normalised
        with the mean and std it stores in its metadata; output `log_probs` (batch, 10).
        METRICS: the parity check on every test digit: the digits checked, the arg-max
        mismatches, the tolerance and whether the largest |difference| in
        log-probabilities is within it (the difference itself is printed).
Params: runtime.* (applied first; see stages/runtime.py).

The export is written only if onnxruntime's arg-max equals torch's on every test digit
and no log-probability differs by more than TOLERANCE. Its bytes depend only on the
checkpoint: the exporter's per-node metadata (source paths, stack traces) is dropped.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from stages.common import StageError, load_torch, run_cli, write_bytes, write_json
from stages.data import load_split, load_stats, to_device
from stages.model import from_checkpoint, predict
from stages.params import load_params
from stages.runtime import apply as apply_runtime

TOLERANCE = 1e-4  # largest |difference| in log-probabilities allowed
BATCH_SIZE = 1000
INPUT, OUTPUT = "digits", "log_probs"


def to_onnx(model: torch.nn.Module, mean: float, std: float) -> bytes:
    """MODEL as ONNX bytes with a dynamic batch dimension, and MEAN and STD in its
    metadata. Only the graph, the weights and fixed names are kept."""
    example = torch.zeros(2, 1, 28, 28)
    program = torch.onnx.export(
        model.eval(), (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
    proto = program.model_proto
    graph = proto.graph
    for item in (*graph.node, *graph.input, *graph.output, *graph.value_info,
                 *graph.initializer):
        del item.metadata_props[:]  # stack traces name this checkout's absolute paths
    del proto.metadata_props[:]
    proto.producer_version = torch.__version__.split("+")[0]  # not the build (+cpu, +cu130)
    for key, value in (("normalisation_mean", mean), ("normalisation_std", std)):
        proto.metadata_props.add(key=key, value=repr(value))
    onnx.checker.check_model(proto)
    return proto.SerializeToString(deterministic=True)


def onnx_log_probs(onnx_bytes: bytes, x: torch.Tensor) -> np.ndarray:
    """onnxruntime's output for X (N, 1, 28, 28) on the CPU, in batches."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # runtime.threads
    # the last level adds layout changes whose block size is the CPU's vector width
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run([OUTPUT], {INPUT: xb.numpy()})[0]
                           for xb in x.split(BATCH_SIZE)])


def parity(onnx_bytes: bytes, model: torch.nn.Module, x: torch.Tensor) -> dict:
    """Compare onnxruntime with torch on X: digits, arg-max mismatches, max |Δ|."""
    expected = predict(model, x, BATCH_SIZE).numpy()
    got = onnx_log_probs(onnx_bytes, x)
    return {"digits": len(x),
            "argmax_mismatches": int((got.argmax(1) != expected.argmax(1)).sum()),
            "max_abs_diff": float(np.abs(got - expected).max())}


def export(model: torch.nn.Module, images: torch.Tensor, mean: float, std: float,
           onnx_path: Path, tolerance: float = TOLERANCE) -> dict:
    """Export MODEL to ONNX_PATH if it matches torch on uint8 IMAGES (N, 28, 28)
    normalised with MEAN and STD; return the parity figures, or raise StageError and
    leave no ONNX_PATH."""
    onnx_bytes = to_onnx(model, mean, std)
    x = to_device(images, None, mean, std, torch.device("cpu")).x
    figures = parity(onnx_bytes, model, x)
    if figures["argmax_mismatches"] or not figures["max_abs_diff"] <= tolerance:
        Path(onnx_path).unlink(missing_ok=True)  # an older export would not match MODEL
        raise StageError(f"ONNX export does not match torch on {figures['digits']} test "
                         f"digits: {figures['argmax_mismatches']} arg-max mismatches, max "
                         f"|Δ log-prob| {figures['max_abs_diff']:.3g} (allowed {tolerance:g}); "
                         f"{onnx_path} not written")
    write_bytes(onnx_path, onnx_bytes)
    return figures


def metrics(figures: dict, tolerance: float = TOLERANCE) -> dict:
    """What metrics/export.json records: the same on every x86-64 CPU. onnxruntime picks
    its kernels for the CPU, so the exact largest difference can move in its last bits,
    or step past a rounding boundary, from one CPU to another: it is printed, and the
    file records that it is within the tolerance (the stage fails otherwise)."""
    return {"digits": figures["digits"], "argmax_mismatches": figures["argmax_mismatches"],
            "tolerance": tolerance, "within_tolerance": figures["max_abs_diff"] <= tolerance}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args()
    apply_runtime(load_params().runtime)
    model = from_checkpoint(load_torch(args.model, "checkpoint"), str(args.model))
    images, _ = load_split(args.data / "test.pt")
    mean, std = load_stats(args.data / "stats.json")
    figures = export(model, images, mean, std, args.onnx)
    write_json(args.metrics, metrics(figures))
    print(f"wrote {args.onnx}: onnxruntime matches torch on {figures['digits']} test digits, "
          f"{figures['argmax_mismatches']} arg-max mismatches, max |Δ log-prob| "
          f"{figures['max_abs_diff']!r}")


if __name__ == "__main__":
    run_cli(main)
