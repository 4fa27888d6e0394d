"""Writes the notebooks of this folder (without outputs): `python notebooks/make_notebooks.py`.

Each notebook opens in Colab, installs the project in its first cell, shows `jax.devices()`, loads the Hub
model (converted once, then cached), and generates one image per device through the multi-device path.
With `BLIPDIFF_NOTEBOOK_MODEL=tiny` it runs end to end offline on the embedded tiny random-weight model
(that is how the test suite runs them).
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

REPO = "github.com/blipdiff-jax/blipdiff-jax"  # where the project is published: the Colab badge and install use it
HERE = os.path.dirname(os.path.abspath(__file__))


def badge(name: str) -> str:
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"(https://colab.research.google.com/{REPO.replace('github.com', 'github')}/blob/main/notebooks/{name})")


INSTALL = f'''# Install blipdiff-jax (Colab: TPU or GPU runtime). On a TPU runtime JAX's TPU build comes with Colab.
import importlib.util, os, subprocess, sys
if importlib.util.find_spec("blipdiff_jax") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "git+https://{REPO}"])
TINY = os.environ.get("BLIPDIFF_NOTEBOOK_MODEL") == "tiny"  # the test suite's offline run
print("embedded tiny random-weight model (offline check)" if TINY else "real model from the Hub")'''

DEVICES = '''import jax, jax.numpy as jnp, numpy as np
from IPython.display import display
from blipdiff_jax.image_processing import image_grid
print(jax.devices())
num_devices = jax.local_device_count()'''

PHOTOS = '''# Photos from the BLIP-Diffusion project (LAVIS, BSD-3-Clause): ../shared/images when present, else downloaded;
# offline (tiny mode) a generated picture stands in.
import io, pathlib, urllib.request
from PIL import Image
LAVIS_IMAGES = "https://raw.githubusercontent.com/salesforce/LAVIS/main/projects/blip-diffusion/images/"

def photo(name, seed=0):
    local = pathlib.Path("../../shared/images") / name
    if local.exists():
        return Image.open(local).convert("RGB")
    if not TINY:
        return Image.open(io.BytesIO(urllib.request.urlopen(LAVIS_IMAGES + name).read())).convert("RGB")
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))'''


def load_cell(pipeline_class: str, hub_id: str, controlnet: bool = False) -> str:
    return f'''import tempfile
from blipdiff_jax import {pipeline_class}
from blipdiff_jax import tiny
if TINY:
    pipeline, params = {pipeline_class}.from_converted(tiny.build_tiny_model(tempfile.mkdtemp(){", controlnet=True" if controlnet else ""}))
    size, steps = 32, 4
else:  # downloads once, converts once into ~/.cache/blipdiff-jax, then reuses the converted copy
    pipeline, params = {pipeline_class}.from_pretrained("{hub_id}")
    size, steps = 512, 50'''


def per_device(call: str) -> str:
    return f'''# One image per device: params replicated (pipeline.replicate, as flax.jax_utils.replicate), prompts split over devices
# (diffusers' Flax convention).
prompts = [PROMPT] * num_devices
out = {call}
display(image_grid(out.images, rows=1))'''


def write(name: str, title: str, cells: list) -> None:
    notebook = new_notebook(cells=[new_markdown_cell(f"# {title}\n\n{badge(name)}"), new_code_cell(INSTALL),
                                   new_code_cell(DEVICES), new_code_cell(PHOTOS)] + cells)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["accelerator"] = "TPU"
    nbformat.write(notebook, os.path.join(HERE, name))


def main() -> None:
    write("zero_shot.ipynb", "Zero-shot subject-driven generation", [
        new_markdown_cell("A reference photo and its category word (\"dog\") become subject embeddings; the "
                          "prompt says what the dog does."),
        new_code_cell(load_cell("FlaxBlipDiffusionPipeline", "Salesforce/blipdiffusion")),
        new_code_cell('dog = photo("dog.png")\nPROMPT = "swimming underwater"\ndisplay(dog.resize((128, 128)))'),
        new_code_cell(per_device('pipeline(prompts, dog, "dog", "dog", params=pipeline.replicate(params), jit=True,\n'
                                 '               prng_seed=jax.random.PRNGKey(0), height=size, width=size, num_inference_steps=steps)')),
        new_markdown_cell("Subject embeddings are a value: compute once, reuse for many prompts."),
        new_code_cell('emb = pipeline.encode_subject(dog, "dog", params)\n'
                      'out = pipeline(["on the beach", "in the snow"], None, None, "dog", params=params, subject_embeddings=emb,\n'
                      '               prng_seed=jax.random.PRNGKey(1), height=size, width=size, num_inference_steps=steps)\n'
                      'display(image_grid(out.images))'),
    ])
    write("stylization_controlnet.ipynb", "Stylization with ControlNet", [
        new_markdown_cell("Style subject \"flower\" from one photo, structure from the canny edges of a kettle, "
                          "rendered as a \"teapot\"."),
        new_code_cell(load_cell("FlaxBlipDiffusionControlNetPipeline", "Salesforce/blipdiffusion-controlnet", controlnet=True)),
        new_code_cell('from blipdiff_jax.image_processing import canny\n'
                      'flower, edges = photo("flower.jpg", 1), canny(photo("kettle.jpg", 2), 30, 70)\n'
                      'PROMPT = "on a marble table"\ndisplay(image_grid([flower.resize((128, 128)), edges.resize((128, 128))]))'),
        new_code_cell(per_device('pipeline(prompts, flower, edges, "flower", "teapot", params=pipeline.replicate(params), jit=True,\n'
                                 '               prng_seed=jax.random.PRNGKey(0), height=size, width=size, num_inference_steps=steps)')),
    ])
    write("editing.ipynb", "Subject-driven editing: synthetic, real image, virtual try-on", [
        new_markdown_cell("Prompt-to-prompt attention control with LocalBlend, as LAVIS's editing notebooks. "
                          "Each edit shows the source (generated or reconstructed) image, then the edit."),
        new_code_cell(load_cell("FlaxBlipDiffusionPipeline", "Salesforce/blipdiffusion")),
        new_code_cell('dog = photo("dog.png")\nPROMPT = "sitting on a sofa"'),
        new_code_cell(per_device('pipeline(prompts, dog, "dog", "dog", params=pipeline.replicate(params), jit=True,\n'
                                 '               prng_seed=jax.random.PRNGKey(0), height=size, width=size, num_inference_steps=steps)')),
        new_markdown_cell("Synthetic editing: generate \"a cat sitting on a sofa\", then edit the cat into the dog."),
        new_code_cell('out = pipeline.edit(PROMPT, dog, "dog", "dog", "cat", params=params, prng_seed=jax.random.PRNGKey(42),\n'
                      '                    height=size, width=size, num_inference_steps=steps)\ndisplay(image_grid(out.images))'),
        new_markdown_cell("Real image: DDIM-invert a photo of a cat on a sofa, then edit."),
        new_code_cell('out = pipeline.edit(PROMPT, dog, "dog", "dog", "cat", image=photo("cat-sofa.png", 3), params=params,\n'
                      '                    height=size, width=size, num_inference_steps=steps, num_inversion_steps=steps)\n'
                      'display(image_grid(out.images))'),
        new_markdown_cell("Virtual try-on: the dress of a model replaced by a green skirt."),
        new_code_cell('out = pipeline.edit("", photo("green-skirt.png", 4), "skirt", "skirt", "dress", image=photo("dress-model.png", 5),\n'
                      '                    params=params, height=size, width=size, num_inference_steps=steps, num_inversion_steps=steps)\n'
                      'display(image_grid(out.images))'),
    ])
    write("finetuning.ipynb", "Subject fine-tuning", [
        new_markdown_cell("LAVIS's recipe: a few photos of one subject fine-tune the UNet and the subject embeddings; "
                          "the result generates that subject with no reference image."),
        new_code_cell(FINETUNE_SETUP),
        new_code_cell('out_dir = tempfile.mkdtemp() + "/dog-model"\n'
                      'SubjectFinetuner(model, FinetuneConfig(images=str(photos), subject="dog", out=out_dir, **settings)).train()\n'
                      'print(open(out_dir + "/loss.jsonl").read()[:300])'),
        new_code_cell('pipeline, params = FlaxBlipDiffusionPipeline.from_pretrained(out_dir)\nPROMPT = "on the beach"'),
        new_code_cell(per_device('pipeline(prompts, None, None, "dog", params=pipeline.replicate(params), jit=True,\n'
                                 '               prng_seed=jax.random.PRNGKey(0), height=size, width=size, num_inference_steps=steps)')),
    ])


FINETUNE_SETUP = '''import tempfile
from blipdiff_jax import FlaxBlipDiffusionPipeline, tiny
from blipdiff_jax.checkpoint import load_converted
from blipdiff_jax.hub import resolve_hub_model
from blipdiff_jax.training import FinetuneConfig, SubjectFinetuner
photos = pathlib.Path(tempfile.mkdtemp())
local = pathlib.Path("../../shared/images/dreambooth-dog").exists()
for i in range(5):  # the DreamBooth dog of LAVIS's examples
    photo(f"dreambooth-dog/{i:02d}.jpg" if local else f"dreambooth/dog/{i:02d}.jpg", 10 + i).save(photos / f"{i:02d}.png")
if TINY:
    model = tiny.build_tiny_model(tempfile.mkdtemp())
    settings = dict(steps=4, batch_size=2, resolution=32, learning_rate=1e-3)
    size, steps = 32, 4
else:
    model = load_converted(resolve_hub_model("Salesforce/blipdiffusion"))
    settings = dict(steps=40, batch_size=3, resolution=512)  # LAVIS's finetune-db settings
    size, steps = 512, 50'''


if __name__ == "__main__":
    main()
