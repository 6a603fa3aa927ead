"""The zoo: models built by the libraries people train with (Hugging Face transformers,
timm, torchvision), small configurations, random initialisation, nothing downloaded.

Each entry builds ``(model, inputs, targets, loss_fn)`` for a batch of ``B`` samples,
with the library's *default call* unless the name says otherwise. ``loss_fn(out, y)``
is the mean over samples of per-sample losses, so that on a batch of one it is ``l_i``
(what ``tests/reference.py`` needs). Dropout probabilities are 0 so that the oracle's
one-sample passes compute the same function. Used by ``tests/capture/test_zoo.py`` and
``benchmarks/zoo.py``.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# "test": tiny, for the exactness tests; "bench": larger, for benchmarks/zoo.py timings
SIZES = {"test": dict(vocab=96, T=16, img=32, d=32, layers=2),
         "bench": dict(vocab=1000, T=64, img=64, d=128, layers=4)}


def _ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def _own_loss(out: Tensor, y: Tensor) -> Tensor:
    return out  # the model computed its loss (a mean over equal-length sequences)


class Logits(nn.Module):
    """``model(**inputs).logits`` (or ``.loss`` with ``loss=True``): the library's own call."""

    def __init__(self, model: nn.Module, position_ids: bool = False, loss: bool = False):
        super().__init__()
        self.model, self.position_ids, self.loss = model, position_ids, loss

    def forward(self, ids: Tensor) -> Tensor:
        kw = {}
        if self.position_ids:
            kw["position_ids"] = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        if self.loss:
            return self.model(input_ids=ids, labels=ids, **kw).loss
        return self.model(input_ids=ids, **kw).logits


def _tokens(S: dict, classes: int = 0) -> Callable[[int], Tuple[Tensor, Tensor]]:
    def make(B: int) -> Tuple[Tensor, Tensor]:
        ids = torch.randint(0, S["vocab"], (B, S["T"]))
        return ids, (ids if not classes else torch.randint(0, classes, (B,)))
    return make


def gpt2(S: dict, position_ids: bool = False, loss: bool = False):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=S["vocab"], n_positions=S["T"], n_embd=S["d"], n_layer=S["layers"], n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return Logits(GPT2LMHeadModel(cfg), position_ids, loss), _tokens(S), (_own_loss if loss else _ce)


def bert(S: dict, position_ids: bool = False):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=S["vocab"], hidden_size=S["d"], num_hidden_layers=S["layers"],
                     num_attention_heads=2, intermediate_size=2 * S["d"], max_position_embeddings=S["T"], num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return Logits(BertForSequenceClassification(cfg), position_ids), _tokens(S, 3), _ce


def llama(S: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=S["vocab"], hidden_size=S["d"], intermediate_size=2 * S["d"],
                      num_hidden_layers=S["layers"], num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=S["T"])
    return Logits(LlamaForCausalLM(cfg)), _tokens(S), _ce


def _images(S: dict) -> Callable[[int], Tuple[Tensor, Tensor]]:
    return lambda B: (torch.randn(B, 3, S["img"], S["img"]), torch.randint(0, 10, (B,)))


def vit(S: dict, layer_scale: bool = False):
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=S["img"], patch_size=8, embed_dim=S["d"], depth=S["layers"], num_heads=2,
                              num_classes=10, init_values=0.1 if layer_scale else None)
    return model, _images(S), _ce


def convnext_timm(S: dict):
    from timm.models.convnext import ConvNeXt

    w = S["d"] // 4
    return ConvNeXt(depths=(1, 1, 1, 1), dims=(w, 2 * w, 3 * w, 4 * w), num_classes=10, ls_init_value=0.1), _images(S), _ce


def swin(S: dict):
    from timm.models.swin_transformer import SwinTransformer

    model = SwinTransformer(img_size=S["img"], patch_size=2, window_size=4, embed_dim=S["d"] // 2, depths=(2, 2),
                            num_heads=(2, 4), num_classes=10, drop_path_rate=0.0)
    return model, _images(S), _ce


def mixer(S: dict):
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=10, img_size=S["img"], patch_size=8, num_blocks=S["layers"], embed_dim=S["d"]), _images(S), _ce


def resnet18(S: dict, norm: str = "batch"):
    from torchvision.models import resnet18 as make

    if norm == "group":
        model = make(num_classes=10, norm_layer=lambda c: nn.GroupNorm(4, c))
    else:
        model = make(num_classes=10).eval()  # BatchNorm with running statistics
    return model, _images(S), _ce


def convnext_tv(S: dict):
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    w = S["d"] // 4
    blocks = [CNBlockConfig(w, 2 * w, 1), CNBlockConfig(2 * w, None, 1)]
    return ConvNeXt(blocks, num_classes=10), _images(S), _ce


ZOO: Dict[str, Tuple[str, Callable]] = {
    "gpt2": ("transformers", gpt2),
    "gpt2-own-loss": ("transformers", lambda S: gpt2(S, loss=True)),
    "gpt2-position-ids": ("transformers", lambda S: gpt2(S, position_ids=True)),
    "bert": ("transformers", bert),
    "bert-position-ids": ("transformers", lambda S: bert(S, position_ids=True)),
    "llama": ("transformers", llama),
    "vit": ("timm", vit),
    "vit-layerscale": ("timm", lambda S: vit(S, layer_scale=True)),
    "convnext-timm": ("timm", convnext_timm),
    "swin": ("timm", swin),
    "mixer": ("timm", mixer),
    "resnet18-eval-bn": ("torchvision", resnet18),
    "resnet18-groupnorm": ("torchvision", lambda S: resnet18(S, "group")),
    "convnext-torchvision": ("torchvision", convnext_tv),
}


def build(name: str, B: int, seed: int = 0, size: str = "test"):
    """``(model, inputs, targets, loss_fn)`` of zoo entry ``name`` for a batch of ``B``
    at ``size`` ("test" or "bench", see SIZES)."""
    torch.manual_seed(seed)
    model, make_batch, loss_fn = ZOO[name][1](SIZES[size])
    x, y = make_batch(B)
    return model, x, y, loss_fn
