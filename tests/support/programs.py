"""Compiled programs as data: shape-only arguments of the generation program, and readers of jaxprs and of
XLA's compiled HLO text."""

import jax
import jax.numpy as jnp


def abstract_generate_args(pipeline, params, latent_size: int = 8):
    """Shape-only arguments for the pipeline's generation program (`_generate_jit`, `_generate`): one
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
