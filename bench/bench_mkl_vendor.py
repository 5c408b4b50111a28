"""What answering MKL's vendor checks as an AMD Zen processor costs (:mod:`stages.core.kernels`), side by side
with the kernels MKL picks itself.

* pinned: what every stage run gets, MKL's Zen kernels on any x86-64 CPU with AVX2 and FMA;
* own choice: MKL's vendor checks left alone and ``MKL_CBWR=AVX2``, the pin before (on an Intel CPU its AVX2
  branch; an AMD CPU takes the Zen kernels either way, so there the two are the same).

The work is SPP-net's fc layers in :mod:`stages.spp_finetune`'s shapes (a 5,600-d pooled pyramid, two 1,024-d
layers, a 6-way classifier for 5 classes and background, mini-batches of 128), trained with SGD for
:data:`STEPS` steps: float32 matrix products and little else, the part of a stage that MKL's choice touches.
The settings alternate, :data:`ROUNDS` times each, in fresh processes (MKL chooses at its first product).
Printed: the median seconds under both, the ratio, and whether both trained the same bytes (not on an Intel
CPU, which is what the pin is for).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

from bench.common import REPO, print_table

ROUNDS = 3
STEPS = 300
DRIVER = """
import hashlib, json, sys, time
if sys.argv[1] == "pinned":
    import stages
import torch
torch.manual_seed(0)
head = torch.nn.Sequential(torch.nn.Linear(5600, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                           torch.nn.ReLU(), torch.nn.Linear(1024, 6))
optimizer = torch.optim.SGD(head.parameters(), lr=0.001, momentum=0.9)
inputs, labels = torch.rand(8, 128, 5600), torch.randint(0, 6, (8, 128))
start = time.perf_counter()
for step in range(int(sys.argv[2])):
    loss = torch.nn.functional.cross_entropy(head(inputs[step % 8]), labels[step % 8])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
seconds = time.perf_counter() - start
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in head.parameters())).hexdigest()[:12]
print(json.dumps({"seconds": seconds, "digest": digest}))
"""


def run_once(setting: str) -> dict:
    from stages.core.kernels import PINNED_CPU_KERNELS

    env = {**os.environ, **PINNED_CPU_KERNELS, "PYTHONPATH": str(REPO)}  # the same kernels but MKL's vendor
    done = subprocess.run([sys.executable, "-c", DRIVER, setting, str(STEPS)], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    settings = ("own choice", "pinned")
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    print(f"MKL's vendor: SPP-net's fc layers, {STEPS} SGD steps; {ROUNDS} rounds each, alternating")
    for _ in range(ROUNDS):
        for name in settings:
            runs[name].append(run_once(name))
    median = {name: statistics.median(r["seconds"] for r in rounds) for name, rounds in runs.items()}
    print_table([{"work": f"fc layers, {STEPS} steps", "own choice s": median["own choice"],
                  "pinned s": median["pinned"], "pinned / own choice": median["pinned"] / median["own choice"]}])
    digests = {name: sorted({r["digest"] for r in rounds}) for name, rounds in runs.items()}
    same = digests["own choice"] == digests["pinned"] and len(digests["pinned"]) == 1
    print(f"trained weights: own choice {digests['own choice']}, pinned {digests['pinned']}: "
          f"{'the same bytes' if same else 'different bytes'}")


if __name__ == "__main__":
    main()
