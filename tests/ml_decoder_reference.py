"""The official ML-Decoder (Alibaba-MIIL/ML_Decoder) on timm's TResNet bodies: the reference
the converter and the Flax head are checked against, and the checkpoints it saves.

The head is timm's installed copy of the official code (``timm.layers.ml_decoder``:
``MLDecoder``, ``TransformerDecoderLayerOptimal``, the official forward), changed here only, never
in the library, and only where needed:

- The official layout. The official ``MLDecoder`` attaches ``embed_standart``, ``query_embed``,
  ``duplicate_pooling`` and ``duplicate_pooling_bias`` to its ``nn.TransformerDecoder``, so its
  state_dict names them ``head.decoder.*``; timm's copy keeps them on the head itself.
  ``OfficialMLDecoder`` moves them onto the decoder and reads them from there, so its
  state_dict is the official one and its forward timm's (the official) unchanged.
- PyTorch 2 (upstream issue #82): ``nn.TransformerDecoder.forward`` reads ``layers[0].self_attn``
  and passes ``tgt_is_causal`` to its layer, neither of which the official layer has, so the
  official forward fails. With one layer, no final norm and no masks that forward is
  ``layers[0](tgt, memory)``: the decoder instance's ``forward`` is replaced by exactly that.
- Zero-shot (``zsl=1``) is not in timm's copy: ``ZeroShotMLDecoder`` is the official zsl head
  written around timm's decoder layer: the queries are ReLU(``wordvec_proj``) of the word
  vectors the official code assigns to ``decoder.query_embed`` at run time (its
  ``update_wordvecs``: one (300,) vector a class), one (768, 1) ``duplicate_pooling`` shared by
  every query and a scalar bias; ``wordvec_proj`` sits on the head (``head.wordvec_proj.*``).

The bodies are timm's (``tests.reference.random_timm_model``), including ML-Decoder's TResNet-XL
[3, 8, 34, 5] (all Bottleneck, width 1.0), which timm does not register: ``tresnet_v2_xl`` here.
A checkpoint in the official layout (the body InPlaceABN's, ``tests.reference.official_state_dict``)
is what the official code saves: ``{"model": state_dict, "idx_to_class": {0: name, ...}}``;
``load_official`` reads it back as the official code's models are read into timm's body
(timm's own ``checkpoint_filter_fn``), then strictly.
"""

from __future__ import annotations

import math

import numpy as np
import timm
import torch
from timm.layers.ml_decoder import MLDecoder, TransformerDecoderLayerOptimal
from timm.models import register_model
from timm.models.tresnet import TResNet, checkpoint_filter_fn
from torch import nn

from tests.reference import official_state_dict, random_timm_model

EMBED = 768
WORD_DIM = 300
XL_NAME, XL_LAYERS = "tresnet_v2_xl", [3, 8, 34, 5]
# The tensors the official code hangs on the decoder (timm's copy: on the head).
ON_DECODER = ("embed_standart", "query_embed", "duplicate_pooling", "duplicate_pooling_bias")


def one_layer_forward(decoder: nn.TransformerDecoder) -> None:
    """The PyTorch 2 patch (module docstring): the decoder calls its one layer directly."""
    layer = decoder.layers[0]
    decoder.forward = lambda tgt, memory: layer(tgt, memory)


class OfficialMLDecoder(MLDecoder):
    """timm's ``MLDecoder`` (the official head) with its tensors where the official code keeps
    them: a state_dict of ``decoder.embed_standart.*``, ``decoder.query_embed.weight``,
    ``decoder.layers.0.*``, ``decoder.duplicate_pooling`` and ``decoder.duplicate_pooling_bias``."""

    def __init__(self, num_classes: int, num_of_groups: int = -1, initial_num_features: int = 2048) -> None:
        super().__init__(num_classes, num_of_groups, initial_num_features=initial_num_features)
        for name in ON_DECODER:
            value = getattr(self, name)
            delattr(self, name)
            setattr(self.decoder, name, value)
        one_layer_forward(self.decoder)

    def __getattr__(self, name: str) -> torch.Tensor | nn.Module:  # timm's forward reads them from the head
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name not in ON_DECODER:
                raise
            return getattr(self.decoder, name)


class ZeroShotMLDecoder(nn.Module):
    """The official zero-shot head (module docstring): word vectors in ``decoder.query_embed``
    ((classes, 300), set by ``set_word_vectors``), a logit per class."""

    def __init__(self, initial_num_features: int = 2048) -> None:
        super().__init__()
        layer = TransformerDecoderLayerOptimal(d_model=EMBED, dim_feedforward=2048, dropout=0.1)
        self.decoder = nn.TransformerDecoder(layer, num_layers=1)
        one_layer_forward(self.decoder)
        self.decoder.embed_standart = nn.Linear(initial_num_features, EMBED)
        self.wordvec_proj = nn.Linear(WORD_DIM, EMBED)
        self.decoder.duplicate_pooling = nn.Parameter(torch.empty(EMBED, 1))
        self.decoder.duplicate_pooling_bias = nn.Parameter(torch.zeros(1))
        nn.init.xavier_normal_(self.decoder.duplicate_pooling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.relu(self.decoder.embed_standart(x.flatten(2).transpose(1, 2)))
        queries = torch.relu(self.wordvec_proj(self.decoder.query_embed))
        target = queries.unsqueeze(1).expand(-1, tokens.shape[0], -1)
        decoded = self.decoder(target, tokens.transpose(0, 1)).transpose(0, 1)  # (batch, classes, 768)
        return (decoded @ self.decoder.duplicate_pooling).flatten(1) + self.decoder.duplicate_pooling_bias


def set_word_vectors(model: nn.Module, word_vectors: np.ndarray) -> None:
    """What the official ``update_wordvecs`` does: the classes to score, as (classes, 300)."""
    model.head.decoder.query_embed = torch.from_numpy(np.asarray(word_vectors, np.float32))


def register_tresnet_v2_xl() -> None:
    """ML-Decoder's TResNet-XL in timm's registry, as ``tresnet_v2_xl`` (timm's TResNet with
    ``v2=True``: Bottleneck blocks in every stage, the v1 LeakyReLU slopes)."""
    if XL_NAME in timm.list_models(XL_NAME):
        return

    def tresnet_v2_xl(pretrained: bool = False, **kwargs: object) -> TResNet:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
        return TResNet(layers=XL_LAYERS, v2=True, **kwargs)

    register_model(tresnet_v2_xl)


def randomize_head(head: nn.Module, seed: int) -> None:
    """Every tensor of the head random and away from its initial value (zero biases, unit
    LayerNorm scales), and group projections scaled so the logits spread over a few units
    whatever K and g: parity that a wrong transposition, split or order cannot pass."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in head.named_parameters():
            if name.endswith("duplicate_pooling"):
                value.normal_(0.0, 2.0 / math.sqrt(EMBED), generator=generator)
            elif ".norm" in name and name.endswith("weight"):
                value.uniform_(0.5, 1.5, generator=generator)
            elif name.endswith("bias"):
                value.uniform_(-0.3, 0.3, generator=generator)


def ml_decoder_model(
    name: str, num_classes: int = 80, num_of_groups: int = -1, zero_shot: bool = False, seed: int = 0
) -> TResNet:
    """A timm TResNet ``name`` (``tresnet_v2_xl`` included) in eval mode with random weights and
    non-trivial BatchNorm statistics, gammas positive so the official layout holds them, and a
    random official ML-Decoder head (``zero_shot``: the zsl head, which scores the classes of
    ``set_word_vectors``)."""
    register_tresnet_v2_xl()
    model = random_timm_model(name, num_classes=0, seed=seed, positive_gammas=True)
    features = model.num_features
    if zero_shot:
        model.head = ZeroShotMLDecoder(features)
    else:
        model.head = OfficialMLDecoder(num_classes, num_of_groups, initial_num_features=features)
        model.num_classes = num_classes
    randomize_head(model.head, seed)
    return model.eval()


def official_checkpoint(model: TResNet, class_names: list[str] | None = None, seed: int = 0) -> dict:
    """What the official code saves: ``{"model": <official layout>, "idx_to_class": ...}``."""
    checkpoint: dict = {"model": official_state_dict(model, seed)}
    if class_names is not None:
        checkpoint["idx_to_class"] = dict(enumerate(class_names))
    return checkpoint


def timm_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The head as timm's ``MLDecoder.state_dict()`` names it (``head.embed_standart.*``, ...) on
    a timm body: the same tensors one level up."""
    out = {}
    for key, value in state_dict.items():
        for name in ON_DECODER:
            key = key.replace(f"head.decoder.{name}", f"head.{name}")
        out[key] = value
    return out


def load_official(model: TResNet, checkpoint: dict) -> None:
    """Load an official-layout checkpoint into the reference as timm reads the official code's
    files (``timm.models.tresnet.checkpoint_filter_fn``: InPlaceABN weights to BatchNorm
    scales), strictly."""
    model.load_state_dict(checkpoint_filter_fn(checkpoint["model"], model), strict=True)
