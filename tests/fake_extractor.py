"""A model-free extractor whose pooled features have a closed form, for run-loop tests.

Sample with index i has L = 1 + i % 3 tokens; token t holds i*10 + t + 0.5*d in
dimension d, so its masked mean is i*10 + (L - 1)/2 + 0.5*d. Pad positions hold NaN, so
a pooling bug that lets padding in shows up as NaN. A second layer "1" holds the negation.
"""
from __future__ import annotations

import torch

from harness.extractors.engine.base import HiddenStates


def expected(indices, dim: int = 4) -> torch.Tensor:
    rows = [[i * 10 + (i % 3) / 2 + 0.5 * d for d in range(dim)] for i in indices]
    return torch.tensor(rows, dtype=torch.float32)


class FakeExtractor:
    family = "fake"

    def __init__(self, dim: int = 4, name: str = "fake-model", nan_at=(), fail_at=None,
                 sweep: bool = False):
        self.dim, self.name, self.nan_at, self.fail_at = dim, name, set(nan_at), fail_at
        self.sweep = sweep
        self.seen: list[int] = []
        self.hidden_dim = dim

    def load(self):
        return self

    def build_inputs(self, samples) -> dict:
        indices = [int(s[0]) for s in samples]
        lengths = [1 + i % 3 for i in indices]
        width = max(lengths)
        hidden = torch.full((len(indices), width, self.dim), float("nan"))
        mask = torch.zeros(len(indices), width, dtype=torch.bool)
        for r, (i, n) in enumerate(zip(indices, lengths)):
            t = torch.arange(n, dtype=torch.float32)[:, None]
            d = torch.arange(self.dim, dtype=torch.float32)[None, :]
            hidden[r, width - n:] = i * 10 + t + 0.5 * d  # left padding
            mask[r, width - n:] = True
            if i in self.nan_at:
                hidden[r, -1, 0] = float("nan")
        return {"hidden": hidden, "mask": mask, "indices": indices}

    def forward(self, inputs) -> HiddenStates:
        if self.fail_at is not None and self.fail_at in inputs["indices"]:
            raise KeyboardInterrupt("simulated interruption")
        self.seen += inputs["indices"]
        layers = {"last": inputs["hidden"]}
        if self.sweep:
            layers["1"] = -inputs["hidden"]
        return HiddenStates(layers=layers, mask=inputs["mask"])

    def provenance(self) -> dict:
        return {"family": self.family, "model": self.name, "layers": "sweep" if self.sweep else "last"}


def samples(n: int, offset: int = 0):
    """(index, image, task) tuples; the fake extractor ignores images."""
    return [(offset + i, None, f"task {i}") for i in range(n)]


def distributed_worker(rank: int, world: int, init_file: str, out_dir: str, model: str,
                       n: int, shard_size: int, batch_size: int) -> None:
    """Entry point for torch.multiprocessing.spawn: one gloo rank of an extraction."""
    import os
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch.distributed as dist

    from harness.extractors.engine.features import extract
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if model == "fake":
            extractor, data = FakeExtractor(), samples(n)
        else:
            from harness.extractors.hf_vlm import HfVlmExtractor
            extractor, data = HfVlmExtractor(model).load(), image_samples(n)
        extract(extractor, data, out_dir, batch_size=batch_size, shard_size=shard_size,
                progress=False)
    finally:
        dist.destroy_process_group()


def image_samples(n: int, seed: int = 0):
    """Deterministic (index, PIL image, task) samples of varied task lengths."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    words = ["pick", "up", "the", "red", "block", "open", "drawer", "place", "spoon", "on", "towel"]
    out = []
    for i in range(n):
        pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
        task = " ".join(rng.choice(words, size=1 + i % 7))
        out.append((i, Image.fromarray(pixels), task))
    return out


def _main() -> None:
    """torchrun entry: python -m tests.fake_extractor OUT N SHARD BATCH [--fail_at I]
    [--delay S]: --fail_at makes the rank holding sample I fail there (RuntimeError),
    --delay makes every forward of rank 0 take S seconds (a rank busy when another fails)."""
    import argparse
    import time

    from harness.extractors.engine.features import extract, init_from_env
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("numbers", type=int, nargs=3)
    p.add_argument("--fail_at", type=int, default=None)
    p.add_argument("--delay", type=float, default=0.0)
    args = p.parse_args()
    n, shard, batch = args.numbers
    rank, world = init_from_env("gloo")

    class Failing(FakeExtractor):
        def forward(self, inputs):
            if args.fail_at in inputs["indices"]:
                raise RuntimeError(f"simulated failure at sample {args.fail_at}")
            if rank == 0:
                time.sleep(args.delay)
            return super().forward(inputs)

    extract(Failing(), samples(n), args.out, shard_size=shard, batch_size=batch, progress=False)
    print(f"rank {rank}/{world} done")


if __name__ == "__main__":
    _main()
