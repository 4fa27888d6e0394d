"""Prompt-to-prompt attention control inside diffusers' `FlaxUNet2DConditionModel`, without copying it.

The UNet's `FlaxAttention.__call__` is intercepted (`flax.linen.intercept_methods`); the interceptor computes
the same attention, hands the probabilities to the controller, and sows the maps LocalBlend needs. Every
schedule is an array indexed by the (traced) step, so the whole edit loop stays one compiled program.

Semantics follow LAVIS's `ptp_utils` (AttentionRefine + LocalBlend), for a batch of two branches
[source, edited] in which only the conditional half of the guidance batch is controlled:
- cross-attention: the edited branch takes the source's maps through the token mapper (refinement
  alignment of the two token sequences), during the `cross_replace_steps` window;
- self-attention: during the `self_replace_steps` window the edited branch takes the source's maps for
  maps of at most the *control resolution* (LAVIS: 16x16 at 512x512, i.e. the spatial size of the
  lowest-resolution down block with cross-attention; the same rule holds for other sizes and UNets);
- LocalBlend: cross-attention maps of the source subject word in the down and up cross-attentions at the
  control resolution (LAVIS: the 16x16 ones), summed over steps, averaged over layers and heads,
  max-pooled 3x3, resized (nearest) to the latents, normalised by their max and thresholded; outside the
  mask the edited latents are replaced by the source latents after every step.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from diffusers.models.attention_flax import FlaxAttention

CONTROL_COLLECTION = "p2p"  # the flax collection the interceptor sows LocalBlend maps into


# --------------------------------------------------------------------------- host-side schedules


def time_window(num_steps: int, fraction, argname: str = "cross_replace_steps", scale_by_rows: bool = True) -> np.ndarray:
    """0/1 per step (num_steps + 1 rows: PNDM runs one step more than asked) for a fraction `f` (window
    [0, f)) or a (start, end) pair of fractions. LAVIS scales cross-attention windows by the number of rows
    and self-attention ones by num_steps (`scale_by_rows=False`)."""
    if isinstance(fraction, (int, float)) and not isinstance(fraction, bool):
        bounds = (0.0, float(fraction))
    elif isinstance(fraction, (tuple, list)) and len(fraction) == 2:
        bounds = (float(fraction[0]), float(fraction[1]))
    else:
        raise TypeError(f"{argname} must be a fraction or a (start, end) pair of fractions, not {fraction!r}")
    if not all(0.0 <= b <= 1.0 for b in bounds) or bounds[0] > bounds[1]:
        raise ValueError(f"{argname}={fraction!r}: fractions must lie in [0, 1] with start <= end")
    rows = num_steps + 1
    scale = rows if scale_by_rows else num_steps
    window = np.zeros(rows, np.float32)
    window[int(bounds[0] * scale):int(bounds[1] * scale)] = 1.0
    return window


def refinement_mapper(source_ids: list[int], target_ids: list[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Global alignment of two token sequences (gap 0, match 1, mismatch -1): for each target position, the
    source position it copies attention from (`mapper`) and whether it has one (`alphas`)."""
    n, m = len(source_ids), len(target_ids)
    score = np.zeros((n + 1, m + 1), np.int64)
    move = np.zeros((n + 1, m + 1), np.int64)  # 1: from the left (target insert), 2: from above, 3: diagonal
    move[0, 1:], move[1:, 0] = 1, 2
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            left, up = score[i, j - 1], score[i - 1, j]
            diag = score[i - 1, j - 1] + (1 if source_ids[i - 1] == target_ids[j - 1] else -1)
            best = max(left, up, diag)
            score[i, j] = best
            move[i, j] = 1 if best == left else 2 if best == up else 3  # ties prefer left, then up
    pairs = []
    i, j = n, m
    while i > 0 or j > 0:
        if move[i, j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif move[i, j] == 1:
            j -= 1
            pairs.append((j, -1))
        else:
            i -= 1
    pairs.reverse()
    mapper = np.arange(max_len, dtype=np.int32)
    alphas = np.ones(max_len, np.float32)
    for j, i in pairs:
        mapper[j] = i if i >= 0 else max_len - 1  # no counterpart: any index, its weight is 0 (LAVIS: -1)
        alphas[j] = float(i != -1)
    return mapper, alphas


PLACEHOLDER = -1  # token id of the subject-embedding positions (matches no real token)


def lavis_word_positions(text: str, word: str, tokenizer, max_len: int = 77) -> list[int]:
    """LAVIS's (prompt-to-prompt's) `get_word_inds`: the token positions (BOS = 0) of the words of `text`,
    split on single spaces, that equal `word`; a word's tokens are found by adding up the lengths of the
    decoded tokens. Positions past `max_len` are dropped (LAVIS would fail there)."""
    split_text = text.split(" ")
    places = [i for i, w in enumerate(split_text) if w == word]
    out = []
    if places:
        ids = tokenizer(text).input_ids
        words_encode = [tokenizer.decode([item]).strip("#") for item in ids][1:-1]
        cur_len, ptr = 0, 0
        for i in range(len(words_encode)):
            if ptr >= len(split_text):  # decoded lengths ran past the text (LAVIS: IndexError)
                break
            cur_len += len(words_encode[i])
            if ptr in places:
                out.append(i + 1)
            if cur_len >= len(split_text[ptr]):
                ptr += 1
                cur_len = 0
    return [p for p in out if p < max_len]


def replacement_mapper(source_ids: list[int], target_ids: list[int], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """AttentionReplace: position-wise word swap. The target, without its subject placeholders, must have as
    many tokens as the source. Returns a (max_len, max_len) source->target matrix and the target alphas
    (0 at the placeholders, which keep their own maps)."""
    real = [j for j, token in enumerate(target_ids) if token != PLACEHOLDER]
    if len(real) != len(source_ids):
        raise ValueError(
            f"controller='replace' needs source and edited prompts of the same token length "
            f"({len(source_ids)} vs {len(real)}); use controller='refine'"
        )
    matrix = np.zeros((max_len, max_len), np.float32)
    for i, j in enumerate(real):
        matrix[i, j] = 1.0
    shift = len(target_ids) - len(source_ids)
    for k in range(len(target_ids), max_len):  # padding: position k of the edited prompt reads source k - shift
        matrix[k - shift, k] = 1.0
    alphas = np.array([0.0 if token == PLACEHOLDER else 1.0 for token in target_ids] + [1.0] * (max_len - len(target_ids)), np.float32)
    return matrix, alphas


# --------------------------------------------------------------------------- the traced controller


@dataclasses.dataclass(frozen=True)
class EditStatic:
    """The static (shape-like) part of an edit; the rest travels as arrays (see `schedule_arrays`)."""

    control_pixels: int  # spatial size (h*w) of the control resolution
    use_local_blend: bool = True
    mode: str = "refine"  # "refine" (mapper: (77,) indices) or "replace" (mapper: (77, 77) matrix)


def schedule_arrays(num_steps, cross_replace_steps, self_replace_steps, mapper, alphas, blend_words, lb_threshold,
                    equalizer=None):
    """The traced arrays of one edit: step-indexed windows, the token mapper, LocalBlend's word weights and
    AttentionReweight's per-token scales (`equalizer`, ones when unused)."""
    return {
        "equalizer": jnp.ones(len(alphas), jnp.float32) if equalizer is None else jnp.asarray(equalizer, jnp.float32),
        "cross_alpha": jnp.asarray(time_window(num_steps, cross_replace_steps, argname="cross_replace_steps")),
        "self_window": jnp.asarray(time_window(num_steps, self_replace_steps, "self_replace_steps", scale_by_rows=False)),
        "mapper": jnp.asarray(mapper),  # refine: (77,) source index per target position; replace: (77, 77)
        "alphas": jnp.asarray(alphas),  # (77,) 1 where the target token has a source counterpart
        "blend_words": jnp.asarray(blend_words),  # (77,) 1 at the source-prompt tokens of the subject word
        "lb_threshold": jnp.asarray(lb_threshold, jnp.float32),
    }


def _control_probs(probs, heads, is_cross, step, schedule, arrays, guided):
    """Replace the edited branch's maps by the source's (conditional half only). probs: (B*heads, q, k)."""
    rows = probs.shape[0]
    half = rows // 2 if guided else 0
    cond = probs[half:].reshape(2, heads, *probs.shape[1:])
    base, edited = cond[0], cond[1]
    if is_cross:
        if schedule.mode == "replace":
            moved = jnp.einsum("hqs,st->hqt", base, arrays["mapper"])
        else:
            moved = base[..., arrays["mapper"]]
        refined = (moved * arrays["alphas"] + edited * (1 - arrays["alphas"])) * arrays["equalizer"]
        alpha = arrays["cross_alpha"][step]
        new_edited = refined * alpha + edited * (1 - alpha)
    elif probs.shape[1] <= schedule.control_pixels:
        window = arrays["self_window"][step]
        new_edited = base * window + edited * (1 - window)
    else:
        return probs
    cond = jnp.stack([base, new_edited]).reshape(-1, *probs.shape[1:])
    return jnp.concatenate([probs[:half], cond]) if half else cond


def make_interceptor(schedule: EditStatic, arrays: dict, step, guided: bool, blend_places=("down", "up")):
    """An interceptor for `nn.intercept_methods` that runs the UNet's attentions under control at `step`."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, FlaxAttention):
            return next_fun(*args, **kwargs)
        hidden = args[0]
        encoder = args[1] if len(args) > 1 else kwargs.get("context")
        is_cross = encoder is not None
        if not is_cross and hidden.shape[1] > schedule.control_pixels:
            return next_fun(*args, **kwargs)  # never controlled: the pipeline's attention kernel runs it
        source = hidden if encoder is None else encoder
        query = module.reshape_heads_to_batch_dim(module.query(hidden))
        key = module.reshape_heads_to_batch_dim(module.key(source))
        value = module.reshape_heads_to_batch_dim(module.value(source))
        probs = nn.softmax(jnp.einsum("bid,bjd->bij", query, key) * module.scale, axis=2)
        place = module.scope.path[0].split("_")[0]  # "down_blocks_1" -> "down", "mid_block" -> "mid"
        if is_cross and place in blend_places and probs.shape[1] == schedule.control_pixels and schedule.use_local_blend:
            half = probs.shape[0] // 2 if guided else 0
            base = probs[half:half + module.heads]  # the source branch's conditional maps, before replacement
            module.sow(CONTROL_COLLECTION, "blend_map", jnp.einsum("hqk,k->q", base, arrays["blend_words"]) / module.heads)
        probs = _control_probs(probs, module.heads, is_cross, step, schedule, arrays, guided)
        out = module.reshape_batch_dim_to_heads(jnp.einsum("bij,bjd->bid", probs, value))
        return module.proj_attn(out)

    return interceptor


def collected_blend_map(collections) -> jax.Array:
    """Mean over the blend layers of the sown maps: (q,)."""
    maps = [leaf for leaf in jax.tree_util.tree_leaves(collections.get(CONTROL_COLLECTION, {}))]
    if not maps:
        raise ValueError("no cross-attention layer at the control resolution: LocalBlend cannot run")
    return jnp.mean(jnp.stack(maps), axis=0)


def local_blend(latents, blend_sum, schedule: EditStatic, threshold):
    """latents (2, C, h, w) = [source, edited]; blend_sum (q,) summed over steps. Keeps the edited latents
    only inside the subject mask."""
    h, w = latents.shape[2:]
    scale = int(round(np.sqrt(h * w / schedule.control_pixels)))
    mh, mw = h // scale, w // scale
    mask = blend_sum.reshape(mh, mw)
    mask = jax.lax.reduce_window(mask, -jnp.inf, jax.lax.max, (3, 3), (1, 1), ((1, 1), (1, 1)))
    rows = (jnp.arange(h) * mh) // h  # nearest resize, as torch's default interpolate
    cols = (jnp.arange(w) * mw) // w
    mask = mask[rows][:, cols]
    mask = (mask / mask.max()) > threshold
    source, edited = latents[:1], latents[1:]
    return jnp.concatenate([source, source + mask.astype(latents.dtype) * (edited - source)])
