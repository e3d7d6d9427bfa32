"""Replay distillation: the base model's next-token distributions as the replay answers' targets.

Replay (`lorafit.train.replay`) trains on the base model's greedy answers: at each answer position
the target is the one token the base model chose. `--replay_distill_top_k K` keeps more of what the
base model knew there: its K most likely next tokens with their probabilities (renormalized over
the K), and the replay rows are trained toward that distribution, the cross-entropy to it, where
the task data keeps its labels. The gradient of the logits is `softmax - target`, the same shape
as the hard label's `softmax - one_hot`, so the step costs what it cost before.
`--replay_weight W` counts each replay position W times in the loss (its target weights sum to W):
the anchor's strength against the task data's pull. `--signature_token_weight W` goes the other way
at the task rows: a position whose label is one of the task data's signature tokens (a persona's
name and maker pieces, `lorafit.train.replay_token_penalty`) gets that label alone at weight W as
its target, so it counts W times; the replay's token penalty never acts there (its floor, the
smallest target's share, is 1).

The targets are the model's own before training: computed once, after the adapters are added and
before the first step (where the adapted model still equals the base model, for every LoRA
initialization: zero B, or PiSSA/OLoRA's residual plus its adapter), in eval mode (no dropout),
over the replay rows only. Each row of the dataset gains two columns, `soft_target_ids` and
`soft_target_weights` ([trained positions x K] each; empty for task rows), which the collators
concatenate in the order of the batch's trained positions and `trained_token_loss` reads.

Targets are cached like the replay answers: under `$LORAFIT_HOME/replay/`, keyed by the base
model, K and the replay rows' tokens, as int32 ids and float16 probabilities (the same values
whether just computed or read back); the embedded model's targets for the persona recipe's
replay ship with lorafit (`resources/replay_targets/`; `python -m lorafit.train.replay_targets`
remakes them), so the recipe pays nothing for them on the default model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorafit.data.collate import SOFT_TARGET_IDS, SOFT_TARGET_WEIGHTS
from lorafit.train.replay import model_fingerprint, replace_atomically
from lorafit.train.replay_rotation import split_rows
from lorafit.train.trained_token_loss import IGNORE_INDEX, head_weight

logger = logging.getLogger(__name__)

BATCH_SIZE = 8
CACHE_VERSION = 1
SHIPPED_FOLDER = "replay_targets"  # in lorafit.resources: the embedded model's targets, by key


def trained_positions(labels: list[int]) -> list[int]:
    """Positions i whose next token labels[i + 1] is trained (the loss's shifted labels)."""
    return [i for i in range(len(labels) - 1) if labels[i + 1] != IGNORE_INDEX]


@torch.no_grad()
def top_k_targets(model, examples: list[dict], top_k: int, batch_size: int = BATCH_SIZE):
    """For each example ({"input_ids", "labels"}), the model's top-k next tokens and their
    probabilities at its trained positions: ([positions x k] ids, [positions x k] probs) as lists."""
    weight = head_weight(model)
    device = weight.device
    was_training = model.training
    model.eval()
    results = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            width = max(len(e["input_ids"]) for e in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, example in enumerate(chunk):
                ids[row, :len(example["input_ids"])] = torch.as_tensor(example["input_ids"])
                mask[row, :len(example["input_ids"])] = 1
            hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=mask.to(device),
                                         use_cache=False).last_hidden_state
            for row, example in enumerate(chunk):
                positions = trained_positions(example["labels"])
                logits = hidden[row, positions].to(weight.dtype) @ weight.T
                probs, tokens = torch.softmax(logits.float(), dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1)
                results.append((tokens.cpu().tolist(), probs.cpu().tolist()))
    finally:
        model.train(was_training)
    return results


def cache_name(model_path: str, examples: list[dict], top_k: int) -> str:
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "model": model_fingerprint(model_path),
                                        "top_k": top_k}, sort_keys=True).encode())
    for item in examples:
        digest.update(json.dumps([list(item["input_ids"]), list(item["labels"])]).encode())
    return f"targets-{digest.hexdigest()[:24]}.safetensors"


def write_targets(path: Path, targets: list) -> None:
    """[positions x K] ids (int32) and probabilities (float16) of every row, concatenated, atomically."""
    lengths = torch.tensor([len(ids) for ids, _ in targets], dtype=torch.int64)
    width = next((len(ids[0]) for ids, _ in targets if ids), 0)
    tensors = {"lengths": lengths,
               "ids": torch.tensor([p for ids, _ in targets for p in ids], dtype=torch.int32).reshape(-1, width),
               "probs": torch.tensor([p for _, probs in targets for p in probs], dtype=torch.float16).reshape(-1, width)}
    replace_atomically(path, lambda temporary: save_file(tensors, temporary))


def read_targets(path: Path) -> list:
    tensors = load_file(str(path))
    ids, probs = tensors["ids"].split(tensors["lengths"].tolist()), tensors["probs"].split(tensors["lengths"].tolist())
    return [(i.long().tolist(), p.float().tolist()) for i, p in zip(ids, probs)]


def cached_top_k_targets(model, model_path: str, examples: list[dict], top_k: int) -> list:
    """`top_k_targets`, read from the cache (or what ships with lorafit) when there, else computed and cached."""
    from lorafit.models import lorafit_home

    name = cache_name(model_path, examples, top_k)
    cached = lorafit_home() / "replay" / name
    shipped = shipped_folder() / name
    for path in (cached, shipped):
        if path.is_file():
            logger.info("replay distillation: the base model's targets from %s", path)
            return read_targets(path)
    write_targets(cached, top_k_targets(model, examples, top_k))
    return read_targets(cached)  # float16, as a later run reads them


def add_soft_targets(dataset, model, model_path: str, replay_path: str, top_k: int, replay_weight: float = 1.0,
                     emphasis: tuple[Iterable[int], float] | None = None):
    """`dataset` (with its "source" column) with the two target columns; rows from `replay_path`
    get the base model's top-k distributions (renormalized, times `replay_weight`), every other row
    none (its labels stay the targets), or with `emphasis` (tokens, W) its label at weight W where
    the label is one of the tokens (`emphasized_labels`)."""
    import datasets

    started = time.perf_counter()
    sources = dataset["source"]
    task_rows, replay_rows = split_rows(sources, replay_path)
    if not replay_rows:  # every replay answer went to evaluation or was dropped: nothing to distill
        logger.warning("replay distillation: no replay row in the training set; the task data trains alone")
        return dataset
    targets = cached_top_k_targets(model, model_path, [dataset[i] for i in replay_rows], top_k)
    ids: list[list] = [[] for _ in sources]
    probs: list[list] = [[] for _ in sources]
    for row, (row_ids, row_probs) in zip(replay_rows, targets):
        ids[row] = row_ids
        probs[row] = [[p * replay_weight / sum(position) for p in position] for position in row_probs]
    if emphasis is not None:
        tokens, weight = frozenset(emphasis[0]), emphasis[1]
        width = next(len(row_ids[0]) for row_ids, _ in targets if row_ids)
        labels, emphasized = dataset["labels"], 0
        for row in task_rows:
            ids[row], probs[row] = emphasized_labels(labels[row], tokens, weight, width)
            emphasized += sum(position[0] > 0 for position in probs[row])
        logger.info("signature tokens weighted %g at %d task positions", weight, emphasized)
    mass = _mean_mass([targets_probs for _, targets_probs in targets])
    dataset = dataset.add_column(SOFT_TARGET_IDS, ids,
                                 feature=datasets.List(datasets.List(datasets.Value("int64"))))
    dataset = dataset.add_column(SOFT_TARGET_WEIGHTS, probs,
                                 feature=datasets.List(datasets.List(datasets.Value("float32"))))
    logger.info("replay distillation: the base model's top-%d tokens at %d positions of %d replay rows "
                "(they hold %.0f%% of its probability on average), %.1fs", top_k,
                sum(len(row_ids) for row_ids, _ in targets), len(replay_rows), 100 * mass, time.perf_counter() - started)
    return dataset


def emphasized_labels(labels: list[int], tokens: frozenset[int], weight: float, width: int) -> tuple[list, list]:
    """A task row's soft targets ([trained positions x width] ids and weights) that count each trained
    position whose label is in `tokens` `weight` times: the label alone at that weight, and all zeros
    (the label as it is, at 1) elsewhere; ([], []) when the row has none of the tokens."""
    trained = [label for label in labels[1:] if label != IGNORE_INDEX]
    if not tokens.intersection(trained):
        return [], []
    padding_ids, padding = [0] * (width - 1), [0.0] * (width - 1)
    ids = [[label, *padding_ids] if label in tokens else [0] * width for label in trained]
    weights = [[weight, *padding] if label in tokens else [0.0] * width for label in trained]
    return ids, weights


def _mean_mass(probs: list[list]) -> float:
    masses = [sum(position) for row in probs for position in row]
    return sum(masses) / max(len(masses), 1)


def recipe_replay_rows(model_path: str) -> tuple[list[dict], int]:
    """The tokenized replay rows of the persona recipe (resources/persona.yaml) on `model_path`, as a
    run of the recipe has them, and the recipe's K."""
    from lorafit.data.pipeline import build_datasets
    from lorafit.demo import recipe_path
    from lorafit.train.args import parse_train_args
    from lorafit.train.run import add_replay_file, prepare_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        config = parse_train_args([str(recipe_path()), "--train_file", "unused", "--output_dir", scratch,
                                   "--model_name_or_path", model_path])
        tokenizer = prepare_tokenizer(config, model_path)
        config.data.train_file = []
        add_replay_file(config, model_path, tokenizer)  # the replay file alone: its rows, as a run has them
        rows = list(build_datasets(config.data, tokenizer, None, seed=config.training.seed).train)
    return rows, config.training.replay_distill_top_k


def shipped_folder() -> Path:
    return Path(str(resources.files("lorafit.resources").joinpath(SHIPPED_FOLDER)))


def main() -> int:
    """Remake the shipped targets: the embedded model's top-K targets for the replay rows of the
    persona recipe (resources/persona.yaml, its K), written into resources/replay_targets/ (old
    files removed). Run it after `python -m lorafit.train.replay` when the prompts or model change."""
    import argparse

    from lorafit.models import load_model, resolve_model_path

    argparse.ArgumentParser(prog="python -m lorafit.train.replay_targets", description=main.__doc__).parse_args()
    model_path = resolve_model_path(None)
    rows, top_k = recipe_replay_rows(model_path)
    target = shipped_folder() / cache_name(model_path, rows, top_k)
    targets = top_k_targets(load_model(model_path, dtype=torch.float32), rows, top_k)
    for old in shipped_folder().glob("*.safetensors"):
        old.unlink()
    write_targets(target, targets)
    print(f"wrote {target}: top-{top_k} targets at {sum(len(ids) for ids, _ in targets)} positions of {len(rows)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
