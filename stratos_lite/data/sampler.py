"""Band-weighted sampling with replacement: deterministic, resumable mid-epoch, rank-aware; and its check.

Each example is drawn with probability target_share(band) / count(band) (times an optional per-example
boost, renormalised inside the band so band shares stay on target). An epoch is `len(dataset)` draws from
one global stream fixed by (seed, epoch); with N ranks, rank r takes every N-th draw starting at r, so
the ranks together see exactly what a single process would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..storage.atomic import write_text

if TYPE_CHECKING:  # for the annotations only
    from ..config import TrainConfig


def example_probabilities(bands: Sequence[int], target_shares: Sequence[float],
                          boost: Sequence[float] | None = None) -> torch.Tensor:
    band_ids = torch.as_tensor(bands, dtype=torch.long)
    weights = torch.ones(len(band_ids), dtype=torch.float64) if boost is None else torch.as_tensor(
        boost, dtype=torch.float64)
    shares = torch.as_tensor(target_shares, dtype=torch.float64)
    band_mass = torch.zeros(len(shares), dtype=torch.float64).index_add_(0, band_ids, weights)
    shares = torch.where(band_mass > 0, shares, 0.0)  # a band with no examples gives its share to the rest
    if shares.sum() <= 0:
        raise ValueError("no example falls in a band with a positive target share")
    shares = shares / shares.sum()
    return shares[band_ids] * weights / band_mass[band_ids]


class BandSampler:
    def __init__(self, bands: Sequence[int], target_shares: Sequence[float], seed: int = 0,
                 boost: Sequence[float] | None = None, process_rank: int = 0, world_size: int = 1):
        if not 0 <= process_rank < world_size:
            raise ValueError(f"process rank {process_rank} is not in 0..{world_size - 1}")
        self.bands = list(bands)
        self.probabilities = example_probabilities(self.bands, target_shares, boost)
        self.seed, self.process_rank, self.world_size = seed, process_rank, world_size
        self.epoch, self.position = 0, 0  # position: draws this rank has taken in the current epoch

    @property
    def draws_per_epoch(self) -> int:
        """This rank's share of an epoch's len(dataset) global draws (the tail that does not split evenly
        across ranks is dropped, so every rank takes the same number of steps)."""
        return len(self.bands) // self.world_size

    def epoch_stream(self, epoch: int) -> torch.Tensor:
        """The global stream of example indices for `epoch` (identical on every rank)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.multinomial(self.probabilities, len(self.bands), replacement=True, generator=generator)

    def __iter__(self) -> Iterator[int]:
        """Indices from the current position on, forever, epoch after epoch; the position advances as
        items are taken, so `state_dict()` at any moment says exactly where to resume."""
        while True:
            mine = self.epoch_stream(self.epoch)[self.process_rank::self.world_size][: self.draws_per_epoch].tolist()
            while self.position < len(mine):
                index = mine[self.position]
                self.position += 1
                yield index
            self.epoch, self.position = self.epoch + 1, 0

    def take(self, count: int) -> list[int]:
        iterator = iter(self)
        return [next(iterator) for _ in range(count)]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "process_rank": self.process_rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume where `state` left off, also on another number of ranks: the ranks had taken position x
        world_size draws of the epoch's global stream together, which this world size splits anew (rounded
        down when it does not divide, so a few draws may be taken again)."""
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state is for seed {state['seed']}, this run has seed {self.seed}")
        self.epoch = state["epoch"]
        self.position = state["position"] * state["world_size"] // self.world_size


def total_variation(p: Sequence[float], q: Sequence[float]) -> float:
    return 0.5 * float(np.abs(np.asarray(p, dtype=float) - np.asarray(q, dtype=float)).sum())


def verify_sampler(sampler: BandSampler, band_names: Sequence[str], target_shares: Sequence[float],
                   batches: int = 1000, batch_size: int = 2, path: str | Path | None = None) -> dict:
    """Compare the bands of the first `batches` batches of the run's global stream (read without moving
    the sampler) with the target distribution and with the raw (unweighted) one."""
    wanted, streams, epoch = batches * batch_size, [], 0
    while sum(len(s) for s in streams) < wanted:
        streams.append(sampler.epoch_stream(epoch))
        epoch += 1
    first = torch.cat(streams)[:wanted].tolist()
    drawn = np.bincount([sampler.bands[i] for i in first], minlength=len(band_names))
    raw = np.bincount(sampler.bands, minlength=len(band_names))
    target = np.asarray(target_shares, dtype=float)
    drawn_share, raw_share, target_share = drawn / drawn.sum(), raw / raw.sum(), target / target.sum()
    result = {
        "batches": batches, "batch_size": batch_size, "examples": int(drawn.sum()),
        "bands": {name: {"raw": float(r), "target": float(t), "drawn": float(d)}
                  for name, r, t, d in zip(band_names, raw_share, target_share, drawn_share, strict=True)},
        "tvd_to_target": total_variation(drawn_share, target_share),
        "tvd_to_raw": total_variation(drawn_share, raw_share),
    }
    # The report's "distance" figures (0.024 and 0.275) are sums of absolute differences, twice the TVD.
    result["l1_to_target"], result["l1_to_raw"] = 2 * result["tvd_to_target"], 2 * result["tvd_to_raw"]
    result["passed"] = result["tvd_to_target"] < 0.05 and result["tvd_to_target"] < result["tvd_to_raw"]
    if path is not None:
        write_text(path, json.dumps(result, indent=2))
    return result


def format_verification(result: dict) -> str:
    lines = [f"Sampler verification after {result['batches']} batches ({result['examples']} examples):",
             f"  {'band':<12}{'raw %':>8}{'target %':>10}{'drawn %':>9}"]
    lines += [f"  {name:<12}{100 * b['raw']:>8.1f}{100 * b['target']:>10.1f}{100 * b['drawn']:>9.1f}"
              for name, b in result["bands"].items()]
    lines.append(f"  TVD to target {result['tvd_to_target']:.3f}, to raw {result['tvd_to_raw']:.3f} "
                 f"(L1 {result['l1_to_target']:.3f} and {result['l1_to_raw']:.3f}): "
                 f"{'PASSED' if result['passed'] else 'FAILED'}")
    return "\n".join(lines)


def sampler_for(dataset, config: TrainConfig, process_rank: int = 0, world_size: int = 1) -> BandSampler:
    """The run's sampler: band-weighted when config.band_sampling and the dataset has bands (ScoredDataset),
    else uniform (one band holding every example); contrastive groups boosted as config asks."""
    bands = getattr(dataset, "band_ids", None)
    if config.band_sampling and bands is not None:
        shares = [b.target_share for b in dataset.bands]
    else:
        bands, shares = [0] * len(dataset), [1.0]
    boost = dataset.contrastive_boost(config.contrastive_boost) if config.contrastive_boost != 1.0 else None
    return BandSampler(bands, shares, seed=config.seed, boost=boost, process_rank=process_rank,
                       world_size=world_size)


def verify_for(dataset, config: TrainConfig, sampler: BandSampler, world_size: int, path: Path) -> dict | None:
    """verify_sampler over config.verify_batches global batches, written to `path`; None when band sampling is
    off, the dataset has no bands, or verify_batches is 0."""
    if not (config.band_sampling and hasattr(dataset, "bands") and config.verify_batches > 0):
        return None
    return verify_sampler(sampler, [b.name for b in dataset.bands], [b.target_share for b in dataset.bands],
                          config.verify_batches, config.batch_size * world_size, path)
