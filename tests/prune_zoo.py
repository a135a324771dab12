"""Models for the plug-in tests beyond torchvision: small versions of the paper's task families
(style transfer, optical flow, translation) and small Hugging Face configurations."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class StyleTransferNet(nn.Module):
    """Johnson-style image transformation net: reflection padding, InstanceNorm, residual blocks, upsampling."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()

        def conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.ReflectionPad2d(k // 2), nn.Conv2d(cin, cout, k, stride))

        self.down = nn.Sequential(
            conv(3, width, 9), nn.InstanceNorm2d(width, affine=True), nn.ReLU(),
            conv(width, 2 * width, 3, 2), nn.InstanceNorm2d(2 * width, affine=True), nn.ReLU(),
        )  # fmt: skip
        self.res = nn.ModuleList(
            nn.Sequential(
                conv(2 * width, 2 * width, 3),
                nn.InstanceNorm2d(2 * width, affine=True),
                nn.ReLU(),
                conv(2 * width, 2 * width, 3),
                nn.InstanceNorm2d(2 * width, affine=True),
            )  # fmt: skip
            for _ in range(2)
        )
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2), conv(2 * width, width, 3), nn.InstanceNorm2d(width, affine=True), nn.ReLU()
        )
        self.out = conv(width, 3, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(x)
        for block in self.res:
            y = y + block(y)
        return self.out(self.up(y))


class FlowNetS(nn.Module):
    """A small FlowNetS: a conv encoder over two stacked frames, a ConvTranspose2d decoder that
    concatenates skip features with upsampled flow predictions."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()

        def down(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.LeakyReLU(0.1))

        self.conv1, self.conv2, self.conv3 = down(6, width), down(width, 2 * width), down(2 * width, 4 * width)
        self.predict3 = nn.Conv2d(4 * width, 2, 3, 1, 1)
        self.deconv2 = nn.Sequential(nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.1))
        self.upflow3 = nn.ConvTranspose2d(2, 2, 4, 2, 1)
        self.predict2 = nn.Conv2d(4 * width + 2, 2, 3, 1, 1)
        self.deconv1 = nn.Sequential(nn.ConvTranspose2d(4 * width + 2, width, 4, 2, 1), nn.LeakyReLU(0.1))
        self.upflow2 = nn.ConvTranspose2d(2, 2, 4, 2, 1)
        self.predict1 = nn.Conv2d(2 * width + 2, 2, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c1 = self.conv1(x)
        c2 = self.conv2(c1)
        c3 = self.conv3(c2)
        flow3 = self.predict3(c3)
        cat2 = torch.cat([c2, self.deconv2(c3), self.upflow3(flow3)], 1)
        flow2 = self.predict2(cat2)
        cat1 = torch.cat([c1, self.deconv1(cat2), self.upflow2(flow2)], 1)
        return self.predict1(cat1)


class Translator(nn.Module):
    """A small translation model: embeddings, a learned position table, ``nn.Transformer``, an output projection."""

    def __init__(self, vocab: int = 50, dim: int = 32, heads: int = 4, hidden: int = 64, length: int = 16) -> None:
        super().__init__()
        self.src_embed, self.tgt_embed = nn.Embedding(vocab, dim), nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, length, dim) * 0.02)
        self.transformer = nn.Transformer(
            dim, heads, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=hidden, dropout=0.0,
            batch_first=True,
        )  # fmt: skip
        self.generator = nn.Linear(dim, vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        s = self.src_embed(src) + self.pos[:, : src.shape[1]]
        t = self.tgt_embed(tgt) + self.pos[:, : tgt.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1])
        return self.generator(self.transformer(s, t, tgt_mask=mask, tgt_is_causal=True))


class LSTMLanguageModel(nn.Module):
    """Embedding -> 2-layer LSTM (batch first) -> Linear head over the vocabulary."""

    def __init__(self, vocab: int = 50, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out)


class GRUTagger(nn.Module):
    """Embedding -> Linear -> 2-layer bidirectional GRU (sequence first) -> Linear tag head."""

    def __init__(self, vocab: int = 50, width: int = 16, hidden: int = 24, tags: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.inp = nn.Linear(width, width)
        self.gru = nn.GRU(width, hidden, num_layers=2, bidirectional=True)
        self.head = nn.Linear(2 * hidden, tags)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inp(self.embed(tokens))).transpose(0, 1)  # (T, B, C)
        out, _ = self.gru(x)
        return self.head(out).transpose(0, 1)


class LSTMClassifier(nn.Module):
    """Embedding -> bidirectional LSTM; the classifier reads the last layer's final states ``h_n``."""

    def __init__(self, vocab: int = 50, width: int = 16, hidden: int = 20, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.lstm = nn.LSTM(width, hidden, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, (h_n, _) = self.lstm(self.embed(tokens))
        return self.head(torch.cat([h_n[-2], h_n[-1]], dim=-1))


# The timm models of the plug-in tests (tests/test_prune_zoo.py) and of bench/attach_time.py.
TIMM_MODELS = (
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "convnext_atto",
    "densenet121",
    "ghostnet_100",
    "repvgg_a0",
    "vit_tiny_patch16_224",
    "swin_tiny_patch4_window7_224",
)


def rnn_models() -> dict[str, tuple[Any, tuple[Any, ...], dict[str, Any]]]:
    """name -> (builder, example positional inputs, example keyword inputs): LSTM / GRU models."""
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    return {
        "lstm_lm": (LSTMLanguageModel, (tokens,), {}),
        "gru_tagger": (GRUTagger, (tokens,), {}),
        "lstm_classifier": (LSTMClassifier, (tokens,), {}),
    }


def prunable_translator() -> nn.Module:
    """The translation model with its attention opted in to pruning (what ``prunable_attention=True``
    does): heads, head dims and the stream prune; its export may keep PrunableMultiheadAttention."""
    from tg_kernels.nn import swap_multihead_attention

    model = Translator()
    swap_multihead_attention(model)
    return model


def task_family_models() -> dict[str, tuple[Any, tuple[Any, ...], dict[str, Any]]]:
    """name -> (builder, example positional inputs, example keyword inputs)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (2, 10), generator=g)
    return {
        "style_transfer": (StyleTransferNet, (torch.randn(1, 3, 32, 32, generator=g),), {}),
        "flownet_s": (FlowNetS, (torch.randn(1, 6, 32, 32, generator=g),), {}),
        "translation": (prunable_translator, (tokens, tokens[:, :8]), {}),
    }


def hf_models() -> dict[str, tuple[Any, tuple[Any, ...], dict[str, Any]]]:
    """Small Hugging Face configurations, built with random weights (needs ``transformers``)."""
    import transformers as tf

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    common = {"vocab_size": 100}
    return {
        "bert": (
            lambda: tf.BertForSequenceClassification(
                tf.BertConfig(**common, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=64, max_position_embeddings=16)
            ),
            (), {"input_ids": ids},
        ),
        "gpt2": (
            lambda: tf.GPT2LMHeadModel(
                tf.GPT2Config(**common, n_embd=32, n_layer=2, n_head=4, n_positions=16, use_cache=False,
                              bos_token_id=0, eos_token_id=0)
            ),
            (), {"input_ids": ids},
        ),
        "llama_gqa": (
            lambda: tf.LlamaForCausalLM(
                tf.LlamaConfig(**common, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=64, max_position_embeddings=16,
                               use_cache=False)
            ),
            (), {"input_ids": ids},
        ),
        "vit": (
            lambda: tf.ViTForImageClassification(
                tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8, num_labels=5)
            ),
            (), {"pixel_values": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))},
        ),
        "t5": (
            lambda: tf.T5ForConditionalGeneration(
                tf.T5Config(**common, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, use_cache=False,
                            decoder_start_token_id=0)
            ),
            (), {"input_ids": ids, "decoder_input_ids": ids},
        ),
    }  # fmt: skip


# Beyond the plug-in tests: timm and transformers models no issue names, to reach the 33-model zoo
# that bench/zoo_check.py runs (grouped convs, GroupNorm token mixers, unfold/fold attention, LeViT's
# BatchNorm attention, Res2Net's split-and-cascade, PVT's spatial-reduction attention, MixNet's
# split kernels; DistilBERT, ALBERT's shared layers, Mistral, Qwen2, OPT, GPT-NeoX's partial rotary
# embedding, BART's encoder-decoder).
EXTRA_TIMM_MODELS = (
    "regnetx_002",
    "poolformer_s12",
    "mobilevit_xxs",
    "levit_128s",
    "res2net50_14w_8s",
    "pvt_v2_b0",
    "mixnet_s",
)


def extra_hf_models() -> dict[str, tuple[Any, tuple[Any, ...], dict[str, Any]]]:
    """Small Hugging Face configurations with the library's defaults otherwise (``use_cache`` included)."""
    import transformers as tf

    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    small = {
        "vocab_size": 100,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 64,
        "max_position_embeddings": 16,
    }
    return {
        "distilbert": (
            lambda: tf.DistilBertForSequenceClassification(
                tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                    max_position_embeddings=16)
            ),
            (ids,), {},
        ),
        "albert": (lambda: tf.AlbertForMaskedLM(tf.AlbertConfig(**small, embedding_size=16)), (ids,), {}),
        "mistral": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**small, num_key_value_heads=2)), (ids,), {}),
        "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**small, num_key_value_heads=2)), (ids,), {}),
        "opt": (
            lambda: tf.OPTForCausalLM(
                tf.OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             ffn_dim=64, max_position_embeddings=16, word_embed_proj_dim=32)
            ),
            (ids,), {},
        ),
        "gpt_neox": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**small, rotary_pct=0.5)), (ids,), {}),
        "bart": (
            lambda: tf.BartForConditionalGeneration(
                tf.BartConfig(vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
                              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                              decoder_ffn_dim=64, max_position_embeddings=16)
            ),
            (ids,), {"decoder_input_ids": ids},
        ),
    }  # fmt: skip


def zoo() -> dict[str, tuple[Any, tuple[Any, ...], dict[str, Any]]]:
    """The whole zoo, name -> (builder, example positional inputs, example keyword inputs): timm at
    224 x 224 (10 classes), transformers, the paper's task families and the recurrent models."""
    import timm

    found: dict[str, tuple[Any, tuple[Any, ...], dict[str, Any]]] = {
        name: (lambda n=name: timm.create_model(n, num_classes=10), (torch.randn(1, 3, 224, 224),), {})
        for name in TIMM_MODELS + EXTRA_TIMM_MODELS
    }
    found.update(hf_models())
    found.update(extra_hf_models())
    found.update(task_family_models())
    found.update(rnn_models())
    return found
