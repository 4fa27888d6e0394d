"""CLIP text encoder that takes subject embeddings spliced into its token embeddings.

Built from transformers' Flax CLIP modules, so the parameter tree is exactly `FlaxCLIPTextModel`'s
(`{"text_model": {"embeddings", "encoder", "final_layer_norm"}}`) and its weights convert like CLIP's.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from transformers import CLIPTextConfig
from transformers.models.clip.modeling_flax_clip import FlaxCLIPEncoder, FlaxCLIPTextEmbeddings


def splice_subject_embeddings(token_embeds, ctx_embeddings, ctx_begin_pos):
    """Insert `ctx_embeddings` (B, Q, D) into `token_embeds` (B, T, D) before position `ctx_begin_pos` (B,).

    Returns (B, T + Q, D): tokens [0, p), the Q subject embeddings, tokens [p, T). `ctx_begin_pos` may
    differ per example and may be traced: the splice is a gather, not a Python loop.
    """
    num_queries = ctx_embeddings.shape[1]
    total = token_embeds.shape[1] + num_queries
    j = jnp.arange(total)[None, :]
    begin = jnp.asarray(ctx_begin_pos, jnp.int32).reshape(-1, 1)
    begin = jnp.broadcast_to(begin, (token_embeds.shape[0], 1))
    is_ctx = (j >= begin) & (j < begin + num_queries)
    token_idx = jnp.where(j < begin, j, j - num_queries).clip(0, token_embeds.shape[1] - 1)
    ctx_idx = (j - begin).clip(0, num_queries - 1)
    from_tokens = jnp.take_along_axis(token_embeds, token_idx[..., None], axis=1)
    from_ctx = jnp.take_along_axis(ctx_embeddings.astype(token_embeds.dtype), ctx_idx[..., None], axis=1)
    return jnp.where(is_ctx[..., None], from_ctx, from_tokens)


def encode_contexts(text_encoder, params, plain_ids, subject_ids, subject_embeds, ctx_begin_pos: int):
    """Hidden states of `plain_ids` (P, T) prompts and of `subject_ids` (S, T - Q) prompts with `subject_embeds`
    (S, Q, D) spliced in at `ctx_begin_pos`, in one batched pass: (P + S, T, D), the plain prompts first.
    `plain_ids` None: the subject prompts alone.

    A plain prompt goes in as its first T - Q tokens with the embeddings of its last Q tokens spliced in after
    them: the same sequence. Why one pass: with bf16 or fp16 weights XLA's CPU backend converts each weight to
    fp32 once per program and keeps the copy for every use, so two passes kept all 12 layers' fp32 weights alive
    from the first to the second (0.32 GiB, the peak of a whole 512x512 bf16 generation's temporaries).
    """
    subject_positions = jnp.full((subject_ids.shape[0],), ctx_begin_pos, jnp.int32)
    if plain_ids is None:
        return text_encoder.apply(params, subject_ids, subject_embeds, subject_positions)[0]
    num_queries = subject_embeds.shape[1]
    split = plain_ids.shape[1] - num_queries
    if split != subject_ids.shape[1]:
        raise ValueError(f"plain prompts have {plain_ids.shape[1]} tokens and subject prompts {subject_ids.shape[1]} "
                         f"plus {num_queries} subject embeddings: they must add up to the same length")
    tail = text_encoder.apply(params, plain_ids[:, split:], method=text_encoder.token_embeddings)
    ids = jnp.concatenate([plain_ids[:, :split], subject_ids])
    spliced = jnp.concatenate([tail, subject_embeds.astype(tail.dtype)])
    positions = jnp.concatenate([jnp.full((plain_ids.shape[0],), split, jnp.int32), subject_positions])
    return text_encoder.apply(params, ids, spliced, positions)[0]


class FlaxContextCLIPTextTransformer(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embeddings = FlaxCLIPTextEmbeddings(self.config, dtype=self.dtype)
        self.encoder = FlaxCLIPEncoder(self.config, dtype=self.dtype)
        self.final_layer_norm = nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype)

    def __call__(self, input_ids, ctx_embeddings=None, ctx_begin_pos=None, attention_mask=None):
        """Returns `(last_hidden_state, pooled_output)`.

        input_ids: (B, T). ctx_embeddings: (B, Q, D) or None. ctx_begin_pos: int or (B,) ints.
        attention_mask: optional (B, T) padding mask over the tokens (subject positions are always attended).
        """
        input_ids = input_ids.astype(jnp.int32)
        embeds = self.embeddings.token_embedding(input_ids)
        num_queries = 0
        if ctx_embeddings is not None:
            if ctx_begin_pos is None:
                raise ValueError("ctx_begin_pos is required when ctx_embeddings are given")
            num_queries = ctx_embeddings.shape[1]
            embeds = splice_subject_embeddings(embeds, ctx_embeddings, ctx_begin_pos)
            if attention_mask is not None:
                ones = jnp.ones((attention_mask.shape[0], num_queries), attention_mask.dtype)
                attention_mask = splice_subject_embeddings(
                    attention_mask[..., None], ones[..., None], ctx_begin_pos
                )[..., 0]
        length = embeds.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids ({input_ids.shape[1]} tokens) plus {num_queries} subject embeddings exceed "
                f"max_position_embeddings={self.config.max_position_embeddings}"
            )
        # Position embeddings are added after the splice, over the whole sequence (as diffusers does).
        hidden = embeds + self.embeddings.position_embedding(jnp.arange(length)[None])
        # FlaxCLIPEncoder applies CLIP's causal mask itself (the config is a CLIPTextConfig).
        hidden = self.encoder(hidden, attention_mask=attention_mask, deterministic=True, return_dict=False)[0]
        hidden = self.final_layer_norm(hidden)
        eos_index = self._eos_index(input_ids)
        if ctx_embeddings is not None:
            # The EOS token sits num_queries further right once the subject is spliced in before it.
            begin = jnp.broadcast_to(jnp.asarray(ctx_begin_pos).reshape(-1), eos_index.shape)
            eos_index = jnp.where(eos_index >= begin, eos_index + num_queries, eos_index)
        pooled = hidden[jnp.arange(hidden.shape[0]), eos_index]
        return hidden, pooled

    def _eos_index(self, input_ids):
        # Same rule as FlaxCLIPTextTransformer (legacy configs with eos_token_id == 2 use the largest id).
        if self.config.eos_token_id == 2:
            return input_ids.argmax(axis=-1)
        return (input_ids == self.config.eos_token_id).argmax(axis=-1)


class FlaxContextCLIPTextModel(nn.Module):
    """Top level whose params are `{"text_model": ...}`, exactly as `FlaxCLIPTextModel`'s."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.text_model = FlaxContextCLIPTextTransformer(self.config, dtype=self.dtype)

    def __call__(self, input_ids, ctx_embeddings=None, ctx_begin_pos=None, attention_mask=None):
        return self.text_model(input_ids, ctx_embeddings, ctx_begin_pos, attention_mask)

    def token_embeddings(self, input_ids):
        """The token embeddings of `input_ids` (B, T), before position embeddings: (B, T, D)."""
        return self.text_model.embeddings.token_embedding(input_ids.astype(jnp.int32))
