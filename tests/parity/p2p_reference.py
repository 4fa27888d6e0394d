"""PyTorch references of LAVIS's editing (blip_diffusion.py: generate_then_edit, edit, _ddim_inverse,
_build_prompts_edit, _tokenize_text, _register_attention_control; ptp_utils.py: AttentionRefine, AttentionReplace,
AttentionReweight, LocalBlend, the token mapper and word positions) on diffusers' PyTorch components.

`lavis_*` and the classes below them follow LAVIS (salesforce/LAVIS at 506965b) line by line, with these
changes only, each marked `# NOT LAVIS`:
- the subject embeddings and the starting latents are passed in (LAVIS computes them from the BLIP-2 model and
  a seeded torch generator; the subject encoder has its own parity tests), and the real image arrives encoded
  (VAE posterior mean: LAVIS samples the posterior unseeded);
- AttentionReplace has no LAVIS counterpart on LAVIS's edit prompts: ptp_utils' replacement mapper refuses
  prompts of different word counts, which the "sks" placeholder always makes. `get_replacement_mapper_`
  leaves the placeholder words out of the word comparison and skips their tokens, maps the rest as LAVIS
  does (source token i to edited token j; LAVIS's tail writes mapper[j, j], the same without the skip), and
  the placeholder positions keep their own maps (alphas 0, as in AttentionRefine);
- LocalBlend's layer selection and 16x16 reshape are LAVIS's hard-coded ones: valid for the SD-1.5 block
  layout at 512x512 only, which the tests use.

`Controller` and the functions after it are the generalised variant: any control resolution (LocalBlend's
maps and the self-attention limit from the control resolution, as ours), for the token mapper, LocalBlend
words and equalizer it is given; the tests use it for `placeholder_tokens=False` and for other sizes."""

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


# =========================================================================== LAVIS, line by line
# (Apache-2.0: ptp_utils.py is from google/prompt-to-prompt, Copyright 2022 Google LLC; blip_diffusion.py is
# BSD-3-Clause, Copyright (c) 2023 salesforce.com, inc.)

import abc  # noqa: E402
from typing import Dict, List, Optional, Tuple, Union  # noqa: E402

import torch.nn.functional as nnf  # noqa: E402


class AttentionControl(abc.ABC):

    def step_callback(self, x_t):
        return x_t

    def between_steps(self):
        return

    @property
    def num_uncond_att_layers(self):
        return 0

    @abc.abstractmethod
    def forward(self, attn, is_cross: bool, place_in_unet: str):
        raise NotImplementedError

    def __call__(self, attn, is_cross: bool, place_in_unet: str):
        if self.cur_att_layer >= self.num_uncond_att_layers:
            h = attn.shape[0]
            attn[h // 2:] = self.forward(attn[h // 2:], is_cross, place_in_unet)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers + self.num_uncond_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.between_steps()
        return attn

    def reset(self):
        self.cur_step = 0
        self.cur_att_layer = 0

    def __init__(self):
        self.cur_step = 0
        self.num_att_layers = -1
        self.cur_att_layer = 0


class AttentionStore(AttentionControl):

    @staticmethod
    def get_empty_store():
        return {"down_cross": [], "mid_cross": [], "up_cross": [],
                "down_self": [], "mid_self": [], "up_self": []}

    def forward(self, attn, is_cross: bool, place_in_unet: str):
        key = f"{place_in_unet}_{'cross' if is_cross else 'self'}"
        if attn.shape[1] <= 32 ** 2:  # avoid memory overhead
            self.step_store[key].append(attn)
        return attn

    def between_steps(self):
        if len(self.attention_store) == 0:
            self.attention_store = self.step_store
        else:
            for key in self.attention_store:
                for i in range(len(self.attention_store[key])):
                    self.attention_store[key][i] += self.step_store[key][i]
        self.step_store = self.get_empty_store()

    def reset(self):
        super(AttentionStore, self).reset()
        self.step_store = self.get_empty_store()
        self.attention_store = {}

    def __init__(self):
        super(AttentionStore, self).__init__()
        self.step_store = self.get_empty_store()
        self.attention_store = {}


class LocalBlend:

    def __call__(self, x_t, attention_store):
        k = 1
        maps = attention_store["down_cross"][2:4] + attention_store["up_cross"][:3]
        maps = [item.reshape(self.alpha_layers.shape[0], -1, 1, 16, 16, self.max_num_words) for item in maps]
        maps = torch.cat(maps, dim=1)
        maps = (maps * self.alpha_layers).sum(-1).mean(1)
        mask = nnf.max_pool2d(maps, (k * 2 + 1, k * 2 + 1), (1, 1), padding=(k, k))
        mask = nnf.interpolate(mask, size=(x_t.shape[2:]))
        mask = mask / mask.max(2, keepdims=True)[0].max(3, keepdims=True)[0]
        mask = mask.gt(self.threshold)
        mask = (mask[:1] + mask[1:]).float()
        x_t = x_t[:1] + mask * (x_t - x_t[:1])
        return x_t

    def __init__(self, prompts: List[str], words, tokenizer, device, threshold=.3, max_num_words=77):
        self.max_num_words = 77

        alpha_layers = torch.zeros(len(prompts), 1, 1, 1, 1, self.max_num_words)
        for i, (prompt, words_) in enumerate(zip(prompts, words)):
            if type(words_) is str:
                words_ = [words_]
            for word in words_:
                ind = get_word_inds(prompt, word, tokenizer)
                alpha_layers[i, :, :, :, :, ind] = 1
        self.alpha_layers = alpha_layers.to(device)
        self.threshold = threshold


class AttentionControlEdit(AttentionStore, abc.ABC):

    def step_callback(self, x_t):
        if self.local_blend is not None:
            x_t = self.local_blend(x_t, self.attention_store)
        return x_t

    def replace_self_attention(self, attn_base, att_replace):
        if att_replace.shape[2] <= 16 ** 2:
            return attn_base.unsqueeze(0).expand(att_replace.shape[0], *attn_base.shape)
        else:
            return att_replace

    @abc.abstractmethod
    def replace_cross_attention(self, attn_base, att_replace):
        raise NotImplementedError

    def forward(self, attn, is_cross: bool, place_in_unet: str):
        super(AttentionControlEdit, self).forward(attn, is_cross, place_in_unet)
        if is_cross or (self.num_self_replace[0] <= self.cur_step < self.num_self_replace[1]):
            h = attn.shape[0] // (self.batch_size)
            attn = attn.reshape(self.batch_size, h, *attn.shape[1:])
            attn_base, attn_repalce = attn[0], attn[1:]
            if is_cross:
                alpha_words = self.cross_replace_alpha[self.cur_step]
                attn_repalce_new = self.replace_cross_attention(attn_base, attn_repalce) * alpha_words + (1 - alpha_words) * attn_repalce
                attn[1:] = attn_repalce_new
            else:
                attn[1:] = self.replace_self_attention(attn_base, attn_repalce)
            attn = attn.reshape(self.batch_size * h, *attn.shape[2:])
        return attn

    def __init__(self, prompts, num_steps: int,
                 cross_replace_steps: Union[float, Tuple[float, float], Dict[str, Tuple[float, float]]],
                 self_replace_steps: Union[float, Tuple[float, float]],
                 local_blend: Optional[LocalBlend],
                 tokenizer,
                 device):
        super(AttentionControlEdit, self).__init__()
        self.tokenizer = tokenizer
        self.device = device

        self.batch_size = len(prompts)
        self.cross_replace_alpha = get_time_words_attention_alpha(prompts, num_steps, cross_replace_steps, self.tokenizer).to(self.device)
        if type(self_replace_steps) is float:
            self_replace_steps = 0, self_replace_steps
        self.num_self_replace = int(num_steps * self_replace_steps[0]), int(num_steps * self_replace_steps[1])
        self.local_blend = local_blend


class AttentionReplace(AttentionControlEdit):

    def replace_cross_attention(self, attn_base, att_replace):
        replaced = torch.einsum('hpw,bwn->bhpn', attn_base, self.mapper)
        return replaced * self.alphas + att_replace * (1 - self.alphas)  # NOT LAVIS: the placeholder keeps its maps

    def __init__(self, prompts, num_steps: int, cross_replace_steps: float, self_replace_steps: float,
                 local_blend: Optional[LocalBlend] = None, tokenizer=None, device=None, num_placeholder_words=0):
        super(AttentionReplace, self).__init__(prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend, tokenizer, device)
        self.mapper, alphas = get_replacement_mapper(prompts, self.tokenizer, num_placeholder_words=num_placeholder_words)  # NOT LAVIS: alphas
        self.mapper, alphas = self.mapper.to(self.device), alphas.to(self.device)
        self.alphas = alphas.reshape(alphas.shape[0], 1, 1, alphas.shape[1])


class AttentionRefine(AttentionControlEdit):

    def replace_cross_attention(self, attn_base, att_replace):
        attn_base_replace = attn_base[:, :, self.mapper].permute(2, 0, 1, 3)
        attn_replace = attn_base_replace * self.alphas + att_replace * (1 - self.alphas)
        return attn_replace

    def __init__(self, prompts, num_steps: int, cross_replace_steps: float, self_replace_steps: float,
                 local_blend: Optional[LocalBlend] = None, tokenizer=None, device=None):
        super(AttentionRefine, self).__init__(prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend, tokenizer, device)
        self.mapper, alphas = get_refinement_mapper(prompts, self.tokenizer)
        self.mapper, alphas = self.mapper.to(self.device), alphas.to(self.device)
        self.alphas = alphas.reshape(alphas.shape[0], 1, 1, alphas.shape[1])


class AttentionReweight(AttentionControlEdit):

    def replace_cross_attention(self, attn_base, att_replace):
        if self.prev_controller is not None:
            attn_base = self.prev_controller.replace_cross_attention(attn_base, att_replace)
        attn_replace = attn_base[None, :, :, :] * self.equalizer[:, None, None, :]
        return attn_replace

    def __init__(self, prompts, num_steps: int, cross_replace_steps: float, self_replace_steps: float, equalizer,
                 local_blend: Optional[LocalBlend] = None, controller: Optional[AttentionControlEdit] = None, tokenizer=None, device=None):
        super(AttentionReweight, self).__init__(prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend, tokenizer, device)
        self.equalizer = equalizer.to(self.device)
        self.prev_controller = controller


def get_equalizer(text: str, word_select: Union[int, Tuple[int, ...]], values: Union[List[float], Tuple[float, ...]],
                  tokenizer, num_subject_token=-1):
    if num_subject_token > 0:
        tokens = text.split(" ")
        tokens = [tokens[0]] + ["sks"] * num_subject_token + tokens[1:]
        new_text = " ".join(tokens)
        text = new_text

    if type(word_select) is int or type(word_select) is str:
        word_select = (word_select,)
    equalizer = torch.ones(len(values), 77)
    values = torch.tensor(values, dtype=torch.float32)
    for word in word_select:
        inds = get_word_inds(text, word, tokenizer)
        equalizer[:, inds] = values
    return equalizer


def update_alpha_time_word(alpha, bounds: Union[float, Tuple[float, float]], prompt_ind: int,
                           word_inds: Optional[torch.Tensor] = None):
    if type(bounds) is float:
        bounds = 0, bounds
    start, end = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
    if word_inds is None:
        word_inds = torch.arange(alpha.shape[2])
    alpha[: start, prompt_ind, word_inds] = 0
    alpha[start: end, prompt_ind, word_inds] = 1
    alpha[end:, prompt_ind, word_inds] = 0
    return alpha


def get_time_words_attention_alpha(prompts, num_steps, cross_replace_steps: Union[float, Dict[str, Tuple[float, float]]],
                                   tokenizer, max_num_words=77):
    if type(cross_replace_steps) is not dict:
        cross_replace_steps = {"default_": cross_replace_steps}
    if "default_" not in cross_replace_steps:
        cross_replace_steps["default_"] = (0., 1.)
    alpha_time_words = torch.zeros(num_steps + 1, len(prompts) - 1, max_num_words)
    for i in range(len(prompts) - 1):
        alpha_time_words = update_alpha_time_word(alpha_time_words, cross_replace_steps["default_"], i)
    for key, item in cross_replace_steps.items():
        if key != "default_":
            inds = [get_word_inds(prompts[i], key, tokenizer) for i in range(1, len(prompts))]
            for i, ind in enumerate(inds):
                if len(ind) > 0:
                    alpha_time_words = update_alpha_time_word(alpha_time_words, item, i, ind)
    alpha_time_words = alpha_time_words.reshape(num_steps + 1, len(prompts) - 1, 1, 1, max_num_words)
    return alpha_time_words


class ScoreParams:

    def __init__(self, gap, match, mismatch):
        self.gap = gap
        self.match = match
        self.mismatch = mismatch

    def mis_match_char(self, x, y):
        if x != y:
            return self.mismatch
        else:
            return self.match


def get_matrix(size_x, size_y, gap):
    matrix = np.zeros((size_x + 1, size_y + 1), dtype=np.int32)
    matrix[0, 1:] = (np.arange(size_y) + 1) * gap
    matrix[1:, 0] = (np.arange(size_x) + 1) * gap
    return matrix


def get_traceback_matrix(size_x, size_y):
    matrix = np.zeros((size_x + 1, size_y + 1), dtype=np.int32)
    matrix[0, 1:] = 1
    matrix[1:, 0] = 2
    matrix[0, 0] = 4
    return matrix


def global_align(x, y, score):
    matrix = get_matrix(len(x), len(y), score.gap)
    trace_back = get_traceback_matrix(len(x), len(y))
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = matrix[i, j - 1] + score.gap
            up = matrix[i - 1, j] + score.gap
            diag = matrix[i - 1, j - 1] + score.mis_match_char(x[i - 1], y[j - 1])
            matrix[i, j] = max(left, up, diag)
            if matrix[i, j] == left:
                trace_back[i, j] = 1
            elif matrix[i, j] == up:
                trace_back[i, j] = 2
            else:
                trace_back[i, j] = 3
    return matrix, trace_back


def get_aligned_sequences(x, y, trace_back):
    x_seq = []
    y_seq = []
    i = len(x)
    j = len(y)
    mapper_y_to_x = []
    while i > 0 or j > 0:
        if trace_back[i, j] == 3:
            x_seq.append(x[i - 1])
            y_seq.append(y[j - 1])
            i = i - 1
            j = j - 1
            mapper_y_to_x.append((j, i))
        elif trace_back[i][j] == 1:
            x_seq.append('-')
            y_seq.append(y[j - 1])
            j = j - 1
            mapper_y_to_x.append((j, -1))
        elif trace_back[i][j] == 2:
            x_seq.append(x[i - 1])
            y_seq.append('-')
            i = i - 1
        elif trace_back[i][j] == 4:
            break
    mapper_y_to_x.reverse()
    return x_seq, y_seq, torch.tensor(mapper_y_to_x, dtype=torch.int64)


def get_mapper(x: str, y: str, tokenizer, max_len=77):
    x_seq = tokenizer.encode(x)
    y_seq = tokenizer.encode(y)
    score = ScoreParams(0, 1, -1)
    matrix, trace_back = global_align(x_seq, y_seq, score)
    mapper_base = get_aligned_sequences(x_seq, y_seq, trace_back)[-1]
    alphas = torch.ones(max_len)
    alphas[: mapper_base.shape[0]] = mapper_base[:, 1].ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[:mapper_base.shape[0]] = mapper_base[:, 1]
    mapper[mapper_base.shape[0]:] = len(y_seq) + torch.arange(max_len - len(y_seq))
    return mapper, alphas


def get_refinement_mapper(prompts, tokenizer, max_len=77):
    x_seq = prompts[0]
    mappers, alphas = [], []
    for i in range(1, len(prompts)):
        mapper, alpha = get_mapper(x_seq, prompts[i], tokenizer, max_len)
        mappers.append(mapper)
        alphas.append(alpha)
    return torch.stack(mappers), torch.stack(alphas)


def get_word_inds(text: str, word_place: int, tokenizer):
    split_text = text.split(" ")
    if type(word_place) is str:
        word_place = [i for i, word in enumerate(split_text) if word_place == word]
    elif type(word_place) is int:
        word_place = [word_place]
    out = []
    if len(word_place) > 0:
        words_encode = [tokenizer.decode([item]).strip("#") for item in tokenizer.encode(text)][1:-1]
        cur_len, ptr = 0, 0

        for i in range(len(words_encode)):
            cur_len += len(words_encode[i])
            if ptr in word_place:
                out.append(i + 1)
            if cur_len >= len(split_text[ptr]):
                ptr += 1
                cur_len = 0
    return np.array(out)


def get_replacement_mapper_(x: str, y: str, tokenizer, max_len=77, num_placeholder_words=0):
    words_x = x.split(' ')
    words_y = y.split(' ')
    # NOT LAVIS: the placeholder words (after the first word) are left out of the comparison; their tokens
    # have no source counterpart (alphas 0) and are skipped by the walk below.
    held = list(range(1, 1 + num_placeholder_words))
    kept_y = [i for i in range(len(words_y)) if i not in held]
    held_tokens = [t for w in held for t in get_word_inds(y, w, tokenizer).tolist()]
    if len(words_x) != len(kept_y):
        raise ValueError(f"attention replacement edit can only be applied on prompts with the same length"
                         f" but prompt A has {len(words_x)} words and prompt B has {len(kept_y)} words.")
    inds_replace = [i for i in range(len(kept_y)) if words_y[kept_y[i]] != words_x[i]]
    inds_source = [get_word_inds(x, i, tokenizer) for i in inds_replace]
    inds_target = [get_word_inds(y, kept_y[i], tokenizer) for i in inds_replace]
    mapper = np.zeros((max_len, max_len))
    alphas = np.ones(max_len)
    alphas[held_tokens] = 0
    i = j = 0
    cur_inds = 0
    while i < max_len and j < max_len:
        if j in held_tokens:  # NOT LAVIS
            j += 1
            continue
        if cur_inds < len(inds_source) and inds_source[cur_inds][0] == i:
            inds_source_, inds_target_ = inds_source[cur_inds], inds_target[cur_inds]
            if len(inds_source_) == len(inds_target_):
                mapper[inds_source_, inds_target_] = 1
            else:
                ratio = 1 / len(inds_target_)
                for i_t in inds_target_:
                    mapper[inds_source_, i_t] = ratio
            cur_inds += 1
            i += len(inds_source_)
            j += len(inds_target_)
        elif cur_inds < len(inds_source):
            mapper[i, j] = 1
            i += 1
            j += 1
        else:
            mapper[i, j] = 1  # NOT LAVIS: mapper[j, j] (the same when no placeholder tokens are skipped)
            i += 1
            j += 1

    return torch.from_numpy(mapper).float(), torch.from_numpy(alphas).float()


def get_replacement_mapper(prompts, tokenizer, max_len=77, num_placeholder_words=0):
    x_seq = prompts[0]
    mappers, alphas = [], []
    for i in range(1, len(prompts)):
        mapper, alpha = get_replacement_mapper_(x_seq, prompts[i], tokenizer, max_len, num_placeholder_words)
        mappers.append(mapper)
        alphas.append(alpha)
    return torch.stack(mappers), torch.stack(alphas)


class P2PCrossAttnProcessor:

    def __init__(self, controller, place_in_unet):
        super().__init__()
        self.controller = controller
        self.place_in_unet = place_in_unet

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch_size, sequence_length, _ = hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size=batch_size)

        query = attn.to_q(hidden_states)

        is_cross = encoder_hidden_states is not None
        encoder_hidden_states = encoder_hidden_states if encoder_hidden_states is not None else hidden_states
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        attention_probs = attn.get_attention_scores(query, key, attention_mask)

        # one line change
        if self.controller is not None:
            self.controller(attention_probs, is_cross, self.place_in_unet)

        hidden_states = torch.bmm(attention_probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        return hidden_states


class Lavis:
    """BlipDiffusion's editing methods (blip_diffusion.py) over diffusers' PyTorch components."""

    _CTX_BEGIN_POS = 2

    def __init__(self, tokenizer, text_encoder, unet, vae, pndm_scheduler, ddim_scheduler, num_query_token):
        self.tokenizer, self.text_encoder, self.unet, self.vae = tokenizer, text_encoder, unet, vae
        self.pndm_scheduler, self.ddim_scheduler = pndm_scheduler, ddim_scheduler
        self.num_query_token = num_query_token
        self.device = "cpu"

    whole_word_inversion = True  # NOT LAVIS: False inverts as LAVIS's notebooks do, with "a c sit on sofa"

    def _build_prompt(self, prompts, tgt_subjects, prompt_strength=1.0, prompt_reps=20):
        rv = []
        for prompt, tgt_subject in zip(prompts, tgt_subjects):
            prompt = f"a {tgt_subject} {prompt.strip()}"
            # a trick to amplify the prompt
            rv.append(", ".join([prompt] * int(prompt_strength * prompt_reps)))

        return rv

    def _build_prompts_edit(self, cond_subject, tgt_subject, prompt):
        placeholder = " ".join(["sks"] * self.num_query_token)

        src_prompt = f"a {cond_subject} {prompt}"
        tgt_prompt = f"a {placeholder} {tgt_subject} {prompt}"

        return [src_prompt, tgt_prompt]

    def _predict_noise(self, t, latent_model_input, text_embeddings, width=512, height=512, cond_image=None):
        down_block_res_samples, mid_block_res_sample = None, None

        noise_pred = self.unet(
            latent_model_input,
            timestep=t,
            encoder_hidden_states=text_embeddings,
            down_block_additional_residuals=down_block_res_samples,
            mid_block_additional_residual=mid_block_res_sample,
        )["sample"]

        return noise_pred

    def _init_latent(self, latent, height, width, generator, batch_size):
        latent = latent.expand(  # NOT LAVIS: always given
            batch_size,
            self.unet.config.in_channels,
            height // 8,
            width // 8,
        )
        return latent.to(self.device)

    @torch.no_grad()
    def edit(self, samples, lb_threshold=0.3, guidance_scale=7.5, height=512, width=512, seed=42,
             num_inference_steps=50, num_inversion_steps=50, neg_prompt="", **control):
        latents = samples["image_latents"]  # NOT LAVIS: the VAE posterior mean, scaled

        inv_latents = self._ddim_inverse(
            samples=samples,
            latents=latents,
            seed=seed,
            guidance_scale=1.0,
            height=height,
            width=width,
            num_inference_steps=num_inversion_steps,
        )

        recon_image = self.generate_then_edit(
            samples=samples,
            latents=inv_latents,
            seed=seed,
            neg_prompt=neg_prompt,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            use_inversion=True,
            lb_threshold=lb_threshold,
            **control,  # NOT LAVIS: passes the controller's options on
        )

        return recon_image

    @torch.no_grad()
    def _ddim_inverse(self, samples, latents, guidance_scale=1.0, height=512, width=512, seed=42, num_inference_steps=50):
        src_subject = samples["src_subject"]  # source subject category
        prompt = samples["prompt"]

        prompt = self._build_prompt(
            prompts=prompt,
            tgt_subjects=[src_subject] if self.whole_word_inversion else src_subject,  # NOT LAVIS: see the attribute
            prompt_strength=1.0,
            prompt_reps=1,
        )

        tokenized_prompt = self._tokenize_text(prompt, with_query=False).to(self.device)
        text_embeddings = self.text_encoder(
            input_ids=tokenized_prompt.input_ids,
            ctx_embeddings=None,
        )[0]

        latents = self._init_latent(latents, height, width, None, batch_size=1)

        scheduler = self.ddim_scheduler

        # set timesteps
        extra_set_kwargs = {}
        scheduler.set_timesteps(num_inference_steps, **extra_set_kwargs)

        iterator = reversed(scheduler.timesteps)

        for i, t in enumerate(iterator):
            latents = self._noise_latent_step(
                latents=latents,
                t=t,
                text_embeddings=text_embeddings,
                height=height,
                width=width,
                guidance_scale=guidance_scale,
            )

        return latents

    def _register_attention_refine(self, src_subject, prompts, num_inference_steps, cross_replace_steps=0.8,
                                   self_replace_steps=0.4, threshold=0.3, local_blend=True, controller="refine",
                                   equalizer=None):
        device, tokenizer = self.device, self.tokenizer

        lb = LocalBlend(
            prompts=prompts,
            words=(src_subject,),
            device=device,
            tokenizer=tokenizer,
            threshold=threshold,
        ) if local_blend else None  # NOT LAVIS: LocalBlend can be off

        # NOT LAVIS: LAVIS registers AttentionRefine; AttentionReplace and AttentionReweight (ptp_utils, the
        # prompt-to-prompt notebooks' way: the reweighting on top of a refine or replace controller) are options.
        kind = AttentionRefine if controller == "refine" else AttentionReplace
        options = {} if controller == "refine" else {"num_placeholder_words": self.num_query_token}
        controller = kind(
            prompts,
            num_inference_steps,
            cross_replace_steps=cross_replace_steps,
            self_replace_steps=self_replace_steps,
            tokenizer=tokenizer,
            device=device,
            local_blend=lb,
            **options,
        )
        if equalizer is not None:
            words, values = tuple(equalizer), tuple(equalizer.values())
            # get_equalizer's text: the edited prompt without the placeholder, which it puts back
            plain = " ".join(w for i, w in enumerate(prompts[1].split(" ")) if not 1 <= i <= self.num_query_token)
            weights = torch.ones(1, 77)
            for word, value in zip(words, values):
                weights = weights * get_equalizer(plain, word, (value,), tokenizer, num_subject_token=self.num_query_token)
            controller = AttentionReweight(
                prompts, num_inference_steps, cross_replace_steps=cross_replace_steps,
                self_replace_steps=self_replace_steps, equalizer=weights, local_blend=lb, controller=controller,
                tokenizer=tokenizer, device=device,
            )

        self._register_attention_control(controller)

        return controller

    def _register_attention_control(self, controller):
        attn_procs = {}
        cross_att_count = 0
        for name in self.unet.attn_processors.keys():
            if name.startswith("mid_block"):
                place_in_unet = "mid"
            elif name.startswith("up_blocks"):
                place_in_unet = "up"
            elif name.startswith("down_blocks"):
                place_in_unet = "down"
            else:
                continue
            cross_att_count += 1
            attn_procs[name] = P2PCrossAttnProcessor(
                controller=controller, place_in_unet=place_in_unet
            )

        self.unet.set_attn_processor(attn_procs)
        if controller is not None:
            controller.num_att_layers = cross_att_count

    @torch.no_grad()
    def generate_then_edit(self, samples, cross_replace_steps=0.8, self_replace_steps=0.4, guidance_scale=7.5,
                           height=512, width=512, latents=None, seed=42, num_inference_steps=250, neg_prompt="",
                           use_inversion=False, lb_threshold=0.3, **control):
        src_subject = samples["src_subject"]
        tgt_subject = samples["tgt_subject"]  # target subject category

        prompt = samples["prompt"]
        assert len(prompt) == 1, "Do not support multiple prompts for now"
        prompt = self._build_prompts_edit(src_subject, tgt_subject, prompt[0])

        controller = self._register_attention_refine(
            src_subject=src_subject,
            prompts=prompt,
            num_inference_steps=num_inference_steps,
            cross_replace_steps=cross_replace_steps,
            self_replace_steps=self_replace_steps,
            threshold=lb_threshold,
            **control,
        )

        query_embeds = samples["query_embeds"]  # NOT LAVIS: self.forward_ctx_embeddings(cond_image, cond_subject)

        tokenized_prompt_bef = self._tokenize_text(prompt[:1], with_query=False).to(self.device)
        tokenized_prompt_aft = self._tokenize_text(prompt[1:], with_query=True).to(self.device)

        text_embeddings_bef = self.text_encoder(
            input_ids=tokenized_prompt_bef.input_ids,
        )[0]
        text_embeddings_aft = self.text_encoder(
            input_ids=tokenized_prompt_aft.input_ids,
            ctx_embeddings=query_embeds,
            ctx_begin_pos=[self._CTX_BEGIN_POS],
        )[0]

        text_embeddings = torch.cat([text_embeddings_bef, text_embeddings_aft], dim=0)

        # 3. unconditional embedding
        do_classifier_free_guidance = guidance_scale > 1.0

        batch_size = 2

        if do_classifier_free_guidance:
            max_length = self.text_encoder.text_model.config.max_position_embeddings

            uncond_input = self.tokenizer(
                [neg_prompt],
                padding="max_length",
                max_length=max_length,
                return_tensors="pt",
            )

            uncond_embeddings = self.text_encoder(
                input_ids=uncond_input.input_ids.to(self.device),
                ctx_embeddings=None,
            )[0]
            # repeat the uncond embedding to match the number of prompts
            uncond_embeddings = uncond_embeddings.expand(batch_size, -1, -1)

            text_embeddings = torch.cat([uncond_embeddings, text_embeddings])

        latents = self._init_latent(latents, height, width, None, batch_size)

        scheduler = self.pndm_scheduler if not use_inversion else self.ddim_scheduler
        # set timesteps
        scheduler.set_timesteps(num_inference_steps)

        iterator = scheduler.timesteps

        for i, t in enumerate(iterator):
            latents = self._denoise_latent_step(
                latents=latents,
                t=t,
                text_embeddings=text_embeddings,
                height=height,
                width=width,
                guidance_scale=guidance_scale,
                use_inversion=use_inversion,
            )

            latents = controller.step_callback(latents)

        image = self._latent_to_image(latents)
        controller.reset()

        return image

    def _latent_to_image(self, latents):
        latents = 1 / 0.18215 * latents
        image = self.vae.decode(latents).sample

        image = (image / 2 + 0.5).clamp(0, 1)
        image = image.cpu().permute(0, 2, 3, 1).numpy()

        return image  # NOT LAVIS: numpy_to_pil(image); the tests round as it does, (image * 255).round()

    def _noise_latent_step(self, latents, t, text_embeddings, guidance_scale, height, width):
        def backward_ddim(x_t, alpha_t, alpha_tm1, eps_xt):
            """from noise to image"""
            return (
                alpha_tm1**0.5
                * (
                    (alpha_t**-0.5 - alpha_tm1**-0.5) * x_t
                    + ((1 / alpha_tm1 - 1) ** 0.5 - (1 / alpha_t - 1) ** 0.5) * eps_xt
                )
                + x_t
            )

        do_classifier_free_guidance = guidance_scale > 1.0

        latent_model_input = (
            torch.cat([latents] * 2) if do_classifier_free_guidance else latents
        )

        # predict the noise residual
        noise_pred = self._predict_noise(
            t=t,
            latent_model_input=latent_model_input,
            text_embeddings=text_embeddings,
            width=width,
            height=height,
        )

        scheduler = self.ddim_scheduler

        prev_timestep = (
            t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        )
        alpha_prod_t = scheduler.alphas_cumprod[t]
        alpha_prod_t_prev = (
            scheduler.alphas_cumprod[prev_timestep]
            if prev_timestep >= 0
            else scheduler.final_alpha_cumprod
        )
        alpha_prod_t, alpha_prod_t_prev = alpha_prod_t_prev, alpha_prod_t
        latents = backward_ddim(
            x_t=latents,
            alpha_t=alpha_prod_t,
            alpha_tm1=alpha_prod_t_prev,
            eps_xt=noise_pred,
        )

        return latents

    def _denoise_latent_step(self, latents, t, text_embeddings, guidance_scale, height, width, cond_image=None,
                             use_inversion=False):
        if use_inversion:
            noise_placeholder = []

        # expand the latents if we are doing classifier free guidance
        do_classifier_free_guidance = guidance_scale > 1.0

        latent_model_input = (
            torch.cat([latents] * 2) if do_classifier_free_guidance else latents
        )

        # predict the noise residual
        noise_pred = self._predict_noise(
            t=t,
            latent_model_input=latent_model_input,
            text_embeddings=text_embeddings,
            width=width,
            height=height,
            cond_image=cond_image,
        )

        if use_inversion:
            noise_placeholder.append(noise_pred[2].unsqueeze(0))

        # perform guidance
        if do_classifier_free_guidance:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (
                noise_pred_text - noise_pred_uncond
            )

        if use_inversion:
            noise_placeholder.append(noise_pred[-1].unsqueeze(0))
            noise_pred = torch.cat(noise_placeholder)

        # compute the previous noisy sample x_t -> x_t-1
        scheduler = self.ddim_scheduler if use_inversion else self.pndm_scheduler

        latents = scheduler.step(
            noise_pred,
            t,
            latents,
        )["prev_sample"]

        return latents

    def _tokenize_text(self, text_input, with_query=True):
        max_len = self.text_encoder.text_model.config.max_position_embeddings
        if with_query:
            max_len -= self.num_query_token

        tokenized_text = self.tokenizer(
            text_input,
            padding="max_length",
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        )

        return tokenized_text
