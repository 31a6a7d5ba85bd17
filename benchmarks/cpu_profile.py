"""Where the CPU time of a fused forward goes: oneDNN's convolutions against everything around them,
and each convolution against the best rate oneDNN reaches on this machine. ONNX Runtime beside it.

    python benchmarks/cpu_profile.py                          # resnet18 and resnet50, batch 1 and 8, float32
    python benchmarks/cpu_profile.py --archs resnet50 --batches 8 --dtype bfloat16
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/cpu_profile.py  # oneDNN as on an AVX2-only CPU

For each case, the wall time of `fr.fuse(model)` (median of back-to-back calls) is split into:
- oneDNN's convolution primitives, by oneDNN's own execution times (its verbose mode, on for a few
  forwards), and its other primitives;
- PyTorch's work around each convolution primitive (the convolution operators' time, as
  torch.profiler sees it, less the primitives'), and the other ATen operators by name (the ReLU
  passes, pooling, the classifier, layout copies);
- the rest: Python between the operators and the threads' hand-offs (the wall less all the above;
  the profiler adds a few microseconds to each operator, so this share reads low).
ONNX Runtime's wall (timed after ours, never interleaved with it) is split the same way from its own
node profile: Conv nodes (with the sums and activations it fuses into them), other nodes, and the
rest. The ratios between engines are benchmarks/end_to_end.py's to measure; this says why they are
what they are.

Per distinct convolution: calls per forward, time per call, oneDNN's implementation, GFLOP/s and
its share of the ceiling, ONNX Runtime's time for the same convolution. The ceiling is the best rate
oneDNN reaches here, measured in the same run on large compute-bound convolutions of the same dtype:
near it, a convolution cannot get faster without doing fewer operations.
Writes benchmarks/results/cpu_profile-<time>.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_io import environment, markdown_table, write  # noqa: E402

from fused_resnet import cpu_isa, inference_engines, peers  # noqa: E402
from fused_resnet.architectures import build  # noqa: E402
from fused_resnet.timing import quantiles, time_ms  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OURS, ORT = "ours auto", "ONNX Runtime"
SPLIT_COLUMNS = ["arch", "dtype", "batch", "engine", "part", "ms", "share"]
CONV_COLUMNS = ["arch", "dtype", "batch", "convolution", "calls", "ms_per_call", "implementation", "gflops", "of_ceiling", "ort_ms_per_call"]
CONV_OPERATORS = ("mkldnn::_convolution_pointwise", "mkldnn::_convolution_pointwise_")
# oneDNN's problem string of a convolution: mb1_g32ic128oc128_ih56oh56kh3sh1dh0ph1_iw56ow56kw3sw1dw0pw1
PROBLEM = re.compile(r"mb(?P<mb>\d+)_(?:g(?P<g>\d+))?ic(?P<ic>\d+)oc(?P<oc>\d+)_ih(?P<ih>\d+)oh(?P<oh>\d+)kh(?P<kh>\d+)"
                     r".*?_iw(?P<iw>\d+)ow(?P<ow>\d+)kw(?P<kw>\d+)")
# Large compute-bound convolutions (batch, channels in, channels out, size, kernel) for the ceiling.
CEILING_SHAPES = [(4, 256, 256, 28, 3), (8, 1024, 1024, 14, 1)]


def conv_shape(problem: str) -> dict | None:
    match = PROBLEM.search(problem)
    return None if match is None else {k: int(v) if v else 1 for k, v in match.groupdict().items()}


def conv_flops(shape: dict) -> float:
    return 2.0 * shape["mb"] * shape["oc"] * shape["oh"] * shape["ow"] * shape["ic"] / shape["g"] * shape["kh"] * shape["kw"]


def conv_key(shape: dict) -> tuple:
    """What identifies a convolution across engines: batch, channels, input and output size, kernel."""
    return shape["mb"], shape["ic"], shape["oc"], shape["ih"], shape["oh"], shape["kh"]


@contextlib.contextmanager
def _stdout_captured(log):
    """Points the process's file descriptor 1 (where oneDNN's C code prints) at `log` meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(log.fileno(), 1)
    try:
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # C's buffered stdout goes to `log`, not to the terminal after it
        os.dup2(saved, 1)
        os.close(saved)


def _ms_per_call(run, calls: int) -> float:
    return statistics.mean(time_ms(run, torch.device("cpu"), iters=calls, warmup=0))


def onednn_executions(run, calls: int) -> tuple[list[tuple[str, str, str, float]], float]:
    """(primitive kind, implementation, problem, milliseconds) of every oneDNN primitive that `calls`
    calls of `run` execute, as oneDNN's verbose mode reports them; and the milliseconds per call
    meanwhile (the verbose lines add a few microseconds per primitive)."""
    with tempfile.TemporaryFile("w+") as log:
        with _stdout_captured(log), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            wall = _ms_per_call(run, calls)
        log.seek(0)
        lines = log.read().splitlines()
    executions = []
    for line in lines:
        fields = line.split(",")
        if len(fields) > 7 and fields[0] == "onednn_verbose" and fields[2:4] == ["primitive", "exec"]:
            executions.append((fields[5], fields[6], fields[-2], float(fields[-1])))
    return executions, wall


def aten_self_ms(run, calls: int) -> tuple[dict[str, float], float]:
    """Milliseconds per call of each ATen operator's own time (torch.profiler's self CPU time), and
    the milliseconds per call meanwhile (the profiler adds a few microseconds per operator)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        wall = _ms_per_call(run, calls)
    own = {event.key: event.self_cpu_time_total / 1e3 / calls for event in profile.key_averages() if event.self_cpu_time_total > 0}
    return own, wall


def onnxruntime_nodes(session, feed: dict, calls: int) -> tuple[list[dict], float]:
    """ONNX Runtime's node executions in `calls` runs of a profiling session (op type, shapes and
    milliseconds each), and the milliseconds per run, from the same profile. Two runs before them
    warm the session up."""
    for _ in range(calls + 2):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-calls:]
    nodes = [
        {"op": e["args"]["op_name"], "ms": e["dur"] / 1e3, "inputs": e["args"].get("input_type_shape", []),
         "outputs": e["args"].get("output_type_shape", [])}
        for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[0]["ts"]
    ]
    return nodes, sum(e["dur"] for e in runs) / 1e3 / len(runs)


def _ort_conv_key(node: dict) -> tuple | None:
    try:
        (n, c, h, _), (oc, _, kh, _) = (next(iter(t.values())) for t in node["inputs"][:2])
        oh = next(iter(node["outputs"][0].values()))[2]
    except (ValueError, IndexError, StopIteration):
        return None
    return n, c, oc, h, oh, kh


@torch.no_grad()
def ceiling_gflops(dtype: torch.dtype) -> float:
    """The best GFLOP/s oneDNN reaches here on large convolutions, prepacked, channels_last, as the
    oneDNN backend calls them."""
    best = 0.0
    for batch, cin, cout, size, kernel in CEILING_SHAPES:
        x = torch.randn(batch, cin, size, size).to(dtype).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(cout, cin, kernel, kernel).to(dtype)
        pad = [kernel // 2] * 2
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight, pad, [1, 1], [1, 1], 1, list(x.shape))

        def conv():
            torch.ops.mkldnn._convolution_pointwise(x, packed, None, pad, [1, 1], [1, 1], 1, "none", [None], "")

        ms = statistics.median(time_ms(conv, torch.device("cpu"), iters=20, warmup=3))
        flops = 2.0 * batch * cout * size * size * cin * kernel * kernel
        best = max(best, flops / ms / 1e6)
    return best


def _share(part: float, whole: float) -> float:
    return part / whole if whole else float("nan")


@torch.no_grad()
def profile_case(arch: str, dtype_name: str, batch: int, args, ceiling: float | None) -> tuple[list[dict], list[dict]]:
    dtype = DTYPES[dtype_name]
    model = build(arch, torch.Generator().manual_seed(0))
    x = torch.randn(batch, 3, args.image_size, args.image_size)
    ours = peers.build(OURS, model, dtype)
    xq = x.to(dtype)

    def run_ours():
        ours(xq)

    case = dict(arch=arch, dtype=dtype_name, batch=batch)
    wall = quantiles(time_ms(run_ours, torch.device("cpu"), iters=args.reps, warmup=3))[1]  # fr.fuse's first call, then warm-up
    # Each instrumented pass gives shares of its own calls' time; the clean wall scales them to ms.
    executions, verbose_wall = onednn_executions(run_ours, args.calls)
    aten, profiled_wall = aten_self_ms(run_ours, args.calls)
    conv_share = sum(ms for kind, _, _, ms in executions if kind == "convolution") / args.calls / verbose_wall
    other_primitives_share = sum(ms for kind, _, _, ms in executions if kind != "convolution") / args.calls / verbose_wall
    operators_share = sum(aten.pop(name, 0.0) for name in CONV_OPERATORS) / profiled_wall
    shares = [("oneDNN convolution primitives", conv_share), ("oneDNN other primitives", other_primitives_share),
              ("PyTorch around the primitives (convolution operators less their primitives)", operators_share - conv_share - other_primitives_share)]
    named = sorted(aten.items(), key=lambda item: -item[1])
    shares += [(f"ATen {name}", ms / profiled_wall) for name, ms in named[: args.operators]]
    shares.append(("ATen, all other operators", sum(ms for _, ms in named[args.operators:]) / profiled_wall))
    shares.append(("rest: Python between operators, thread hand-offs", 1.0 - sum(share for _, share in shares)))
    parts = [("wall (median)", wall)] + [(part, share * wall) for part, share in shares]
    split = [dict(case, engine=OURS, part=part, ms=ms, share=_share(ms, wall)) for part, ms in parts]

    # ONNX Runtime after ours, never interleaved with it: its pool's threads spin on after each run and
    # would slow whatever runs next on the same cores.
    ort_per_conv = {}
    ort_reason = inference_engines.unavailable_reason("onnxruntime", torch.device("cpu"), dtype)
    if ort_reason is not None:
        print(f"  ONNX Runtime not profiled: {ort_reason}", flush=True)
    else:
        feed = {"x": x.numpy()}
        session = inference_engines.onnxruntime_session(model, x, torch.get_num_threads())
        ort_wall = quantiles(time_ms(lambda: session.run(None, feed), torch.device("cpu"), iters=args.reps, warmup=3))[1]
        del session  # its threads with it; the profiled session below records each node, which costs a little
        with tempfile.TemporaryDirectory() as directory:
            session = inference_engines.onnxruntime_session(model, x, torch.get_num_threads(), profile_prefix=os.path.join(directory, "ort"))
            nodes, run_ms = onnxruntime_nodes(session, feed, args.calls)
        conv_nodes = [node for node in nodes if "Conv" in node["op"]]
        conv_share = sum(node["ms"] for node in conv_nodes) / args.calls / run_ms
        other_share = sum(node["ms"] for node in nodes if "Conv" not in node["op"]) / args.calls / run_ms
        for part, share in (("wall (median)", 1.0), ("Conv nodes (their fused sums and activations included)", conv_share),
                            ("other nodes", other_share), ("rest: session, thread hand-offs", 1.0 - conv_share - other_share)):
            split.append(dict(case, engine=ORT, part=part, ms=share * ort_wall, share=share))
        times = collections.defaultdict(list)
        for node in conv_nodes:
            times[_ort_conv_key(node)].append(node["ms"])
        ort_per_conv = {key: statistics.mean(ms) for key, ms in times.items() if key is not None}

    by_problem = collections.defaultdict(list)
    for kind, implementation, problem, ms in executions:
        if kind == "convolution":
            by_problem[(problem, implementation)].append(ms)
    convs = []
    for (problem, implementation), times in by_problem.items():
        shape = conv_shape(problem)
        per_call = statistics.median(times)
        gflops = conv_flops(shape) / per_call / 1e6 if shape else None
        convs.append(dict(
            case, convolution=problem, calls=len(times) / args.calls, ms_per_call=per_call, implementation=implementation,
            gflops=gflops, of_ceiling=None if gflops is None or ceiling is None else gflops / ceiling,
            ort_ms_per_call=ort_per_conv.get(conv_key(shape)) if shape else None,
        ))
    return split, convs


def summary(split: list[dict], convs: list[dict], ceiling: float | None) -> str:
    lines = ["No ceiling: oneDNN does not compute this dtype here." if ceiling is None else
             f"Ceiling: {ceiling:.0f} GFLOP/s, the best rate of oneDNN's convolutions here (large shapes, same dtype).", ""]
    for case in dict.fromkeys((r["arch"], r["dtype"], r["batch"]) for r in split):
        rows = [r for r in split if (r["arch"], r["dtype"], r["batch"]) == case]
        ours = {r["part"]: r["ms"] for r in rows if r["engine"] == OURS}
        ort = {r["part"]: r["ms"] for r in rows if r["engine"] == ORT}
        mine = [r for r in convs if (r["arch"], r["dtype"], r["batch"]) == case]
        weighted = sum(r["gflops"] * r["ms_per_call"] * r["calls"] for r in mine if r["gflops"])
        spent = sum(r["ms_per_call"] * r["calls"] for r in mine if r["gflops"])
        line = (f"- {case[0]} {case[1]} batch {case[2]}: ours {ours['wall (median)']:.2f} ms, of which oneDNN's convolutions "
                f"{ours['oneDNN convolution primitives']:.2f} ms")
        if spent and ceiling:  # no convolution primitives where oneDNN does not compute this dtype here
            line += f" at {weighted / spent / ceiling:.0%} of the ceiling on average"
        if ort:
            line += (f"; ONNX Runtime {ort['wall (median)']:.2f} ms, of which its Conv nodes "
                     f"{ort['Conv nodes (their fused sums and activations included)']:.2f} ms")
        lines.append(line)
    lines += ["", "Per convolution (ms per call; GFLOP/s; share of the ceiling; ONNX Runtime's ms for the same convolution):", "",
              markdown_table(convs, CONV_COLUMNS)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--reps", type=int, default=15, help="timed calls for each wall time")
    parser.add_argument("--calls", type=int, default=5, help="forwards under oneDNN's verbose mode, and under torch.profiler")
    parser.add_argument("--operators", type=int, default=5, help="ATen operators named in the split; the others are summed")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true", help="print only; write no results files")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    if dtype != torch.float32 and cpu_isa.onednn_computes(dtype) is False:
        print(f"{args.dtype}: {cpu_isa.missing_reason(dtype)}; profiling the fallback", flush=True)
    print(f"profiling on the CPU with {torch.get_num_threads()} threads; oneDNN runs at {cpu_isa.describe()}", flush=True)
    env = environment(torch.device("cpu"))
    # Where oneDNN does not compute this dtype here there are no convolution primitives to measure.
    ceiling = None if cpu_isa.onednn_computes(dtype) is False else ceiling_gflops(dtype)
    split, convs = [], []
    for arch in args.archs:
        for batch in args.batches:
            print(f"{arch} {args.dtype} batch {batch}", flush=True)
            case_split, case_convs = profile_case(arch, args.dtype, batch, args, ceiling)
            for row in case_split:
                print(f"  {row['engine']:13s} {row['ms']:9.3f} ms {row['share']:7.1%}  {row['part']}", flush=True)
            split += case_split
            convs += case_convs
    text = summary(split, convs, ceiling)
    print(text)
    if not args.no_write:
        write("cpu_profile", split, SPLIT_COLUMNS, env, text)  # the per-convolution table is in the text
    return 0


if __name__ == "__main__":
    sys.exit(main())
