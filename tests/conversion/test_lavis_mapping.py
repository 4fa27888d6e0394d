"""LAVIS BLIP-Diffusion names -> diffusers names (convert/lavis.py), on tiny random diffusers modules.

The LAVIS-named checkpoint is built here from the diffusers modules by the inverse naming, written
independently of convert/lavis.py's tables (first matching rule wins), so a round trip must give back
every diffusers tensor under its own name.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from blipdiff_jax import tiny
from convert.lavis import UNUSED_KEYS, lavis_to_diffusers

BUFFERS = {"qformer": {"embeddings.position_ids"}, "text_encoder": {"text_model.embeddings.position_ids"}}

# diffusers Blip2QFormerModel name -> LAVIS name, and how the array changes on the way back.
Q, V = "blip.Qformer.bert.encoder.layer", "blip.visual_encoder.transformer.resblocks"
QFORMER_TO_LAVIS = [
    (r"query_tokens", r"blip.query_tokens", None),
    (r"embeddings\.(.+)", r"blip.Qformer.bert.embeddings.\1", None),
    (r"encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.(.+)", Q + r".\1.\2.self.\3", None),
    (r"encoder\.layer\.(.+)", Q + r".\1", None),
    (r"proj_layer\.(.+)", r"proj_layer.\1", None),
    (r"visual_encoder\.embeddings\.class_embedding", r"blip.visual_encoder.class_embedding", lambda a: a[0, 0]),
    (r"visual_encoder\.embeddings\.position_embedding", r"blip.visual_encoder.positional_embedding", lambda a: a[0]),
    (r"visual_encoder\.embeddings\.patch_embedding\.weight", r"blip.visual_encoder.conv1.weight", None),
    (r"visual_encoder\.pre_layernorm\.(weight|bias)", r"blip.visual_encoder.ln_pre.\1", None),
    (r"visual_encoder\.post_layernorm\.(weight|bias)", r"blip.ln_vision.\1", None),
    (r"visual_encoder\.encoder\.layers\.(\d+)\.layer_norm([12])\.(.+)", V + r".\1.ln_\2.\3", None),
    (r"visual_encoder\.encoder\.layers\.(\d+)\.self_attn\.qkv\.(weight|bias)", V + r".\1.attn.in_proj_\2", None),
    (r"visual_encoder\.encoder\.layers\.(\d+)\.self_attn\.projection\.(.+)", V + r".\1.attn.out_proj.\2", None),
    (r"visual_encoder\.encoder\.layers\.(\d+)\.mlp\.fc1\.(.+)", V + r".\1.mlp.c_fc.\2", None),
    (r"visual_encoder\.encoder\.layers\.(\d+)\.mlp\.fc2\.(.+)", V + r".\1.mlp.c_proj.\2", None),
]

# diffusers<=0.16 (pinned by LAVIS) AutoencoderKL mid-block attention names.
VAE_OLD_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _numpy(module: torch.nn.Module, buffers=()) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    with torch.no_grad():  # random values everywhere, so that swapped tensors would show
        for p in module.parameters():
            p.normal_()
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items() if k not in buffers}


def _qformer_to_lavis(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in sd.items():
        for pattern, replacement, change in QFORMER_TO_LAVIS:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, replacement, key)] = change(value) if change else value
                break
        else:
            raise AssertionError(f"no LAVIS name for {key}")
    return out


def _vae_old_names(key: str) -> str:
    m = re.fullmatch(r"((?:en|de)coder\.mid_block\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)", key)
    return f"{m.group(1)}.{VAE_OLD_ATTENTION[m.group(2)]}.{m.group(3)}" if m else key


def _unused_extras() -> dict[str, np.ndarray]:
    """What else a LAVIS BlipDiffusion.state_dict() holds: buffers, BLIP-2 pretraining heads, the ctx cache."""
    rng = np.random.default_rng(1)
    return {k: rng.standard_normal(3).astype(np.float32) for k in UNUSED_KEYS}


@pytest.fixture(scope="module", params=[1, 2], ids=["cross_every_layer", "cross_every_2"])
def models(request, tmp_path_factory):
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import CLIPTextConfig
    from transformers.models.blip_2.configuration_blip_2 import Blip2Config

    config = Blip2Config(**tiny.qformer_config(cross_attention_frequency=request.param))
    config.tokenizer = tiny.write_bert_tokenizer(str(tmp_path_factory.mktemp("bert")))
    unet = UNet2DConditionModel(**tiny.unet_config())
    modules = {
        "qformer": Blip2QFormerModel(config),
        "text_encoder": ContextCLIPTextModel(CLIPTextConfig(**tiny.text_encoder_config())),
        "unet": unet,
        "vae": AutoencoderKL(**tiny.vae_config()),
        "controlnet": ControlNetModel.from_unet(unet),
    }
    return modules, {name: _numpy(m, BUFFERS.get(name, ())) for name, m in modules.items()}


def _lavis(sds: dict[str, dict[str, np.ndarray]], old_vae_names=True, controlnet=False) -> dict[str, np.ndarray]:
    lavis = _qformer_to_lavis(sds["qformer"])
    lavis.update({f"text_encoder.{k}": v for k, v in sds["text_encoder"].items()})
    lavis.update({f"unet.{k}": v for k, v in sds["unet"].items()})
    rename = _vae_old_names if old_vae_names else (lambda k: k)
    lavis.update({f"vae.{rename(k)}": v for k, v in sds["vae"].items()})
    if controlnet:
        lavis.update({f"controlnet.{k}": v for k, v in sds["controlnet"].items()})
    lavis.update(_unused_extras())
    return lavis


def _assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert np.shape(got[key]) == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("old_vae_names", [True, False], ids=["vae_diffusers016", "vae_current"])
def test_round_trip(models, old_vae_names):
    modules, sds = models
    lavis = _lavis(sds, old_vae_names=old_vae_names)
    if old_vae_names:
        assert "vae.encoder.mid_block.attentions.0.query.weight" in lavis
    out = lavis_to_diffusers(lavis)
    assert set(out) == {"qformer", "text_encoder", "unet", "vae"}
    for name in out:
        _assert_same(out[name], sds[name])
        # and it loads into the diffusers module with nothing but the buffers left out
        result = modules[name].load_state_dict({k: torch.from_numpy(v) for k, v in out[name].items()}, strict=False)
        assert set(result.missing_keys) == BUFFERS.get(name, set()) and not result.unexpected_keys


def test_controlnet_round_trip(models):
    _, sds = models
    out = lavis_to_diffusers(_lavis(sds, controlnet=True))
    assert set(out) == {"qformer", "text_encoder", "unet", "vae", "controlnet"}
    _assert_same(out["controlnet"], sds["controlnet"])


def test_unknown_key_is_named(models):
    _, sds = models
    for extra in ("blip.Qformer.bert.pooler.dense.weight", "unet.class_embedding.weight", "blip.temp2", "something"):
        lavis = _lavis(sds)
        lavis[extra] = np.zeros(2, np.float32)
        with pytest.raises(ValueError, match=re.escape(extra)):
            lavis_to_diffusers(lavis)


@pytest.mark.parametrize(
    "key",
    [
        "blip.Qformer.bert.encoder.layer.1.attention.self.query.bias",
        "blip.Qformer.bert.encoder.layer.0.crossattention.output.LayerNorm.weight",
        "blip.visual_encoder.transformer.resblocks.0.attn.in_proj_bias",
        "blip.visual_encoder.class_embedding",
        "blip.ln_vision.weight",
        "blip.query_tokens",
        "proj_layer.dense2.bias",
        "text_encoder.text_model.encoder.layers.1.mlp.fc2.weight",
        "text_encoder.text_model.final_layer_norm.bias",
        "unet.conv_in.weight",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "unet.up_blocks.0.resnets.0.conv_shortcut.bias",
        "vae.decoder.up_blocks.1.resnets.0.norm2.weight",
        "vae.post_quant_conv.bias",
    ],
)
def test_missing_key_is_named(models, key):
    _, sds = models
    lavis = _lavis(sds)
    del lavis[key]
    with pytest.raises(ValueError, match=re.escape(key)):
        lavis_to_diffusers(lavis)


def test_missing_vae_attention_key_is_named(models):
    _, sds = models
    lavis = _lavis(sds, old_vae_names=True)
    del lavis["vae.encoder.mid_block.attentions.0.proj_attn.bias"]
    name = "vae.encoder.mid_block.attentions.0.to_out.0.bias (or proj_attn.bias)"
    with pytest.raises(ValueError, match=re.escape(name)):
        lavis_to_diffusers(lavis)


def test_missing_layer_and_component_are_named(models):
    _, sds = models
    lavis = {k: v for k, v in _lavis(sds).items() if not k.startswith("blip.visual_encoder.transformer.resblocks.0.")}
    with pytest.raises(ValueError, match=re.escape("blip.visual_encoder.transformer.resblocks.0.*")):
        lavis_to_diffusers(lavis)
    lavis = {k: v for k, v in _lavis(sds).items() if not k.startswith("vae.")}
    with pytest.raises(ValueError, match=re.escape("vae.quant_conv.weight")):
        lavis_to_diffusers(lavis)


def test_same_tensor_under_two_names_is_rejected(models):
    _, sds = models
    lavis = _lavis(sds, old_vae_names=True)
    lavis["vae.decoder.mid_block.attentions.0.to_q.weight"] = lavis["vae.decoder.mid_block.attentions.0.query.weight"]
    with pytest.raises(ValueError, match=re.escape("vae.decoder.mid_block.attentions.0.to_q.weight")):
        lavis_to_diffusers(lavis)


def test_crossattention_must_start_at_layer_0(models):
    _, sds = models
    prefix = "blip.Qformer.bert.encoder.layer.0.crossattention."
    lavis = {k: v for k, v in _lavis(sds).items() if not k.startswith(prefix)}
    with pytest.raises(ValueError, match=re.escape(prefix)):
        lavis_to_diffusers(lavis)


def test_bad_embedding_rank_is_named(models):
    _, sds = models
    lavis = _lavis(sds)
    lavis["blip.visual_encoder.class_embedding"] = lavis["blip.visual_encoder.class_embedding"][None, None]
    with pytest.raises(ValueError, match=re.escape("blip.visual_encoder.class_embedding")):
        lavis_to_diffusers(lavis)


def test_lavis_checkpoint_converts_like_the_diffusers_directory(torch_pipeline, torch_pipeline_dir, converted_model, tmp_path):
    """End to end: a LAVIS-named checkpoint of the tiny pipeline gives the same Flax params as its diffusers directory."""
    from flax.traverse_util import flatten_dict
    from safetensors.numpy import save_file

    from convert.pytorch_dir import read_pytorch_directory

    sds = {name: {k: v.detach().numpy().copy() for k, v in getattr(torch_pipeline, name).state_dict().items()
                  if k not in BUFFERS.get(name, ())}
           for name in ("qformer", "text_encoder", "unet", "vae")}
    path = str(tmp_path / "lavis.safetensors")
    save_file(_lavis(sds), path)
    model = read_pytorch_directory(torch_pipeline_dir, lavis_weights=path)
    got, want = flatten_dict(model.params), flatten_dict(converted_model.params)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=str(key))
