"""The NCHW copies of a ResNet-50's four stage outputs (what a fused feature extractor returns), by the CPU
extension, against a plain `clone` of the same bytes (the floor: no transposition) and ATen's
`.contiguous()`.

    python benchmarks/layout_copy.py [--batch 2] [--threads 2] [--rounds 200]

Round-robin in one process, two ways: "warm", the destination memory just freed by the previous copy
(in the caches), and "cold", every destination kept until the next round and the caches flushed first,
as in a forward pass, where the maps are new memory. The sources are written just before each copy, as
the producing layer does. Prints medians with p20-p80 and each copy's ratio to `clone`, round by round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fused_resnet import cpu_isa
from fused_resnet import cpu_extension

STAGES = ((256, 56), (512, 28), (1024, 14), (2048, 7))  # channels, height = width


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    ops = cpu_extension.ops()
    if ops is None:
        raise SystemExit("the CPU extension is not built (FUSED_RESNET_SKIP_CPU_BUILD=1?): nothing to measure")
    torch.set_num_threads(args.threads)
    maps = [torch.randn(args.batch, c, s, s).contiguous(memory_format=torch.channels_last) for c, s in STAGES]
    for m in maps:
        if not torch.equal(ops.channels_last_to_contiguous(m), m.contiguous()):
            raise SystemExit("the extension's copy differs from ATen's")
    copies = {
        "extension": ops.channels_last_to_contiguous,
        "clone (no transposition)": torch.clone,
        "ATen .contiguous()": torch.Tensor.contiguous,
    }
    flush = torch.empty(96 << 18)  # 96 MiB, more than the caches hold
    print(
        f"NCHW copies of resnet50's stage outputs, fp32, batch {args.batch} ({sum(m.nbytes for m in maps) / 2**20:.1f} MiB), "
        f"{args.threads} threads, {cpu_isa.describe()}, {args.rounds} rounds"
    )
    for cold in (False, True):
        samples: dict[str, list[float]] = {name: [] for name in copies}
        kept: list[torch.Tensor] = []
        for _ in range(args.rounds):
            for name, copy in copies.items():
                if cold:
                    kept.clear()
                    flush.fill_(1.0)
                for m in maps:
                    m.relu_()  # the producer just wrote it
                start = time.perf_counter()
                outputs = [copy(m) for m in maps]
                samples[name].append((time.perf_counter() - start) * 1e3)
                if cold:
                    kept.extend(outputs)
                del outputs
        print("cold destination, caches flushed:" if cold else "warm destination:")
        floor = samples["clone (no transposition)"]
        for name, times in samples.items():
            q = statistics.quantiles(times, n=5)
            ratio = statistics.median(t / f for t, f in zip(times, floor))
            print(f"  {name:26s} {statistics.median(times):7.3f} ms  (p20-p80 {q[0]:.3f}-{q[3]:.3f})  {ratio:5.2f}x clone")


if __name__ == "__main__":
    main()
