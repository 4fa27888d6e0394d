"""The parity reference: tiny diffusers PyTorch models with random weights (built offline), our strict
conversion of them, and how gradients are compared with theirs."""

import contextlib

import numpy as np

from blipdiff_jax import tiny


def randomize_(module, seed: int, std: float = 0.3):
    """Give every parameter random values (also LayerNorm scales and the zero-initialised query tokens)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return module


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


def converted(name: str, torch_module):
    """Strictly converted Flax params for one PyTorch module, with its config as a dict."""
    from convert.pytorch_dir import convert_component

    state = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    config = torch_module.config.to_dict()
    return convert_component(name, state, config), config


@contextlib.contextmanager
def flax_unet_numerics(unet):
    """diffusers' Flax UNet differs from its PyTorch UNet in two places (diffusers 0.39): the transformer
    blocks' GroupNorm has epsilon 1e-5 (PyTorch 1e-6) and GEGLU uses the tanh GELU (PyTorch the exact erf
    one). On identical inputs in float64 these make the outputs differ by ~4e-5 relative; with both aligned
    the loss and gradients agree to ~5e-7 in float64. Aligns the PyTorch UNet for the duration."""
    import torch.nn.functional as F

    changed = []
    for module in unet.modules():
        if type(module).__name__ == "Transformer2DModel":
            changed.append((module.norm, "eps", module.norm.eps))
            module.norm.eps = 1e-5
        if type(module).__name__ == "GEGLU":
            changed.append((module, "gelu", None))
            module.gelu = lambda gate: F.gelu(gate, approximate="tanh")
    try:
        yield
    finally:
        for obj, attr, value in changed:
            if value is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, value)


def torch_lavis_loss(torch_pipeline, latents, noise, timesteps, input_ids, ctx):
    """LAVIS `BlipDiffusion.forward` after the VAE, on diffusers' PyTorch modules."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(torch_pipeline.scheduler.config)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    batch = latents.shape[0]
    hidden = torch_pipeline.text_encoder(input_ids=input_ids.expand(batch, -1), ctx_embeddings=ctx.expand(batch, -1, -1),
                                         ctx_begin_pos=[2] * batch)[0]
    prediction = torch_pipeline.unet(noisy.float(), timesteps, hidden).sample
    return F.mse_loss(prediction.float(), noise.float(), reduction="mean")


def assert_grads_close(grads, expected_grads, tolerance):
    """Per leaf: |jax - torch| <= tolerance * (|torch| + max|torch|) elementwise."""
    for path, expected in expected_grads.items():
        leaf = grads
        for key in path:
            leaf = leaf[key]
        scale = np.abs(expected).max()
        assert scale > 0, path
        np.testing.assert_allclose(np.asarray(leaf), expected, rtol=tolerance, atol=tolerance * scale, err_msg=str(path))
