"""Tiny random-weight BLIP-Diffusion configs and offline tokenizer files.

Used by the demo (`blipdiff-jax demo`, the README's first command) and by the tests. The weights built
from these configs are random: they check an install and the plumbing, they do not make pictures.
"""

from __future__ import annotations

import json
import os

from transformers.models.clip.tokenization_clip import bytes_to_unicode

# A character-level CLIP BPE vocabulary: every byte symbol, alone and word-final, and no merges.
CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def clip_vocab() -> dict[str, int]:
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + list(CLIP_SPECIAL)
    return {tok: i for i, tok in enumerate(tokens)}


def write_clip_tokenizer(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(clip_vocab(), f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    config = {
        "model_max_length": 77,
        "bos_token": CLIP_SPECIAL[0],
        "eos_token": CLIP_SPECIAL[1],
        "unk_token": CLIP_SPECIAL[1],
        "pad_token": CLIP_SPECIAL[1],
        "tokenizer_class": "CLIPTokenizer",
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return path


BERT_WORDS = ("dog", "cat", "flower", "teapot", "kettle", "skirt", "dress", "sofa", "the")


def bert_vocab() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(BERT_WORDS) + letters + ["##" + c for c in letters]


def write_bert_tokenizer(path: str) -> str:
    """A small uncased WordPiece vocabulary (the real one is bert-base-uncased's 30522 tokens)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.txt"), "w") as f:
        f.write("\n".join(bert_vocab()) + "\n")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True, "tokenizer_class": "BertTokenizer", "model_max_length": 512}, f)
    return path


def qformer_config(num_query_tokens: int = 4, cross_attention_frequency: int = 1, image_size: int = 64) -> dict:
    hidden = 32
    return {
        "num_query_tokens": num_query_tokens,
        "vision_config": {
            "hidden_size": hidden,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": 16,
            "hidden_act": "quick_gelu",
        },
        "qformer_config": {
            "vocab_size": len(bert_vocab()) + 1,  # + the "[DEC]" token the PyTorch class adds
            "hidden_size": hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 37,
            "max_position_embeddings": 64,
            "cross_attention_frequency": cross_attention_frequency,
            "encoder_hidden_size": hidden,
        },
    }


def text_encoder_config() -> dict:
    return {
        "vocab_size": len(clip_vocab()),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 32,
        "bos_token_id": len(clip_vocab()) - 2,
        "eos_token_id": len(clip_vocab()) - 1,
        "pad_token_id": len(clip_vocab()) - 1,
    }


def unet_config() -> dict:
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [32, 64],
        "attention_head_dim": 4,
        "cross_attention_dim": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    }


def controlnet_config() -> dict:
    """A ControlNet for the tiny UNet (diffusers' `ControlNetModel.from_unet` with a 2x conditioning embedding,
    matching the tiny VAE's factor)."""
    unet = unet_config()
    return {
        "in_channels": unet["in_channels"],
        "block_out_channels": unet["block_out_channels"],
        "down_block_types": unet["down_block_types"],
        "layers_per_block": unet["layers_per_block"],
        "attention_head_dim": unet["attention_head_dim"],
        "cross_attention_dim": unet["cross_attention_dim"],
        "conditioning_embedding_out_channels": [16, 16],
    }


def vae_config() -> dict:
    return {
        "sample_size": 32,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    }


def scheduler_config() -> dict:
    return {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "num_train_timesteps": 1000,
    }


def image_processor_config(image_size: int = 64) -> dict:
    return {
        "image_processor_type": "BlipImageProcessor",
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 3,
        "do_center_crop": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
    }


def build_tiny_model(workdir: str, seed: int = 0, controlnet: bool = False):
    """The embedded demo model: tiny configs, RANDOM weights (seeded), offline tokenizers; with a tiny
    ControlNet when `controlnet=True`.

    Returns a `ConvertedModel`; its images are noise-like by construction, it only proves the install works.
    """
    from transformers import BertTokenizer, CLIPTokenizer

    from . import components
    from .checkpoint import ConvertedModel

    bert_dir = write_bert_tokenizer(os.path.join(workdir, "bert"))
    configs = {
        "qformer": {**qformer_config(), "tokenizer": bert_dir},
        "text_encoder": text_encoder_config(),
        "unet": unet_config(),
        "vae": vae_config(),
        "scheduler": scheduler_config(),
        "image_processor": image_processor_config(),
    }
    if controlnet:
        configs["controlnet"] = controlnet_config()
    params = {}
    for offset, name in enumerate(("qformer", "text_encoder", "unet", "vae") + (("controlnet",) if controlnet else ())):
        shapes = components.param_shapes(name, components.build_model(name, configs[name]))
        params[name] = random_params(shapes, seed + offset)
    bert = BertTokenizer.from_pretrained(bert_dir)
    bert.add_special_tokens({"bos_token": "[DEC]"})
    processor = image_processor_config()
    return ConvertedModel(
        pipeline_config={"ctx_begin_pos": 2, "mean": processor["image_mean"], "std": processor["image_std"]},
        configs=configs,
        params=params,
        tokenizer=CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(workdir, "clip"))),
        qformer_tokenizer=bert,
    )


def random_params(shapes: dict, seed: int) -> dict:
    """Random params from flat path -> shape, drawn with numpy (compiling each model's init costs far more
    on a small CPU): norms start at identity, biases at zero, kernels scaled by 1/sqrt(fan-in)."""
    import numpy as np
    from flax.traverse_util import unflatten_dict

    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in sorted(shapes.items()):
        leaf = path[-1]
        if leaf == "scale":
            value = np.ones(shape)
        elif leaf == "bias":
            value = np.zeros(shape)
        elif leaf == "kernel":
            value = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        else:  # embeddings, query tokens, class/position embeddings
            value = rng.standard_normal(shape) * 0.02
        flat[path] = value.astype(np.float32)
    return unflatten_dict(flat)


def demo_reference_image(size: int = 96):
    """A synthetic reference picture (a disc on a gradient), so the demo needs no files."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    image = np.stack([x, y, 1 - x], axis=-1) * 200
    disc = (x - 0.5) ** 2 + (y - 0.55) ** 2 < 0.08
    image[disc] = (180, 120, 60)
    return Image.fromarray(image.astype(np.uint8))
