"""Tiny random metric models for the evaluation tests: transformers' PyTorch `CLIPModel` and `ViTModel` (DINO's
architecture) with every weight random, saved as users have them (safetensors) and converted strictly; and a
tiny DreamBench folder in DreamBooth's published layout."""

import os

import numpy as np

from blipdiff_jax import tiny

IMAGE_SIZE = 32  # both models' input size; DINO's resize is then round(32 * 256 / 224) = 37


def clip_config():
    from transformers import CLIPConfig

    vocab = len(tiny.clip_vocab())
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=IMAGE_SIZE, patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def dino_config():
    from transformers import ViTConfig

    return ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                     image_size=IMAGE_SIZE, patch_size=8, layer_norm_eps=1e-6, qkv_bias=True)


def torch_metric_model(kind: str, seed: int):
    """A tiny PyTorch CLIPModel ("clip") or ViTModel without pooler ("dino"), every weight random."""
    import torch
    from transformers import CLIPModel, ViTModel

    from support.torch_reference import randomize_

    torch.manual_seed(seed)
    model = CLIPModel(clip_config()) if kind == "clip" else ViTModel(dino_config(), add_pooling_layer=False)
    return randomize_(model, seed, std=0.2).eval()


def save_torch_metric_model(kind: str, folder: str, seed: int):
    """The PyTorch model saved with `save_pretrained` (safetensors), CLIP with its (tiny) tokenizer."""
    model = torch_metric_model(kind, seed)
    model.save_pretrained(folder)
    if kind == "clip":
        tiny.write_clip_tokenizer(folder)
    return model


def converted_metric_model(kind: str, root: str, seed: int):
    """(PyTorch model, its folder converted by convert.metrics)."""
    from convert.metrics import read_metric_directory, save_metric_model

    torch_dir = os.path.join(root, f"{kind}-pt")
    model = save_torch_metric_model(kind, torch_dir, seed)
    return model, save_metric_model(read_metric_directory(torch_dir, kind), os.path.join(root, kind))


PROMPTS_AND_CLASSES = """Classes

subject_name,class
dog,dog
teapot,teapot

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} in the snow'.format(unique_token, class_token),
'a {0} {1} wearing a red hat'.format(unique_token, class_token)
]
"""


def make_dreambench(root: str) -> str:
    """DreamBooth's layout, 2 subjects (a live one, an object) of 2 and 3 small photos, 2 prompts per list."""
    from PIL import Image

    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "prompts_and_classes.txt"), "w") as f:
        f.write(PROMPTS_AND_CLASSES)
    for s, (name, count) in enumerate((("dog", 2), ("teapot", 3))):
        os.makedirs(os.path.join(root, name))
        for i in range(count):
            rng = np.random.RandomState(10 * s + i)
            array = rng.randint(0, 256, size=(40 + 8 * i, 48, 3), dtype=np.uint8)
            Image.fromarray(array).save(os.path.join(root, name, f"{i:02d}.{'jpg' if i % 2 else 'png'}"))
    return root
