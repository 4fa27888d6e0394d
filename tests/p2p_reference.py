"""A PyTorch reference of LAVIS's editing semantics (generate_then_edit, edit, _ddim_inverse, AttentionRefine,
LocalBlend) on diffusers' PyTorch UNet through attention processors. Written for the tests, independent of
the JAX code except for the host-side token mapper (tested on its own)."""

import numpy as np
import torch
import torch.nn.functional as F


class Controller:
    """AttentionRefine + LocalBlend for a batch [source, edited], conditional half only (as LAVIS)."""

    def __init__(self, cross_alpha, self_window, mapper, alphas, blend_words, threshold, control_pixels, guided,
                 use_blend=True, equalizer=None):
        self.equalizer = torch.ones(77) if equalizer is None else torch.as_tensor(equalizer)
        self.cross_alpha = torch.as_tensor(cross_alpha)
        self.self_window = torch.as_tensor(self_window)
        self.mapper = torch.as_tensor(mapper)  # (77,) indices: AttentionRefine; (77, 77): AttentionReplace
        self.alphas = torch.as_tensor(alphas)
        self.blend_words = torch.as_tensor(blend_words)
        self.threshold, self.control_pixels, self.guided, self.use_blend = threshold, control_pixels, guided, use_blend
        self.step, self.step_maps, self.store = 0, [], None

    def __call__(self, probs, is_cross, place, heads):
        half = probs.shape[0] // 2 if self.guided else 0
        cond = probs[half:].reshape(2, heads, *probs.shape[1:]).clone()
        base, edited = cond[0], cond[1]
        if is_cross and place in ("down", "up") and probs.shape[1] == self.control_pixels:
            self.step_maps.append((base * self.blend_words).sum(-1))  # (heads, q)
        if is_cross:
            if self.mapper.ndim == 2:
                moved = torch.einsum("hpw,wn->hpn", base, self.mapper)
            else:
                moved = base[:, :, self.mapper.long()]
            refined = (moved * self.alphas + edited * (1 - self.alphas)) * self.equalizer
            a = self.cross_alpha[self.step]
            cond[1] = refined * a + edited * (1 - a)
        elif probs.shape[1] <= self.control_pixels and self.self_window[self.step] > 0:
            cond[1] = base
        out = probs.clone()
        out[half:] = cond.reshape(-1, *probs.shape[1:])
        return out

    def end_step(self, latents):
        """LocalBlend after the scheduler step; maps summed over steps, averaged over layers and heads."""
        maps = torch.cat(self.step_maps).mean(0)
        self.step_maps = []
        self.step += 1
        self.store = maps if self.store is None else self.store + maps
        if not self.use_blend:
            return latents
        h, w = latents.shape[2:]
        side = int(round((h * w / self.control_pixels) ** 0.5))
        mask = self.store.reshape(1, 1, h // side, w // side)
        mask = F.max_pool2d(mask, (3, 3), (1, 1), padding=(1, 1))
        mask = F.interpolate(mask, size=(h, w))
        mask = (mask / mask.max()).gt(self.threshold).float()
        return torch.cat([latents[:1], latents[:1] + mask * (latents[1:] - latents[:1])])


class Processor:
    def __init__(self, controller, place):
        self.controller, self.place = controller, place

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        is_cross = encoder_hidden_states is not None
        source = encoder_hidden_states if is_cross else hidden_states
        query = attn.head_to_batch_dim(attn.to_q(hidden_states))
        key = attn.head_to_batch_dim(attn.to_k(source))
        value = attn.head_to_batch_dim(attn.to_v(source))
        probs = attn.get_attention_scores(query, key, None)
        probs = self.controller(probs, is_cross, self.place, attn.heads)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def attach(unet, controller):
    processors = {name: Processor(controller, name.split("_")[0]) for name in unet.attn_processors}
    unet.set_attn_processor(processors)


def edit_loop(unet, scheduler, latents, context, guidance, steps, controller, real_image):
    scheduler.set_timesteps(steps)
    guided = guidance > 1.0
    for t in scheduler.timesteps:
        inp = torch.cat([latents] * 2) if guided else latents
        noise = unet(inp, t, encoder_hidden_states=context).sample
        if guided:
            uncond, cond = noise.chunk(2)
            mixed = uncond + guidance * (cond - uncond)
            noise = torch.cat([cond[:1], mixed[1:]]) if real_image else mixed
        latents = scheduler.step(noise, t, latents).prev_sample
        latents = controller.end_step(latents)
    return latents


def ddim_invert(unet, scheduler, latents, context, steps):
    """LAVIS `_ddim_inverse` at guidance 1."""
    scheduler.set_timesteps(steps)
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    for t in reversed(scheduler.timesteps):
        eps = unet(latents, t, encoder_hidden_states=context).sample
        prev = int(t) - stride
        a_from = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
        a_to = scheduler.alphas_cumprod[int(t)]
        latents = a_to**0.5 * ((a_from**-0.5 - a_to**-0.5) * latents + ((1 / a_to - 1) ** 0.5 - (1 / a_from - 1) ** 0.5) * eps) + latents
    return latents


def decode(vae, latents):
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
