"""The BLIP-Diffusion subject encoder in Flax: BLIP-2 vision tower, Q-Former, projection layer.

Same math as diffusers' `Blip2QFormerModel.forward` in eval mode (dropout off). Module and parameter
names mirror the PyTorch ones (`visual_encoder.encoder.layers.0.self_attn.qkv` becomes
`visual_encoder/encoder/layers/0/self_attn/qkv`), so checkpoint conversion is a strict mechanical mapping.
Everything is configured from a transformers `Blip2Config` (the checkpoint's `qformer/config.json`).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
from transformers import Blip2Config
from transformers.modeling_flax_utils import ACT2FN

# diffusers' Q-Former turns a padding mask into an additive bias with this constant (not finfo.min).
_QFORMER_MASK_VALUE = -10000.0


def _split_heads(x, num_heads):
    return x.reshape(x.shape[:-1] + (num_heads, x.shape[-1] // num_heads))


def _attention(query, key, value, bias=None):
    """Plain softmax attention over (batch, length, heads, head_dim) tensors."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(query.shape[-1])
    if bias is not None:
        scores = scores + bias
    probs = nn.softmax(scores.astype(jnp.float32), axis=-1).astype(value.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, value)
    return out.reshape(out.shape[:2] + (-1,))


# --------------------------------------------------------------------------- vision tower (BLIP-2 ViT)


class FlaxBlip2VisionEmbeddings(nn.Module):
    config: object  # Blip2VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        class_embedding = self.param("class_embedding", nn.initializers.normal(1.0), (1, 1, cfg.hidden_size))
        position_embedding = self.param(
            "position_embedding", nn.initializers.normal(1.0), (1, num_positions, cfg.hidden_size)
        )
        patches = nn.Conv(
            cfg.hidden_size,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            name="patch_embedding",
        )(jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype))  # NCHW (PyTorch layout) -> NHWC
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, cfg.hidden_size)
        cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (batch, 1, cfg.hidden_size))
        embeddings = jnp.concatenate([cls, patches], axis=1)
        return embeddings + position_embedding[:, : embeddings.shape[1]].astype(self.dtype)


class FlaxBlip2Attention(nn.Module):
    """Vision self-attention with one fused qkv projection."""

    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        cfg = self.config
        qkv = nn.Dense(3 * cfg.hidden_size, use_bias=cfg.qkv_bias, dtype=self.dtype, name="qkv")(hidden_states)
        batch, length, _ = qkv.shape
        qkv = qkv.reshape(batch, length, 3, cfg.num_attention_heads, -1)
        out = _attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, name="projection")(out)


class FlaxBlip2MLP(nn.Module):
    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = ACT2FN[self.config.hidden_act](x)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(x)


class FlaxBlip2EncoderLayer(nn.Module):
    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        eps = self.config.layer_norm_eps
        h = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="layer_norm1")(x)
        x = x + FlaxBlip2Attention(self.config, self.dtype, name="self_attn")(h)
        h = nn.LayerNorm(epsilon=eps, dtype=self.dtype, name="layer_norm2")(x)
        return x + FlaxBlip2MLP(self.config, self.dtype, name="mlp")(h)


class _Layers(nn.Module):
    """Children named "0", "1", ... so paths read `layers/0/...` like PyTorch's `layers.0....`."""

    make_layer: object  # callable(index, name) -> nn.Module
    num_layers: int

    def setup(self):
        self.items = [self.make_layer(i, str(i)) for i in range(self.num_layers)]


class FlaxBlip2VisionModel(nn.Module):
    config: object  # Blip2VisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        x = FlaxBlip2VisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="pre_layernorm")(x)
        x = _VisionEncoder(cfg, self.dtype, name="encoder")(x)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x)


class _VisionEncoder(nn.Module):
    config: object
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.layers = _Layers(
            lambda i, name: FlaxBlip2EncoderLayer(self.config, self.dtype, name=name),
            self.config.num_hidden_layers,
        )

    def __call__(self, x):
        for layer in self.layers.items:
            x = layer(x)
        return x


# --------------------------------------------------------------------------- Q-Former (BERT-style)


class FlaxBlip2QFormerMultiHeadAttention(nn.Module):
    config: object  # Blip2QFormerConfig
    is_cross_attention: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, bias=None, encoder_hidden_states=None):
        cfg = self.config
        heads = cfg.num_attention_heads
        source = encoder_hidden_states if self.is_cross_attention else hidden_states
        query = nn.Dense(cfg.hidden_size, dtype=self.dtype, name="query")(hidden_states)
        key = nn.Dense(cfg.hidden_size, dtype=self.dtype, name="key")(source)
        value = nn.Dense(cfg.hidden_size, dtype=self.dtype, name="value")(source)
        return _attention(_split_heads(query, heads), _split_heads(key, heads), _split_heads(value, heads), bias)


class FlaxBlip2QFormerDenseOutput(nn.Module):
    """dense -> residual -> LayerNorm (BERT's SelfOutput and Output share this shape)."""

    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, residual):
        x = nn.Dense(self.config.hidden_size, dtype=self.dtype, name="dense")(hidden_states)
        return nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x + residual)


class FlaxBlip2QFormerAttention(nn.Module):
    config: object
    is_cross_attention: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, bias=None, encoder_hidden_states=None):
        attended = FlaxBlip2QFormerMultiHeadAttention(
            self.config, self.is_cross_attention, self.dtype, name="attention"
        )(hidden_states, bias, encoder_hidden_states)
        return FlaxBlip2QFormerDenseOutput(self.config, self.dtype, name="output")(attended, hidden_states)


class FlaxBlip2QFormerIntermediate(nn.Module):
    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="dense")(x)
        return ACT2FN[self.config.hidden_act](x)


class FlaxBlip2QFormerLayer(nn.Module):
    config: object
    layer_idx: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, bias, encoder_hidden_states, query_length):
        cfg = self.config
        attended = FlaxBlip2QFormerAttention(cfg, False, self.dtype, name="attention")(hidden_states, bias)
        queries, text = attended[:, :query_length], attended[:, query_length:]
        if self.layer_idx % cfg.cross_attention_frequency == 0:
            # Only the query positions read the image; the mask of the image features is all ones (no bias).
            queries = FlaxBlip2QFormerAttention(cfg, True, self.dtype, name="crossattention")(
                queries, None, encoder_hidden_states
            )
        # Separate feed-forward branches for query positions and text positions.
        inter_q = FlaxBlip2QFormerIntermediate(cfg, self.dtype, name="intermediate_query")(queries)
        out = FlaxBlip2QFormerDenseOutput(cfg, self.dtype, name="output_query")(inter_q, queries)
        # Both text-branch modules are always created so the parameter tree matches PyTorch's.
        inter_t = FlaxBlip2QFormerIntermediate(cfg, self.dtype, name="intermediate")(text)
        out_t = FlaxBlip2QFormerDenseOutput(cfg, self.dtype, name="output")(inter_t, text)
        return jnp.concatenate([out, out_t], axis=1)


class FlaxBlip2QFormerEncoder(nn.Module):
    config: object
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.layer = _Layers(
            lambda i, name: FlaxBlip2QFormerLayer(self.config, i, self.dtype, name=name),
            self.config.num_hidden_layers,
        )

    def __call__(self, hidden_states, bias, encoder_hidden_states, query_length):
        for layer in self.layer.items:
            hidden_states = layer(hidden_states, bias, encoder_hidden_states, query_length)
        return hidden_states


class FlaxBlip2TextEmbeddings(nn.Module):
    """Word + absolute position embeddings of the category text, learned queries in front, LayerNorm."""

    config: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, query_embeds):
        cfg = self.config
        words = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="word_embeddings")(input_ids)
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="position_embeddings")(
            jnp.arange(input_ids.shape[1])[None]
        )
        queries = jnp.broadcast_to(query_embeds.astype(self.dtype), (input_ids.shape[0],) + query_embeds.shape[1:])
        x = jnp.concatenate([queries, words + positions], axis=1)
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)


class FlaxProjLayer(nn.Module):
    """LayerNorm -> dense -> QuickGELU -> dense, plus the un-normalised input (diffusers' ProjLayer)."""

    hidden_size: int
    eps: float = 1e-12
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name="LayerNorm")(x)
        h = nn.Dense(4 * self.hidden_size, dtype=self.dtype, name="dense1")(h)
        h = ACT2FN["quick_gelu"](h)
        return nn.Dense(self.hidden_size, dtype=self.dtype, name="dense2")(h) + x


class FlaxBlip2QFormerModel(nn.Module):
    """Reference image + category tokens -> subject embeddings `(batch, num_query_tokens, hidden_size)`.

    `pixel_values` is `(batch or 1, 3, H, W)` (a single image is shared by every category);
    `input_ids`/`attention_mask` are the BERT-tokenized categories, `(batch, length)`.
    """

    config: Blip2Config
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask, pixel_values):
        cfg = self.config
        qcfg = cfg.qformer_config
        num_queries = cfg.num_query_tokens
        query_tokens = self.param("query_tokens", nn.initializers.zeros, (1, num_queries, qcfg.hidden_size))
        x = FlaxBlip2TextEmbeddings(qcfg, self.dtype, name="embeddings")(input_ids, query_tokens)

        image = FlaxBlip2VisionModel(cfg.vision_config, self.dtype, name="visual_encoder")(pixel_values)
        image = jnp.broadcast_to(image, (x.shape[0],) + image.shape[1:])

        mask = jnp.concatenate([jnp.ones((x.shape[0], num_queries)), attention_mask.astype(jnp.float32)], axis=1)
        bias = ((1.0 - mask.astype(self.dtype)) * _QFORMER_MASK_VALUE)[:, None, None, :]
        x = FlaxBlip2QFormerEncoder(qcfg, self.dtype, name="encoder")(x, bias, image, num_queries)
        return FlaxProjLayer(qcfg.hidden_size, 1e-12, self.dtype, name="proj_layer")(x[:, :num_queries])
