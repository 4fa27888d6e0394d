"""The demo picture: the shipped toy model (`blipdiff_jax.TOY_MODEL`) carrying subjects it never saw in
training from a reference picture into new scenes.

Each row: the reference (the subject on a cluttered background), then generations of "a {shape} on a
{background} background" on three backgrounds. The prompt names the shape and the background only: the
colour and the pattern can come from nowhere but the reference.
"""

from __future__ import annotations

from . import TOY_GUIDANCE

DEMO_SUBJECTS = (("star", "yellow", "solid"), ("square", "blue", "striped"), ("triangle", "pink", "striped"))
DEMO_BACKGROUNDS = ("gray", "beige", "black")
SCALE = 4  # the 32-pixel pictures are shown 4x, pixels kept sharp


def transfer_sheet(pipeline, params, seed: int = 0, steps: int = 25, guidance: float = TOY_GUIDANCE, subjects=DEMO_SUBJECTS,
                   backgrounds=DEMO_BACKGROUNDS, progress: bool = False):
    """(PIL sheet, settings): one row per subject, reference then one generation per background."""
    import jax
    from PIL import Image, ImageDraw

    from . import toyworld

    size = toyworld.IMAGE_SIZE
    prompts, references, categories = [], [], []
    for row, subject in enumerate(subjects):
        reference = toyworld.render_subject(*subject, background=None, seed=seed * 101 + row)
        for background in backgrounds:
            prompts.append(toyworld.prompt_for(background))
            references.append(reference)
            categories.append(subject[0])
    out = pipeline(prompts, references, categories, categories, params=params, prng_seed=jax.random.PRNGKey(seed),
                   height=size, width=size, num_inference_steps=steps, guidance_scale=guidance, progress=progress)
    cell, label = size * SCALE, 14
    columns = 1 + len(backgrounds)
    sheet = Image.new("RGB", (columns * cell + (columns - 1) * 4, label + len(subjects) * (cell + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for col, title in enumerate(["reference"] + [f"on {b}" for b in backgrounds]):
        draw.text((col * (cell + 4) + 2, 1), title, fill=(0, 0, 0))
    for row in range(len(subjects)):
        top = label + row * (cell + 4)
        sheet.paste(references[row * len(backgrounds)].resize((cell, cell), Image.NEAREST), (0, top))
        for col in range(len(backgrounds)):
            image = out.images[row * len(backgrounds) + col]
            sheet.paste(image.resize((cell, cell), Image.NEAREST), ((col + 1) * (cell + 4), top))
    settings = {"model": "toy model (blipdiff_jax.TOY_MODEL)", "subjects": [" ".join(s) for s in subjects],
                "backgrounds": list(backgrounds), "seed": seed, "steps": steps, "guidance": guidance}
    return sheet, settings
