"""The toy BLIP-Diffusion: the real architecture at toy widths, for the toy world (`blipdiff_jax.toyworld`).

    32x32 images; VAE [16, 32, 64] (8x8x4 latents); UNet [32, 64, 64] with cross-attention at every level;
    CLIP text encoder and Q-Former 64 wide, 2 layers; 4 query tokens; a ViT 64 wide (patch 4), random at first
    and trained with the rest (the real model's pre-trained CLIP ViT stays frozen).

The tokenizers know the toy world's words as whole tokens (CLIP BPE merges written for them), so "gray" is
one token, as it is in the real CLIP vocabulary. `build_toy_model` gives random weights; `train_toy_vae`
trains the VAE on toy pictures first (the pre-training keeps it frozen, as the real one is).
"""

from __future__ import annotations

import json
import os

import numpy as np

from .. import tiny, toyworld
from ..runtime.quiet import quiet_flax_notices, quietly

NUM_QUERY_TOKENS = 4
HIDDEN = 64
# Stable Diffusion's kind of schedule, ending nearer pure noise (alpha_bar 2.5e-4 instead of 0.005), and
# v-prediction. An 8x8 latent keeps its mean colour readable through SD's last noise level, so a model learns
# the background from the noise instead of the prompt and, sampled from pure noise, draws a random one; and
# predicting the noise, a model trained for minutes is not precise enough where x0 = (x - noise) / 0.016.
SCHEDULER_CONFIG = {**tiny.scheduler_config(), "beta_end": 0.02, "prediction_type": "v_prediction"}


def toy_words() -> list[str]:
    return sorted(set(toyworld.SHAPES) | set(toyworld.COLOURS) | set(toyworld.BACKGROUNDS) | set(toyworld.PATTERNS)
                  | {"a", "on", "background", "in", "the", "with"})


def write_clip_tokenizer(path: str) -> str:
    """The character-level CLIP vocabulary of the tiny model plus one token per toy word, built by merges."""
    tiny.write_clip_tokenizer(path)
    vocab = tiny.clip_vocab()
    specials = list(tiny.CLIP_SPECIAL)
    for special in specials:
        vocab.pop(special)
    merges = []
    for word in toy_words():
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: "c i" -> "ci", "ci r" -> "cir", ...
            merged = pieces[0] + pieces[1]
            merge = f"{pieces[0]} {pieces[1]}"
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged] + pieces[2:]
    for special in specials:  # the special tokens last, as in the tiny vocabulary
        vocab[special] = len(vocab)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return path


def write_bert_tokenizer(path: str) -> str:
    """The tiny BERT vocabulary plus the shape words (the Q-Former reads the category word)."""
    tiny.write_bert_tokenizer(path)
    words = [w for w in toy_words() if w not in tiny.bert_vocab()]
    with open(os.path.join(path, "vocab.txt"), "a") as f:
        f.write("\n".join(words) + "\n")
    return path


def clip_vocab_size(path: str) -> int:
    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
        return len(json.load(f))


def bert_vocab_size(path: str) -> int:
    with open(os.path.join(path, "vocab.txt")) as f:
        return sum(1 for line in f if line.strip())


def configs(bert_dir: str, clip_dir: str) -> dict:
    size = toyworld.IMAGE_SIZE
    clip_vocab = clip_vocab_size(clip_dir)
    return {
        "qformer": {
            "num_query_tokens": NUM_QUERY_TOKENS,
            "vision_config": {"hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "image_size": size, "patch_size": 4, "hidden_act": "quick_gelu"},
            "qformer_config": {"vocab_size": bert_vocab_size(bert_dir) + 1, "hidden_size": HIDDEN, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "intermediate_size": 2 * HIDDEN, "max_position_embeddings": 32,
                               "cross_attention_frequency": 1, "encoder_hidden_size": HIDDEN},
        },
        "text_encoder": {"vocab_size": clip_vocab, "hidden_size": HIDDEN, "intermediate_size": 2 * HIDDEN,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
                         "hidden_act": "quick_gelu", "projection_dim": HIDDEN, "bos_token_id": clip_vocab - 2,
                         "eos_token_id": clip_vocab - 1, "pad_token_id": clip_vocab - 1},
        "unet": {"sample_size": size // 4, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
                 "block_out_channels": [32, 64, 64], "attention_head_dim": 4, "cross_attention_dim": HIDDEN,
                 "down_block_types": ["CrossAttnDownBlock2D"] * 3, "up_block_types": ["CrossAttnUpBlock2D"] * 3},
        "vae": {"sample_size": size, "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 1,
                "block_out_channels": [16, 32, 64], "norm_num_groups": 16, "down_block_types": ["DownEncoderBlock2D"] * 3,
                "up_block_types": ["UpDecoderBlock2D"] * 3, "scaling_factor": 1.0},
        "scheduler": dict(SCHEDULER_CONFIG),
        "image_processor": tiny.image_processor_config(size),
    }


def build_toy_model(workdir: str, seed: int = 0):
    """A `ConvertedModel` of the toy architecture with random weights (seeded); tokenizers under `workdir`."""
    from transformers import BertTokenizer, CLIPTokenizer

    from .. import components
    from ..checkpoint import ConvertedModel

    bert_dir = write_bert_tokenizer(os.path.join(workdir, "bert"))
    clip_dir = write_clip_tokenizer(os.path.join(workdir, "clip"))
    model_configs = configs(bert_dir, clip_dir)
    params = {}
    for offset, name in enumerate(("qformer", "text_encoder", "unet", "vae")):
        shapes = components.param_shapes(name, components.build_model(name, model_configs[name]))
        params[name] = tiny.random_params(shapes, seed + offset)
    bert = BertTokenizer.from_pretrained(bert_dir)
    bert.add_special_tokens({"bos_token": "[DEC]"})
    processor = model_configs["image_processor"]
    return ConvertedModel(
        pipeline_config={"ctx_begin_pos": 2, "mean": processor["image_mean"], "std": processor["image_std"]},
        configs=model_configs, params=params, tokenizer=CLIPTokenizer.from_pretrained(clip_dir), qformer_tokenizer=bert)


# ------------------------------------------------------------------------------------------- the VAE first


def toy_images(seed: int, step: int, batch: int) -> np.ndarray:
    """(batch, 3, S, S) in [-1, 1]: references and targets of the training stream (what the VAE will see)."""
    out = []
    for i in range(batch):
        pair = toyworld.training_pair(seed, step * batch + i)
        out.append(pair["target"] if i % 2 == 0 else pair["reference"])
    return np.stack([np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1.0 for im in out])


@quietly  # diffusers' Flax deprecation notice, once per module built and traced
def train_toy_vae(model, steps: int = 1500, batch: int = 32, learning_rate: float = 1e-3, kl_weight: float = 1e-6,
                  decoder_noise: float = 0.15, seed: int = 0, progress: bool = True):
    """Train the VAE of `model` on toy pictures (reconstruction MSE + a small KL, the decoder fed latents with
    `decoder_noise` x their spread of extra noise so that it decodes imperfect latents cleanly), then set its
    `scaling_factor` to 1/std of the latents (Stable Diffusion's convention). Returns the new model."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import optax
    from tqdm.auto import tqdm

    from .. import components

    vae = components.build_model("vae", model.configs["vae"])
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, min(100, steps // 4), max(steps, 2), learning_rate * 0.05),
                                        weight_decay=0.0))

    def loss_fn(params, pixels, key):
        posterior = vae.apply({"params": params}, pixels, method=vae.encode).latent_dist
        sample_key, noise_key = jax.random.split(key)
        z = posterior.mean + posterior.std * jax.random.normal(sample_key, posterior.mean.shape)
        # The decoder also sees the latents with noise of 0.15 of their spread: without it, latents that a
        # generation gets slightly wrong (by 0.2 of their spread) decoded to noisy textures.
        spread = jax.lax.stop_gradient(jnp.std(posterior.mean))
        z = z + decoder_noise * spread * jax.random.normal(noise_key, z.shape)
        recon = vae.apply({"params": params}, z, method=vae.decode).sample
        kl = 0.5 * jnp.mean(posterior.mean**2 + posterior.var - 1.0 - posterior.logvar)
        return jnp.mean((recon - pixels) ** 2) + kl_weight * kl

    @jax.jit
    def step(params, opt_state, pixels, key):
        value, grads = jax.value_and_grad(loss_fn)(params, pixels, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    params = jax.tree_util.tree_map(jnp.asarray, model.params["vae"])
    opt_state = optimizer.init(params)
    base = jax.random.PRNGKey(seed)
    bar = tqdm(range(steps), desc="toy VAE", disable=not progress, dynamic_ncols=True)
    for i in bar:
        params, opt_state, value = step(params, opt_state, jnp.asarray(toy_images(seed + 1, i, batch)), jax.random.fold_in(base, i))
        if i % 50 == 0:
            bar.set_postfix(loss=f"{float(value):.4f}")
    bar.close()

    @jax.jit
    def latent_mean(params, pixels):
        return vae.apply({"params": params}, pixels, method=vae.encode).latent_dist.mean

    sample = np.concatenate([np.asarray(latent_mean(params, jnp.asarray(toy_images(seed + 2, i, batch)))) for i in range(4)])
    configs = dict(model.configs)
    configs["vae"] = {**configs["vae"], "scaling_factor": float(1.0 / sample.std())}
    host = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
    return dataclasses.replace(model, configs=configs, params={**model.params, "vae": host})


# ------------------------------------------------------------------------------------- the whole toy recipe

BASE_DIR = "toy-base"  # inside OUT: the toy model with its trained VAE, before pre-training
INFO_FILE = "toy_training.json"
# Sized to train on a 2-core CPU in under 30 minutes (VAE, then pre-training). The toy's ViT trains too: the
# real model's vision tower is a pre-trained CLIP, kept frozen; the toy world has none, and through a frozen
# random ViT the Q-Former read colours and stripes far less well.
RECIPE = {"vae_steps": 1200, "vae_batch_size": 16, "steps": 4000, "batch_size": 32, "learning_rate": 2e-3,
          "warmup_steps": 100, "schedule": "cosine", "ema_decay": 0.995, "caption_dropout": 0.1, "subject_dropout": 0.1,
          "train": ("qformer", "text_encoder", "unet", "vision")}


def pretrain_toy(out: str, seed: int = 0, resume: bool = False, progress: bool = True, names: dict | None = None,
                 **overrides) -> str:
    """`blipdiff-jax pretrain --toy`: build the toy model (random, seeded), train its VAE on toy pictures, then
    pre-train the subject representation on toy pairs; OUT then loads with `from_pretrained(OUT)`.
    `overrides`: any `RECIPE` key or `PretrainConfig` field. A resumed run reuses OUT/toy-base."""
    import tempfile
    import time

    from ..checkpoint import load_converted, save_converted
    from .pretrain import PretrainConfig, SubjectPretrainer

    recipe = {**RECIPE, **overrides}
    vae_steps, vae_batch_size = recipe.pop("vae_steps"), recipe.pop("vae_batch_size")
    out = os.path.abspath(out)
    base = os.path.join(out, BASE_DIR)
    name = lambda field: (names or {}).get(field, field)  # noqa: E731
    config = PretrainConfig(out=out, toy=True, resolution=toyworld.IMAGE_SIZE, seed=seed, resume=resume,
                            progress=progress, **recipe)
    config.validate(names)
    if not resume and os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"{name('out')}: {out} already exists and is not empty; pass {name('resume')} to "
                              f"continue its run or choose a new directory")
    started = time.time()
    vae_seconds = 0.0
    if not os.path.isdir(base):
        if resume:
            raise ValueError(f"{name('resume')}: {out} holds no toy run ({BASE_DIR}/ is missing)")
        with tempfile.TemporaryDirectory() as workdir:
            model = train_toy_vae(build_toy_model(workdir, seed), steps=vae_steps, batch=vae_batch_size, seed=seed,
                                    progress=progress)
            save_converted(model, base)
        vae_seconds = time.time() - started
    with quiet_flax_notices():
        trainer = SubjectPretrainer(load_converted(base), config, names=names, keep_in_out=(BASE_DIR,))
    trainer.train()
    total = time.time() - started
    info_path = os.path.join(out, INFO_FILE)
    info = {}
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
    info.update({"vae_steps": vae_steps, "vae_batch_size": vae_batch_size, "steps": config.steps,
                 "batch_size": config.batch_size, "seed": seed})
    info["vae_minutes"] = round(info.get("vae_minutes", 0.0) + vae_seconds / 60, 1)
    info["pretrain_minutes"] = round(info.get("pretrain_minutes", 0.0) + (total - vae_seconds) / 60, 1)
    info["total_minutes"] = round(info["vae_minutes"] + info["pretrain_minutes"], 1)
    with open(info_path, "w") as f:
        json.dump(info, f, indent=1)
    return out


def ship(trained: str, destination: str, dtype=np.float16) -> str:
    """Copy the model of a toy run (`trained`: OUT of `pretrain --toy`) to `destination` with its weights
    stored in `dtype` (float16 halves the package's share; loading casts back to the pipeline's dtype)."""
    import dataclasses

    import jax

    from ..checkpoint import load_converted, save_converted

    model = load_converted(trained)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(dtype) if np.issubdtype(np.asarray(x).dtype, np.floating)
                                    else np.asarray(x), model.params)
    return save_converted(dataclasses.replace(model, params=params), destination, overwrite=True)
