"""Times a fused model's forward with the package from two source trees (say, two commits), in turns.

    python tools/ab_time.py /path/to/old/checkout /path/to/new/checkout [--arch resnet50] [--batch 1 8]

Each round runs one short process per tree (alternating which goes first), each of which fuses the same
random model, warms up, and times `--iters` forward calls; medians over rounds, with p20-p80, and the
new/old ratio. Two trees cannot be loaded in one process, so this is the fairest comparison of a change
on a CPU: same machine, interleaved, every process paying the same start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, sys, time, statistics, torch, torchvision
sys.path.insert(0, sys.argv[1])
import fused_resnet as fr
from fused_resnet.parity import randomize_bn_
arch, batch, iters, threads, dtype = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), getattr(torch, sys.argv[6])
torch.set_num_threads(threads)
model = randomize_bn_(getattr(torchvision.models, arch)().eval(), torch.Generator().manual_seed(0))
fused = fr.fuse(model, dtype=dtype)
x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(dtype)
times = []
with torch.no_grad():
    for _ in range(3):
        fused(x)
    for _ in range(iters):
        start = time.perf_counter()
        fused(x)
        times.append((time.perf_counter() - start) * 1e3)
print(json.dumps(times))
"""


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    print(f"{args.arch}, {args.dtype}, 224x224, {args.threads} threads, {args.rounds} rounds x {args.iters} calls; "
          f"load average at the start {os.getloadavg()[0]:.2f}")
    for batch in args.batch:
        samples = {"old": [], "new": []}
        for round_ in range(args.rounds):
            order = ("old", "new") if round_ % 2 == 0 else ("new", "old")
            for which in order:
                tree = getattr(args, which)
                out = subprocess.run(
                    [sys.executable, "-c", CHILD, tree, args.arch, str(batch), str(args.iters), str(args.threads), args.dtype],
                    check=True, capture_output=True, text=True, cwd=tree,
                )
                samples[which].extend(json.loads(out.stdout.strip().splitlines()[-1]))
        old, new = statistics.median(samples["old"]), statistics.median(samples["new"])
        print(
            f"batch {batch}: old {old:.1f} ms (p20-p80 {quantile(samples['old'], .2):.1f}-{quantile(samples['old'], .8):.1f}), "
            f"new {new:.1f} ms (p20-p80 {quantile(samples['new'], .2):.1f}-{quantile(samples['new'], .8):.1f}), "
            f"new/old {new / old:.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
