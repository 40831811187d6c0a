"""FD-CNN as a ratio to the centralized baseline, pooled over seeds: how the papers state their claims.

FedDiffuse reports each method's FID beside the centralized model's (UDec 47.90 against 42.53, a ratio
of 1.13), so the one comparison that survives a change of feature space, sampler and budget is the
ratio, taken against a baseline trained at the same seed on the same data. A run is paired with the
baseline of its seed; runs that differ only in their seed are one setting, and a setting's ratio is the
mean over its seeds, with the spread over seeds and the range over every client's own model (where a
personalized client has fallen behind, or collapsed onto a few modes, its range and recall show it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from fedapp.report import reference as ref
from fedapp.report.runs import Run, dig, num


class Setting(NamedTuple):
    """What a run compares: its method and partition, and for CollaFuse the cut ratio."""

    method: str
    partitioner: str
    cut_ratio: float | None


class Score(NamedTuple):
    """One run's final FD-CNN: the mean over its models, each client model's, precision and recall."""

    round: int
    samples: int | None
    fd: float
    client_fds: tuple[float, ...]
    precision: float | None
    recall: float | None


class SeedRatio(NamedTuple):
    seed: int | None  # None: a config from before ``seed`` was written
    score: Score
    baseline: Score

    @property
    def ratio(self) -> float:
        return self.score.fd / self.baseline.fd

    @property
    def client_ratios(self) -> tuple[float, ...]:
        return tuple(fd / self.baseline.fd for fd in self.score.client_fds)


def setting(run: Run) -> Setting:
    return Setting(run.method, run.partitioner, run.cut_ratio)


def seed(run: Run) -> int | None:
    value = num(run.config.get("seed"))
    return None if value is None else int(value)


def seed_order(value: int | None) -> int:
    """Seeds in ascending order, a config without one first."""
    return -1 if value is None else value


def seed_label(value: int | None) -> str:
    return "?" if value is None else str(value)


def pairing(run: Run) -> tuple[int | None, str]:
    """What a run and its baseline share: the seed and the dataset."""
    return seed(run), str(run.setting("data", "name", "?"))


def final_score(run: Run) -> Score | None:
    """The last round with an FD-CNN; a personalized run's clients each score their own model."""
    for row in reversed(run.rows):
        quality, rnd = row.get("quality"), num(row.get("round"))
        fd = num(dig(quality, "fd-cnn"))
        if fd is None or rnd is None:
            continue
        per_client = row.get("per_client")
        clients = [num(dig(c, "evaluate", "fd-cnn")) for c in per_client.values()] \
            if isinstance(per_client, dict) else []
        client_fds = tuple(v for v in clients if v is not None) or (fd,)
        samples = num(dig(quality, "samples"))
        return Score(int(rnd), None if samples is None else int(samples), fd, client_fds,
                     num(dig(quality, "fd-cnn-precision")), num(dig(quality, "fd-cnn-recall")))
    return None


def authors_ratio(method: str, partitioner: str) -> float | None:
    """The FedDiffuse paper's FID over its centralized FID, where the paper gives one."""
    fid = ref.FID.get(method, {}).get(partitioner)
    return None if fid is None else fid.mean / ref.CENTRALIZED_FID


def seed_ratios(runs: Sequence[Run]) -> tuple[dict[Setting, list[SeedRatio]], list[str]]:
    """Every scored federated run paired with the baseline of its seed, grouped by setting.

    A baseline must have been scored on as many samples, at the same round count and on the same
    dataset, or the ratio would compare two different measurements; runs without one are named in
    the notes instead of silently dropped.
    """
    baselines: dict[tuple[int | None, str], tuple[Run, Score]] = {}
    for run in runs:
        score = final_score(run) if run.is_baseline else None
        if score is not None:
            baselines.setdefault(pairing(run), (run, score))
    groups: dict[Setting, list[SeedRatio]] = {}
    notes = []
    for run in runs:
        if run.is_baseline:
            continue
        score = final_score(run)
        if score is None:
            notes.append(f"- `{run.name}`: no FD-CNN yet, so no ratio.")
            continue
        key = pairing(run)
        found = baselines.get(key)
        if found is None:
            notes.append(f"- `{run.name}`: no scored centralized run with seed {key[0]} in this report.")
            continue
        base_run, base = found
        if (base.samples, base.round) != (score.samples, score.round):
            notes.append(f"- `{run.name}`: scored on {score.samples} samples after round {score.round}, "
                         f"its baseline `{base_run.name}` on {base.samples} after round {base.round}: "
                         "no ratio.")
            continue
        groups.setdefault(setting(run), []).append(SeedRatio(key[0], score, base))
    return groups, notes
