"""LAVIS BLIP-Diffusion checkpoint -> diffusers PyTorch state dicts, one per pipeline component.

Input: the flat state dict of LAVIS' `BlipDiffusion` model (`model.state_dict()`, or the files of the
released `blip-diffusion.tar.gz` merged with their module prefixes: `blip_model/blip_weight.pt` under
`blip.`, `proj_layer/proj_weight.pt` under `proj_layer.`, `text_encoder/pytorch_model.bin` under
`text_encoder.`, `unet/diffusion_pytorch_model.bin` under `unet.`, `vae/diffusion_pytorch_model.bin`
under `vae.`), as numpy arrays.

What LAVIS stores (lavis/models/blip_diffusion_models/blip_diffusion.py):

* `blip.*`: a BLIP-2 `Blip2Qformer` with the `clip_L` vision tower (lavis/models/clip_vit.py: a CLIP
  ViT-L/14 without its last layer, `nn.MultiheadAttention` with a fused `in_proj_weight`/`in_proj_bias`)
  and a BERT Q-Former (lavis/models/blip2_models/Qformer.py, `attention.self.query` etc.). This is the
  part whose names differ from diffusers' `Blip2QFormerModel`.
* `proj_layer.*`: the same `ProjLayer` as diffusers' `Blip2QFormerModel.proj_layer`.
* `text_encoder.*`, `unet.*`, `vae.*` (and `controlnet.*` for the ControlNet variants): diffusers /
  transformers modules (`CtxCLIPTextModel`, `UNet2DConditionModel`, `AutoencoderKL`, `ControlNetModel`),
  so already diffusers-named, not Stable-Diffusion (LDM) names. The one difference is that LAVIS pins
  diffusers<=0.16, whose `AutoencoderKL` mid-block attention was the deprecated `AttentionBlock`
  (`query`/`key`/`value`/`proj_attn`); today's `Attention` calls them `to_q`/`to_k`/`to_v`/`to_out.0`.
  Both spellings are accepted.

Every input key is either consumed exactly once by the tables below or listed in `UNUSED_KEYS` (by exact
name, with the reason). Anything else, a tensor missing from a module that is present, a required module
that is absent, a gap in a layer stack, or two spellings of the same tensor raise `ConversionError`
(a `ValueError`) naming the keys. The output holds diffusers' `state_dict()` names minus non-parameter
buffers (`position_ids`); whole layers at the end of a stack or whole blocks cannot be known to be
missing without the model config, and are caught when the result is loaded against the model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from convert.mapping import ConversionError

COMPONENTS = ("qformer", "text_encoder", "unet", "vae")
OPTIONAL_COMPONENTS = ("controlnet",)

# LAVIS keys that BLIP-Diffusion's diffusers pipeline has no use for (exact names, never patterns).
_LM_HEAD = "BLIP-2 Q-Former language-model head (BertLMHeadModel.cls), used only for BLIP-2 pretraining"
UNUSED_KEYS: dict[str, str] = {
    "blip.Qformer.bert.embeddings.position_ids": "buffer torch.arange(max_positions); rebuilt by the model",
    "text_encoder.text_model.embeddings.position_ids": "buffer torch.arange(max_positions); rebuilt by the model",
    "blip.Qformer.cls.predictions.bias": _LM_HEAD,
    "blip.Qformer.cls.predictions.decoder.weight": _LM_HEAD + " (tied to the word embeddings)",
    "blip.Qformer.cls.predictions.decoder.bias": _LM_HEAD + " (tied to cls.predictions.bias)",
    "blip.Qformer.cls.predictions.transform.dense.weight": _LM_HEAD,
    "blip.Qformer.cls.predictions.transform.dense.bias": _LM_HEAD,
    "blip.Qformer.cls.predictions.transform.LayerNorm.weight": _LM_HEAD,
    "blip.Qformer.cls.predictions.transform.LayerNorm.bias": _LM_HEAD,
    "blip.vision_proj.weight": "BLIP-2 image-text contrastive projection (pretraining only)",
    "blip.vision_proj.bias": "BLIP-2 image-text contrastive projection (pretraining only)",
    "blip.text_proj.weight": "BLIP-2 image-text contrastive projection (pretraining only)",
    "blip.text_proj.bias": "BLIP-2 image-text contrastive projection (pretraining only)",
    "blip.itm_head.weight": "BLIP-2 image-text matching head (pretraining only)",
    "blip.itm_head.bias": "BLIP-2 image-text matching head (pretraining only)",
    "blip.temp": "BLIP-2 contrastive temperature (pretraining only)",
    "ctx_embeddings_cache": "LAVIS cache of subject embeddings for subject fine-tuning (zeros unless fine-tuned); "
    "the diffusers pipeline computes them from the reference image with the Q-Former",
}


@dataclass(frozen=True)
class _Slot:
    target: str  # suffix under the unit's target prefix (diffusers name)
    sources: tuple[str, ...]  # accepted suffixes under the unit's source prefix (LAVIS names, aliases)
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    group: str | None = None  # optional slots: all of a group or none


@dataclass(frozen=True)
class _Unit:
    """A module: source prefix template -> target prefix template, and its tensors.

    Templates are literal dotted names with `{name}` placeholders; a placeholder matches `patterns[name]`
    (default: a layer index). `required`: the module must be there (no placeholders allowed). `index`: a
    placeholder whose values must run 0..n-1 (a layer stack with no gaps).
    """

    component: str
    source: str
    target: str
    slots: tuple[_Slot, ...]
    patterns: tuple[tuple[str, str], ...] = ()
    required: bool = False
    index: str | None = None


def _s(target: str, *sources: str, transform=None, group=None) -> _Slot:
    return _Slot(target, sources or (target,), transform, group)


def _same(*names: str, group: str | None = None) -> tuple[_Slot, ...]:
    return tuple(_s(n, group=group) for n in names)


def _wb(*modules: str, group: str | None = None) -> tuple[_Slot, ...]:
    """`weight` and `bias` of each module, same name on both sides."""
    return tuple(_s(f"{m}.{p}" if m else p, group=group) for m in modules for p in ("weight", "bias"))


def _renamed_wb(pairs: dict[str, str], group: str | None = None) -> tuple[_Slot, ...]:
    """`weight` and `bias` of modules renamed source -> target."""
    return tuple(_s(f"{t}.{p}", f"{s}.{p}", group=group) for s, t in pairs.items() for p in ("weight", "bias"))


def _ndim_then(ndim: int, name: str, reshape: Callable[[np.ndarray], np.ndarray]):
    def transform(array: np.ndarray) -> np.ndarray:
        if np.ndim(array) != ndim:
            raise ValueError(f"{name}: expected a {ndim}-d array, got shape {tuple(np.shape(array))}")
        return reshape(np.asarray(array))

    return transform


# ----------------------------------------------------------------------------------------------------
# Q-Former: LAVIS Blip2Qformer (BERT Q-Former + clip_L ViT + ln_vision) and ProjLayer
# ----------------------------------------------------------------------------------------------------


def _bert_attention(source: str, target: str, group: str | None = None) -> tuple[_Slot, ...]:
    # LAVIS BertAttention: .self.{query,key,value} and .output.{dense,LayerNorm};
    # diffusers (transformers Blip2QFormerAttention): .attention.{query,key,value} and .output.*
    pairs = {f"{source}.self.{p}": f"{target}.attention.{p}" for p in ("query", "key", "value")}
    pairs.update({f"{source}.output.{p}": f"{target}.output.{p}" for p in ("dense", "LayerNorm")})
    return _renamed_wb(pairs, group=group)


_QFORMER_LAYER = (
    _bert_attention("attention", "attention")
    + _bert_attention("crossattention", "crossattention", group="crossattention")
    + _wb("intermediate.dense", "output.dense", "output.LayerNorm")
    + _wb("intermediate_query.dense", "output_query.dense", "output_query.LayerNorm")
)

_VISION_LAYER = (
    _renamed_wb({"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"})
    # nn.MultiheadAttention's fused (q; k; v) projection is the same layout as Blip2Attention.qkv.
    + (_s("self_attn.qkv.weight", "attn.in_proj_weight"), _s("self_attn.qkv.bias", "attn.in_proj_bias"))
    + _renamed_wb({"attn.out_proj": "self_attn.projection"})
)

_QFORMER_LAYER_UNIT = _Unit(
    "qformer", "blip.Qformer.bert.encoder.layer.{i}", "encoder.layer.{i}", _QFORMER_LAYER, index="i"
)

_QFORMER_UNITS = (
    _Unit("qformer", "blip", "", (_s("query_tokens"),), required=True),
    _Unit(
        "qformer",
        "blip.Qformer.bert.embeddings",
        "embeddings",
        (_s("word_embeddings.weight"), _s("position_embeddings.weight")) + _wb("LayerNorm"),
        required=True,
    ),
    _QFORMER_LAYER_UNIT,
    _Unit(
        "qformer",
        "blip.visual_encoder",
        "visual_encoder",
        (
            _s(
                "embeddings.class_embedding",
                "class_embedding",
                transform=_ndim_then(1, "class_embedding", lambda a: a.reshape(1, 1, -1)),
            ),
            _s(
                "embeddings.position_embedding",
                "positional_embedding",
                transform=_ndim_then(2, "positional_embedding", lambda a: a[None]),
            ),
            _s("embeddings.patch_embedding.weight", "conv1.weight"),  # both bias-free
        )
        + _renamed_wb({"ln_pre": "pre_layernorm"}),
        required=True,
    ),
    _Unit(
        "qformer",
        "blip.visual_encoder.transformer.resblocks.{i}",
        "visual_encoder.encoder.layers.{i}",
        _VISION_LAYER,
        index="i",
    ),
    # LAVIS applies ln_vision to the ViT output; diffusers' Blip2VisionModel calls it post_layernorm.
    _Unit("qformer", "blip.ln_vision", "visual_encoder.post_layernorm", _wb(""), required=True),
    _Unit("qformer", "proj_layer", "proj_layer", _wb("dense1", "dense2", "LayerNorm"), required=True),
)

# ----------------------------------------------------------------------------------------------------
# Text encoder: LAVIS CtxCLIPTextModel == diffusers ContextCLIPTextModel (transformers CLIP names)
# ----------------------------------------------------------------------------------------------------

_TEXT_UNITS = (
    _Unit(
        "text_encoder",
        "text_encoder.text_model.embeddings",
        "text_model.embeddings",
        _same("token_embedding.weight", "position_embedding.weight"),
        required=True,
    ),
    _Unit(
        "text_encoder",
        "text_encoder.text_model.encoder.layers.{i}",
        "text_model.encoder.layers.{i}",
        _wb("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
        + _wb("layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"),
        index="i",
    ),
    _Unit(
        "text_encoder",
        "text_encoder.text_model.final_layer_norm",
        "text_model.final_layer_norm",
        _wb(""),
        required=True,
    ),
)

# ----------------------------------------------------------------------------------------------------
# UNet / ControlNet / VAE: diffusers modules in LAVIS too; only the prefix goes
# ----------------------------------------------------------------------------------------------------

_RESNET_CORE = _wb("norm1", "conv1", "norm2", "conv2")
_SHORTCUT = _wb("conv_shortcut", group="conv_shortcut")
_TRANSFORMER_BLOCK = (
    _wb("norm1", "norm2", "norm3")
    + _same(*(f"attn{a}.to_{p}.weight" for a in (1, 2) for p in "qkv"))
    + _wb("attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
)


def _unet_like_units(component: str, block: str, top: tuple[tuple[str, tuple[_Slot, ...]], ...]):
    p = component
    blocks = (("block", block),)
    units = [_Unit(component, f"{p}.{name}", name, slots, required=True) for name, slots in top]
    units += [
        _Unit(
            component,
            f"{p}.{{block}}.resnets.{{j}}",
            "{block}.resnets.{j}",
            _RESNET_CORE + _wb("time_emb_proj") + _SHORTCUT,
            patterns=blocks,
        ),
        _Unit(
            component,
            f"{p}.{{block}}.attentions.{{j}}",
            "{block}.attentions.{j}",
            _wb("norm", "proj_in", "proj_out"),
            patterns=blocks,
        ),
        _Unit(
            component,
            f"{p}.{{block}}.attentions.{{j}}.transformer_blocks.{{t}}",
            "{block}.attentions.{j}.transformer_blocks.{t}",
            _TRANSFORMER_BLOCK,
            patterns=blocks,
        ),
        _Unit(component, f"{p}.down_blocks.{{b}}.downsamplers.{{j}}", "down_blocks.{b}.downsamplers.{j}", _wb("conv")),
    ]
    return units


_TIME_EMBEDDING = _wb("linear_1", "linear_2")

_UNET_UNITS = tuple(
    _unet_like_units(
        "unet",
        r"down_blocks\.\d+|mid_block|up_blocks\.\d+",
        (("conv_in", _wb("")), ("time_embedding", _TIME_EMBEDDING), ("conv_norm_out", _wb("")), ("conv_out", _wb(""))),
    )
    + [_Unit("unet", "unet.up_blocks.{b}.upsamplers.{j}", "up_blocks.{b}.upsamplers.{j}", _wb("conv"))]
)

_CONTROLNET_UNITS = tuple(
    _unet_like_units(
        "controlnet",
        r"down_blocks\.\d+|mid_block",
        (
            ("conv_in", _wb("")),
            ("time_embedding", _TIME_EMBEDDING),
            ("controlnet_cond_embedding", _wb("conv_in", "conv_out")),
            ("controlnet_mid_block", _wb("")),
        ),
    )
    + [
        _Unit(
            "controlnet",
            "controlnet.controlnet_cond_embedding.blocks.{j}",
            "controlnet_cond_embedding.blocks.{j}",
            _wb(""),
            index="j",
        ),
        _Unit("controlnet", "controlnet.controlnet_down_blocks.{j}", "controlnet_down_blocks.{j}", _wb(""), index="j"),
    ]
)

# diffusers<=0.16 AttentionBlock names (what LAVIS saved) -> today's Attention names; both accepted.
_VAE_ATTENTION = _wb("group_norm") + tuple(
    _s(f"{new}.{p}", f"{new}.{p}", f"{old}.{p}")
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn"))
    for p in ("weight", "bias")
)

_VAE_UNITS = tuple(
    [
        _Unit("vae", f"vae.{name}", name, _wb(""), required=True)
        for name in (
            "encoder.conv_in",
            "encoder.conv_norm_out",
            "encoder.conv_out",
            "decoder.conv_in",
            "decoder.conv_norm_out",
            "decoder.conv_out",
            "quant_conv",
            "post_quant_conv",
        )
    ]
    + [
        _Unit(
            "vae",
            "vae.{block}.resnets.{j}",
            "{block}.resnets.{j}",
            _RESNET_CORE + _SHORTCUT,
            patterns=(("block", r"encoder\.(?:down_blocks\.\d+|mid_block)|decoder\.(?:up_blocks\.\d+|mid_block)"),),
        ),
        _Unit(
            "vae", "vae.encoder.down_blocks.{b}.downsamplers.{j}", "encoder.down_blocks.{b}.downsamplers.{j}", _wb("conv")
        ),
        _Unit("vae", "vae.decoder.up_blocks.{b}.upsamplers.{j}", "decoder.up_blocks.{b}.upsamplers.{j}", _wb("conv")),
        _Unit(
            "vae",
            "vae.{coder}.mid_block.attentions.{j}",
            "{coder}.mid_block.attentions.{j}",
            _VAE_ATTENTION,
            patterns=(("coder", "encoder|decoder"),),
        ),
    ]
)

_UNITS: tuple[_Unit, ...] = _QFORMER_UNITS + _TEXT_UNITS + _UNET_UNITS + _VAE_UNITS + _CONTROLNET_UNITS

# ----------------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _template_regex(template: str, patterns: dict[str, str]) -> str:
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>{patterns.get(m.group(1), r'[0-9]+')})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return "".join(out)


def _compile(unit: _Unit) -> re.Pattern:
    patterns = dict(unit.patterns)
    sources = sorted({s for slot in unit.slots for s in slot.sources}, key=len, reverse=True)
    alternatives = "|".join(re.escape(s) for s in sources)
    return re.compile(f"(?P<_prefix>{_template_regex(unit.source, patterns)})\\.(?P<_suffix>{alternatives})")


_COMPILED = tuple(_compile(u) for u in _UNITS)


def _join(prefix: str, suffix: str) -> str:
    return f"{prefix}.{suffix}" if prefix else suffix


def _check_tables() -> None:
    for unit in _UNITS:
        names = _PLACEHOLDER.findall(unit.source)
        if unit.required and names:
            raise AssertionError(f"required unit {unit.source} has placeholders")
        if unit.index is not None and unit.index not in names:
            raise AssertionError(f"unit {unit.source}: index {unit.index} is not a placeholder")
        if set(_PLACEHOLDER.findall(unit.target)) != set(names):
            raise AssertionError(f"unit {unit.source} -> {unit.target}: placeholders differ")
        sources = [s for slot in unit.slots for s in slot.sources]
        targets = [slot.target for slot in unit.slots]
        if len(set(sources)) != len(sources) or len(set(targets)) != len(targets):
            raise AssertionError(f"unit {unit.source}: a source or target name appears twice")
    for key in UNUSED_KEYS:
        if any(rx.fullmatch(key) for rx in _COMPILED):
            raise AssertionError(f"unused key {key} is also mapped")


_check_tables()


def _limited(items, limit: int = 100) -> str:
    items = sorted(items)
    text = ", ".join(items[:limit])
    return text + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def lavis_to_diffusers(state_dict: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Split and rename a LAVIS BLIP-Diffusion state dict into diffusers' per-component state dicts.

    Returns {"qformer", "text_encoder", "unet", "vae"} (+ "controlnet" when the input has `controlnet.*`
    keys), each a dict diffusers PyTorch name -> array. Arrays are passed through (no copy, dtype kept),
    except the vision class / position embeddings, which get diffusers' leading unit axes.
    Raises `ConversionError` (a `ValueError`) naming every unknown, missing or doubly given key.
    """
    # instances[(unit index, prefix)] = (placeholder values, {source suffix: input key})
    instances: dict[tuple[int, str], tuple[dict[str, str], dict[str, str]]] = {}
    unknown, ambiguous = [], []
    for key in state_dict:
        if key in UNUSED_KEYS:
            continue
        hits = [(u, m) for u, rx in enumerate(_COMPILED) if (m := rx.fullmatch(key))]
        if not hits:
            unknown.append(key)
            continue
        if len(hits) > 1:
            ambiguous.append(key)
            continue
        u, m = hits[0]
        values = {k: v for k, v in m.groupdict().items() if not k.startswith("_")}
        instances.setdefault((u, m.group("_prefix")), (values, {}))[1][m.group("_suffix")] = key

    present_components = {_UNITS[u].component for u, _ in instances}
    wanted = set(COMPONENTS) | (present_components & set(OPTIONAL_COMPONENTS))

    missing, doubled, bad = [], [], []
    out: dict[str, dict[str, np.ndarray]] = {c: {} for c in COMPONENTS + OPTIONAL_COMPONENTS if c in wanted}
    indices: dict[tuple[int, tuple], set[int]] = {}
    cross_layers: set[int] = set()
    qformer_layer_unit = _UNITS.index(_QFORMER_LAYER_UNIT)

    for (u, prefix), (values, found) in instances.items():
        unit = _UNITS[u]
        groups_present = {s.group for s in unit.slots if s.group and any(src in found for src in s.sources)}
        if u == qformer_layer_unit and "crossattention" in groups_present:
            cross_layers.add(int(values["i"]))
        if unit.index is not None:
            rest = tuple(sorted((k, v) for k, v in values.items() if k != unit.index))
            indices.setdefault((u, rest), set()).add(int(values[unit.index]))
        target_prefix = unit.target.format(**values)
        for slot in unit.slots:
            given = [src for src in slot.sources if src in found]
            if len(given) > 1:
                doubled.append(" and ".join(found[src] for src in given))
                continue
            if not given:
                if slot.group is None or slot.group in groups_present:
                    alias = f" (or {', '.join(slot.sources[1:])})" if len(slot.sources) > 1 else ""
                    missing.append(_join(prefix, slot.sources[0]) + alias)
                continue
            key = found[given[0]]
            array = state_dict[key]
            if slot.transform is not None:
                try:
                    array = slot.transform(array)
                except ValueError as e:
                    bad.append(f"{key}: {e}")
                    continue
            out[unit.component][_join(target_prefix, slot.target)] = array

    # Modules that must be there, for each component returned.
    seen_units = {u for u, _ in instances}
    for u, unit in enumerate(_UNITS):
        if unit.required and unit.component in wanted and u not in seen_units:
            missing.extend(_join(unit.source, s.sources[0]) for s in unit.slots if s.group is None)

    # Layer stacks without gaps.
    for (u, rest), present in indices.items():
        unit = _UNITS[u]
        for i in sorted(set(range(max(present) + 1)) - present):
            layer = unit.source.format(**dict(rest), **{unit.index: i})
            missing.append(f"{layer}.* (the whole layer)")

    # Q-Former cross-attention every `cross_attention_frequency` layers, starting at layer 0.
    layers = indices.get((qformer_layer_unit, ()), set())
    if layers:
        n = max(layers) + 1
        cross = sorted(cross_layers)
        step = cross[1] if len(cross) > 1 and cross[0] == 0 else n
        expected = set(range(0, n, step))
        for i in sorted(expected - cross_layers):
            missing.append(f"blip.Qformer.bert.encoder.layer.{i}.crossattention.* (cross-attention every {step})")
        for i in sorted(cross_layers - expected):
            bad.append(f"blip.Qformer.bert.encoder.layer.{i}.crossattention.*: not every {step} layers from 0")

    problems = []
    if unknown:
        problems.append(f"unexpected keys (neither mapped nor in UNUSED_KEYS): {_limited(unknown)}")
    if missing:
        problems.append(f"missing keys: {_limited(missing)}")
    if doubled:
        problems.append(f"keys given twice under different names: {_limited(doubled)}")
    if bad:
        problems.append(f"bad tensors: {_limited(bad)}")
    if ambiguous:  # a bug in the tables above, not in the checkpoint
        problems.append(f"keys matched by several rules: {_limited(ambiguous)}")
    if problems:
        raise ConversionError("LAVIS BLIP-Diffusion checkpoint: " + " | ".join(problems))
    return out
