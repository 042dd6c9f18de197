"""BERT on a text dataset for the studies (``dynamics``, ``correct``): tokenise, compute the
frozen layers' output once per example (stored under the cache folder, fingerprinted), and train
and score only the trainable top (the last ``--train-last`` encoder layers and the head).

``BertTop`` on the stored features computes exactly what the full ``BertClassifier`` computes on
the tokens (tested), so every study runs on the model the defaults describe at a fraction of the
cost: the 5 frozen MiniLM layers are never re-run.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from .. import data as ik_data
from .. import models as ik_models
from ..errors import InputError
from . import arguments as arg

BERT_LR = 0.05  # the trainer's default peak lr for the BERT top (SGD, momentum 0.9, cosine)


def add_bert_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--train-last`` and ``--max-length`` (the BERT model's options)."""
    p.add_argument("--train-last", type=arg.count(0), default=1,
                   help="bert: encoder layers trained (the rest is frozen, its output cached)")
    p.add_argument("--max-length", type=arg.count(), default=32,
                   help="bert: tokens per example (longer ones are truncated)")


def check_inputs(args: argparse.Namespace) -> bool:
    """Refuse a text model on tensors and the other way round; True for text."""
    kind = ik_data.INPUTS[args.dataset]
    takes = ik_models.INPUTS[args.model]
    if (kind == "text") != (takes == "text"):
        raise InputError(f"--model {args.model} takes {takes} inputs but --dataset "
                         f"{args.dataset} has {kind} inputs: use --model bert with text data "
                         "and mlp / logreg / cnn / resnet otherwise.")
    return takes == "text"


def bert_setup(args: argparse.Namespace, d: ik_data.DataSplits, cache_dir: str | Path,
               progress: bool | None = None) -> Callable[[], torch.nn.Module]:
    """Replace ``d``'s texts by the frozen layers' features (``{"hidden", "attention_mask"}``,
    stored under ``cache_dir/bert-features``) and return a builder of the trainable top
    (``--train-last`` layers and head, initialised with ``--seed``, dropout off so training is a
    deterministic function of the parameters, as twin runs and unrolled influence need)."""
    from ..models.bert import dropout, frozen_features, load_tokenizer, tokenize

    def full() -> torch.nn.Module:
        return ik_models.build("bert", seed=args.seed, num_classes=d.num_classes,
                               train_last=args.train_last)

    features, _ = full().split()
    tok = load_tokenizer()
    store = Path(cache_dir) / "bert-features"
    for split in ("train", "test"):
        texts, labels = getattr(d, split)
        x = frozen_features(features, tokenize(texts, tok, args.max_length), store=store,
                            progress=progress)
        setattr(d, split, (x, labels))

    def top() -> torch.nn.Module:
        return dropout(full().split()[1], 0.0)

    return top
