"""Replay rotation: every epoch trains on all the task rows and the next slice of the replay rows.

Replay (`train/replay.py`) ties the adapter to the base model's behaviour on general prompts; the
more different prompts it covers, the more of that behaviour it holds on prompts it never saw. But
each replay row costs a training step's share every epoch, and a persona set of ~90 rows trained
for 3 epochs beside ~280 replay rows would take three times as long as beside ~90. With rotation
the replay pool is cut into `num_train_epochs` slices and epoch e trains on the task rows and slice
e: over the run every replay answer is trained once, and an epoch costs what it would with a third
of the pool. On lorafit's persona sets this kept more of the general answers the base model got
right at the same training time (docs/train.md, "Replay rotation").

`--replay_ratio R` makes the slices smaller for a small task set: R replay rows per task row in
each epoch where that is fewer than 1/epochs of the pool (never more: no replay row comes twice in a
run). A fixed third of the pool is a large share of a small task set's run (59 persona rows beside
94 replay rows took 1.60x the time of the persona alone, 80 beside 94 took 1.45x); with the cap a
smaller task set keeps the replay's share of its run.

The order is a pure function of (seed, epoch): the pool is put in one seeded order and cut into
consecutive slices (wrapping around when the epochs outnumber the slices' worth of rows), and each
epoch's rows are shuffled by `seed + epoch`. The epoch is taken from the Trainer at the start of
each epoch (`ReplayRotationCallback`), so a run resumed mid-epoch sees the same rows in the same
order as one that was never interrupted; every process of a distributed run draws the same order
and the Trainer's data loader gives each its share of the batches.
"""

from __future__ import annotations

import logging
import math

import torch
from transformers import TrainerCallback

logger = logging.getLogger("lorafit.train")


class ReplayRotationSampler(torch.utils.data.Sampler):
    """Indices into the training set: `task_rows` every epoch, `per_epoch` of `replay_rows` per epoch:
    1/epochs of them, or `ratio` per task row where that is fewer."""

    def __init__(self, task_rows: list[int], replay_rows: list[int], epochs: float, seed: int,
                 ratio: float | None = None):
        if not replay_rows:
            raise ValueError("replay rotation needs replay rows")
        self.task_rows = list(task_rows)
        self.replay_rows = list(replay_rows)
        self.per_epoch = math.ceil(len(self.replay_rows) / max(1, math.ceil(epochs)))
        if ratio is not None:  # smaller slices for a small task set; never so large that a row comes twice
            # (- 1e-9: 1.2 * 80 is 96.00000000000001 in floating point, and should give 96)
            self.per_epoch = max(1, min(self.per_epoch, math.ceil(ratio * len(self.task_rows) - 1e-9)))
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def replay_slice(self, epoch: int) -> list[int]:
        """The replay rows of `epoch`: the next `per_epoch` rows of the pool in its seeded order."""
        pool = len(self.replay_rows)
        order = torch.randperm(pool, generator=torch.Generator().manual_seed(self.seed)).tolist()
        start = epoch * self.per_epoch
        return [self.replay_rows[order[(start + i) % pool]] for i in range(self.per_epoch)]

    def __iter__(self):
        rows = self.task_rows + self.replay_slice(self.epoch)
        shuffle = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed + 1 + self.epoch))
        return iter([rows[i] for i in shuffle.tolist()])

    def __len__(self) -> int:
        return len(self.task_rows) + self.per_epoch


class ReplayRotationCallback(TrainerCallback):
    """Tells the sampler which epoch starts (also after a resume, from the restored state)."""

    def __init__(self, sampler: ReplayRotationSampler):
        self.sampler = sampler

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.sampler.set_epoch(math.floor(state.epoch or 0.0))


def source_file(source: str) -> str:
    """The file of a record's `path:line` source."""
    return source.rsplit(":", 1)[0]


def split_rows(sources: list[str], replay_path: str) -> tuple[list[int], list[int]]:
    """(task rows, replay rows) of a prepared training set by each row's `path:line` source."""
    task, replay = [], []
    for index, source in enumerate(sources):
        (replay if source_file(source) == replay_path else task).append(index)
    return task, replay


def check_rotation_settings(config) -> None:
    """Refuse, before anything loads, what --replay_rotation cannot combine with (`config`: a TrainConfig)."""
    from lorafit.errors import UserError

    training = config.training
    if config.data.streaming:
        raise UserError("--replay_rotation needs the whole data set up front; it does not work with --streaming")
    if config.data.packing:
        raise UserError("--replay_rotation picks rows per epoch, and --packing joins rows into packs before "
                        "training: use one of them")
    if training.train_sampling_strategy != "random":
        raise UserError(f"--replay_rotation orders the rows itself; it does not combine with "
                        f"--train_sampling_strategy {training.train_sampling_strategy}")


def rotation_sampler(config, train_dataset) -> ReplayRotationSampler | None:
    """The sampler of a `lorafit train` run (`config`: its TrainConfig) over its prepared rows (with their
    "source" column)."""
    training = config.training
    task, replay = split_rows(train_dataset["source"], config.data.train_file[-1])  # add_replay_file put it last
    if not replay:
        logger.warning("replay rotation: no replay row in the training set; the task data trains alone")
        return None
    sampler = ReplayRotationSampler(task, replay, training.num_train_epochs, training.data_seed or training.seed,
                                    training.replay_ratio)
    logger.info("replay rotation: each epoch trains on the %d task rows and %d of the %d replay rows",
                len(task), sampler.per_epoch, len(replay))
    return sampler
