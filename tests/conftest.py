"""Shared fixtures: tiny random PyTorch BLIP-Diffusion models (the parity reference) built offline."""

import os
import shutil
import tempfile

# Four fake CPU devices for the multi-device tests; must be set before jax is imported anywhere. LLVM's
# optimisation level 0 compiles the tiny test programs ~25% faster (the suite is mostly compilation); XLA's own
# HLO passes (fusion, layout, buffer assignment) are unchanged, so the programs are the ones users run, and every
# parity tolerance holds as at the default level.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Conversion and compilation caches of this test run, not the user's. Made once, in the pytest process that
# starts the xdist workers, which inherit it, as do the CLI and notebook subprocesses: the tiny programs recur
# across test files, and each is compiled once per run.
_RUN_CACHE_OWNER = "BLIPDIFF_TEST_RUN_CACHE" not in os.environ  # this process made it, and removes it at the end
if _RUN_CACHE_OWNER:
    os.environ["BLIPDIFF_TEST_RUN_CACHE"] = tempfile.mkdtemp(prefix="blipdiff-jax-cache-")
os.environ["BLIPDIFF_JAX_CACHE"] = os.environ["BLIPDIFF_TEST_RUN_CACHE"]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ["BLIPDIFF_JAX_CACHE"], "jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
# On a GPU, JAX's default fp32 matmuls and convolutions use TF32 (a 10-bit mantissa): errors of ~1e-3 against
# the fp32 references, where the parity tolerances are 1e-5 (seen on an H100, 2026-11-26). Full fp32 there, as
# on CPU, where this changes nothing.
if jax.default_backend() == "gpu":
    jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np
import pytest

from blipdiff_jax import tiny


def pytest_unconfigure(config):
    if _RUN_CACHE_OWNER and not hasattr(config, "workerinput"):  # the xdist workers share it until the end
        shutil.rmtree(os.environ["BLIPDIFF_TEST_RUN_CACHE"], ignore_errors=True)


SHARED_IMAGES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "images")


def shared_image(name: str) -> str:
    path = os.path.join(SHARED_IMAGES, name)
    if not os.path.isfile(path):
        pytest.skip(f"../shared/images/{name} is not here (a fresh clone has no ../shared/); core behaviour is tested on generated images")
    return path


def randomize_(module, seed: int, std: float = 0.3):
    """Give every parameter random values (also LayerNorm scales and the zero-initialised query tokens)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


def make_image(seed: int, size=(40, 56), mode="RGB"):
    from PIL import Image

    array = np.random.RandomState(seed).randint(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)


@pytest.fixture(scope="session")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {"clip": tiny.write_clip_tokenizer(str(root / "clip")), "bert": tiny.write_bert_tokenizer(str(root / "bert"))}


def torch_qformer(qformer_config: dict, bert_dir: str, seed: int = 0):
    """diffusers' PyTorch `Blip2QFormerModel` from a config dict, every weight random."""
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from transformers import Blip2Config

    config = Blip2Config(**qformer_config)
    config.tokenizer = bert_dir
    return randomize_(Blip2QFormerModel(config), seed, std=0.3 if qformer_config["qformer_config"]["hidden_size"] < 100 else 0.02).eval()


def torch_text_encoder(text_config: dict, seed: int = 1):
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel
    from transformers import CLIPTextConfig

    std = 0.3 if text_config["hidden_size"] < 100 else 0.02
    return randomize_(ContextCLIPTextModel(CLIPTextConfig(**text_config)), seed, std=std).eval()


def build_torch_pipeline(tokenizer_dirs, num_query_tokens=4, cross_attention_frequency=1, seed=0, unet_config=None,
                         vae_config=None):
    """A tiny diffusers `BlipDiffusionPipeline` with random weights (`unet_config`, `vae_config`: other tiny layouts)."""
    import torch
    from diffusers import AutoencoderKL, BlipDiffusionPipeline, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.deprecated.blip_diffusion.blip_image_processing import BlipImageProcessor
    from transformers import CLIPTokenizer

    torch.manual_seed(seed)
    qformer = torch_qformer(tiny.qformer_config(num_query_tokens, cross_attention_frequency), tokenizer_dirs["bert"], seed)
    text_encoder = torch_text_encoder(tiny.text_encoder_config(), seed + 1)
    unet = UNet2DConditionModel(**(unet_config or tiny.unet_config())).eval()
    vae = AutoencoderKL(**(vae_config or tiny.vae_config())).eval()
    scheduler = PNDMScheduler(**{k: v for k, v in tiny.scheduler_config().items() if not k.startswith("_")})
    processor = BlipImageProcessor(**{k: v for k, v in tiny.image_processor_config().items() if k != "image_processor_type"})
    return BlipDiffusionPipeline(
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dirs["clip"]),
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        scheduler=scheduler,
        qformer=qformer,
        image_processor=processor,
        ctx_begin_pos=2,
        mean=tiny.image_processor_config()["image_mean"],
        std=tiny.image_processor_config()["image_std"],
    )


@pytest.fixture(scope="session")
def torch_pipeline(tokenizer_dirs):
    return build_torch_pipeline(tokenizer_dirs)


@pytest.fixture(scope="session")
def torch_pipeline_dir(torch_pipeline, tmp_path_factory):
    """The directory `save_pretrained` writes (safetensors), as users have it on disk."""
    path = tmp_path_factory.mktemp("pt") / "blipdiffusion-tiny"
    torch_pipeline.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def converted_model(torch_pipeline_dir):
    from convert.pytorch_dir import read_pytorch_directory

    return read_pytorch_directory(torch_pipeline_dir)


@pytest.fixture(scope="session")
def flax_pipeline(converted_model):
    from blipdiff_jax import FlaxBlipDiffusionPipeline

    return FlaxBlipDiffusionPipeline.from_converted(converted_model)


def abstract_generate_args(pipeline, params, latent_size: int = 8):
    """Shape-only arguments for the pipeline's generation program (`_generate_jit`, `_generate_traced`): one
    prompt, guidance on, `latent_size` square latents; to trace or compile it without running it."""
    S = jax.ShapeDtypeStruct
    hidden, budget = pipeline.text_encoder.config.hidden_size, pipeline.max_text_length - pipeline.num_query_tokens
    batch = {"prompt_ids": S((1, budget), jnp.int32), "uncond_ids": S((1, pipeline.max_text_length), jnp.int32),
             "subject_embeds": S((1, pipeline.num_query_tokens, hidden), jnp.float32),
             "latents": S((1, pipeline.unet.in_channels, latent_size, latent_size), jnp.float32)}
    return params, batch, {"guidance_scale": S((), jnp.float32)}, S((2,), jnp.uint32)


def hlo_bodies(hlo_text: str) -> dict[str, list[str]]:
    """The instruction lines of every computation in a compiled program's text, by computation name."""
    bodies, current = {}, None
    for line in hlo_text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            bodies[current] = []
        elif current is not None:
            bodies[current].append(line)
    return bodies


def jaxpr_equations(jaxpr, primitives: tuple[str, ...]):
    """Every equation of `primitives` in a jaxpr, inside loops, checkpoints, calls and custom derivatives too."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in primitives:
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from jaxpr_equations(inner, primitives)


def converted(name: str, torch_module):
    """Strictly converted Flax params for one PyTorch module, with its config as a dict."""
    from convert.pytorch_dir import convert_component

    state = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    config = torch_module.config.to_dict()
    return convert_component(name, state, config), config


def torch_controlnet(unet, seed: int = 2):
    """A tiny ControlNet made from the UNet; its zero-initialised output convs get random values so the
    residuals are not trivially zero."""
    import torch
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return controlnet


@pytest.fixture(scope="session")
def torch_controlnet_pipeline(torch_pipeline):
    from diffusers import BlipDiffusionControlNetPipeline

    p = torch_pipeline
    return BlipDiffusionControlNetPipeline(
        tokenizer=p.tokenizer, text_encoder=p.text_encoder, vae=p.vae, unet=p.unet, scheduler=p.scheduler,
        qformer=p.qformer, controlnet=torch_controlnet(p.unet), image_processor=p.image_processor,
        ctx_begin_pos=2, mean=p.config.mean, std=p.config.std,
    )


@pytest.fixture(scope="session")
def torch_controlnet_pipeline_dir(torch_controlnet_pipeline, tmp_path_factory):
    path = tmp_path_factory.mktemp("pt") / "blipdiffusion-controlnet-tiny"
    torch_controlnet_pipeline.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def flax_controlnet_pipeline(torch_controlnet_pipeline_dir):
    from blipdiff_jax import FlaxBlipDiffusionControlNetPipeline

    return FlaxBlipDiffusionControlNetPipeline.from_pretrained(torch_controlnet_pipeline_dir, from_pt=True)
