"""A real-world zoo measured end to end: every architecture runs, on the torch.func route.

Randomly initialized models (no weights are downloaded), a batch of 2 tiny inputs, the
default ``hutchinson`` estimator with its smallest budget (5 HVPs: a rank-1 sketch and 3
probes), float32. With so few probes the unbiased norm estimate of a random network may
come out ≤ 0 and be reported as 0, so positivity is checked on the estimated diagonal
itself (its plug-in norm) and on the interval's upper end. Each model must also be left
exactly as it was: parameters and buffers bit-equal, train/eval flags, ``requires_grad``
and ``.grad``.
"""

import math

import pytest
import timm  # the test extra installs timm (with torchvision) and transformers
import torch
import torchvision
import transformers
from torch import nn

import hessdiag
from hessdiag.result import normalized_norm

VOCAB, TOKENS = 50, 8


class EncoderClassifier(nn.Module):
    """Token ids → embedding → ``nn.TransformerEncoder`` (2 layers) → mean → logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(16, 10)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


class BertClassifier(nn.Module):
    """A tiny ``BertForSequenceClassification`` taking token ids, returning logits."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16, num_labels=10)
        self.bert = transformers.BertForSequenceClassification(config)

    def forward(self, tokens):
        return self.bert(input_ids=tokens).logits


class LSTMClassifier(nn.Module):
    """Token ids → embedding → ``nn.LSTM`` → last state → logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, tokens):
        return self.head(self.lstm(self.embed(tokens))[0][:, -1])


ZOO = {
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 16, 16)),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
                           (3, 16, 16)),
    "vit_tiny": (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                                           patch_size=8, num_classes=10), (3, 32, 32)),
    "convnext_atto": (lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10),
                      (3, 32, 32)),
    "transformer_encoder": (EncoderClassifier, "tokens"),
    "bert": (BertClassifier, "tokens"),
    "lstm": (LSTMClassifier, "tokens"),
}


def _snapshot(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
            [(n, m.training) for n, m in model.named_modules()],
            [(n, p.requires_grad, p.grad) for n, p in model.named_parameters()],
            [id(p) for p in model.parameters()])


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_measures_end_to_end(name):
    build, shape = ZOO[name]
    torch.manual_seed(0)
    model = build()  # in training mode, as built: the measurement uses eval() on its own
    g = torch.Generator().manual_seed(1)
    x = (torch.randint(0, VOCAB, (2, TOKENS), generator=g) if shape == "tokens"
         else torch.randn(2, *shape, generator=g))
    y = torch.tensor([1, 7])
    before = _snapshot(model)

    result = hessdiag.measure(model, (x, y), estimator="hutchinson", samples=5, keep_diagonal=True)

    assert result.hvp_route == "func" and result.hvp_fallback is None  # no fallback needed
    assert all(bool(torch.isfinite(d).all()) for d in result.diagonal.values())
    assert math.isfinite(result.normalized_norm) and result.normalized_norm >= 0
    assert normalized_norm(result.diagonal) > 0 and result.ci95[1] > 0
    assert result.num_params == sum(p.numel() for p in model.parameters())
    state, flags, grads, ids = _snapshot(model)
    assert state.keys() == before[0].keys()
    for key, value in state.items():
        assert torch.equal(value, before[0][key]), key
    assert flags == before[1] and grads == before[2] and ids == before[3]


AUTO_CHOICE = {"resnet18": "exact", "mobilenet_v3_small": "hutchinson", "vit_tiny": "hutchinson",
               "convnext_atto": "hutchinson", "transformer_encoder": "hutchinson",
               "bert": "hutchinson", "lstm": "hutchinson"}
"""What the default estimator picks: ReLU ResNet-18 is piecewise linear (exact through the GGN
diagonal); the others have attention, LayerNorm, gates or squeeze-excitation products."""


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_under_the_default_estimator(name):
    build, shape = ZOO[name]
    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(1)
    x = (torch.randint(0, VOCAB, (2, TOKENS), generator=g) if shape == "tokens"
         else torch.randn(2, *shape, generator=g))
    result = hessdiag.measure(model, (x, torch.tensor([1, 7])), samples=5, keep_diagonal=True)
    assert result.estimator == AUTO_CHOICE[name] and result.selection
    assert all(bool(torch.isfinite(d).all()) for d in result.diagonal.values())
    if result.estimator == "exact":
        assert result.ci95[0] == result.ci95[1] == result.normalized_norm > 0
