"""Models for tests that train but compare with no PyTorch model."""

import dataclasses


def smallest_model(workdir: str, seed: int = 0):
    """The tiny model cut to one block per part: one UNet level (its mid block's cross-attention reads the
    subject), one layer per transformer. Every kind of leaf a training step has, in about a quarter of the
    tiny model's training-step compile time."""
    from blipdiff_jax import components, tiny

    base = tiny.build_tiny_model(workdir, seed)
    configs = dict(base.configs)
    configs["unet"] = {**configs["unet"], "block_out_channels": [32], "down_block_types": ["DownBlock2D"],
                       "up_block_types": ["UpBlock2D"]}
    configs["text_encoder"] = {**configs["text_encoder"], "num_hidden_layers": 1}
    qformer = configs["qformer"]
    configs["qformer"] = {**qformer, "vision_config": {**qformer["vision_config"], "num_hidden_layers": 1},
                          "qformer_config": {**qformer["qformer_config"], "num_hidden_layers": 1}}
    params = {name: tiny.random_params(components.param_shapes(name, components.build_model(name, configs[name])), seed + i)
              for i, name in enumerate(("qformer", "text_encoder", "unet", "vae"))}
    return dataclasses.replace(base, configs=configs, params=params)
