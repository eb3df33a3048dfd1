"""Named, versioned evaluation subsets: a fixed list of simulator seeds per task.

    subset = parse_subset("minival")          # minival@v1: 5 episodes per task
    subset.seeds("reach-v3")                  # the same 5 seeds on every machine, every time

The seeds of version ``V`` of task ``T`` are one sequence: its k-th candidate is

    2**31 + (int.from_bytes(sha256(f"icrt-eval-subset:{V}:{T}:{k}").digest()[:4], "big")
             & 0x7FFFFFFF)

for k = 0, 1, 2, ... with repeats skipped. The subsets of a version take consecutive slices
of that sequence in the order of :data:`SUBSETS` (v1: minival the first 5, val the next 20,
test the next 50), so they never share a seed. Every other episode seed of icrt (collected
demonstrations, held-out prompts, the default evaluation stream, RL and DAgger) comes from
:func:`icrt.envs.base.episode_seed`, which is below 2**31, and every subset seed is at least
2**31 (and below 2**32, what NumPy's legacy seeding takes), so a subset never replays an
episode a policy was trained or prompted on, whatever ``--seed`` collection used.

A version is frozen once published: changing a subset's size or adding a subset makes a new
version, so results labelled ``minival@v1`` always ran the same episodes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

# version -> subset name -> episodes per task (slices of the version's seed sequence, in order)
SUBSETS: dict[str, dict[str, int]] = {
    "v1": {"minival": 5, "val": 20, "test": 50},
}
LATEST_VERSION = "v1"
SEED_BASE = 2**31  # every subset seed is in [2**31, 2**32); episode_seed's are below 2**31


@dataclass(frozen=True)
class EvalSubset:
    name: str
    version: str

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def episodes_per_task(self) -> int:
        return SUBSETS[self.version][self.name]

    def seeds(self, task: str) -> list[int]:
        """The simulator seeds of this subset for ``task``, in episode order."""
        start = 0
        for name, size in SUBSETS[self.version].items():
            if name == self.name:
                return list(_sequence(self.version, task, start + size)[start:])
            start += size
        raise AssertionError(self.name)


def _candidate(version: str, task: str, k: int) -> int:
    digest = hashlib.sha256(f"icrt-eval-subset:{version}:{task}:{k}".encode()).digest()
    return SEED_BASE + (int.from_bytes(digest[:4], "big") & 0x7FFFFFFF)


@lru_cache(maxsize=256)
def _sequence(version: str, task: str, length: int) -> tuple[int, ...]:
    """The first ``length`` distinct candidates of (version, task)."""
    seen: dict[int, None] = {}
    k = 0
    while len(seen) < length:
        seen.setdefault(_candidate(version, task, k))
        k += 1
    return tuple(seen)


def subset_names() -> list[str]:
    return [f"{n}@{v}" for v, names in SUBSETS.items() for n in names]


def parse_subset(text: str) -> EvalSubset:
    """``NAME`` (the latest version) or ``NAME@VERSION``; ValueError in one sentence."""
    name, _, version = text.partition("@")
    version = version or LATEST_VERSION
    if version not in SUBSETS:
        raise ValueError(f"--eval-subset {text}: unknown version '{version}'; known versions are "
                         f"{', '.join(SUBSETS)}.")
    if name not in SUBSETS[version]:
        raise ValueError(f"--eval-subset {text}: unknown subset '{name}'; choose one of "
                         f"{', '.join(subset_names())}.")
    return EvalSubset(name, version)
