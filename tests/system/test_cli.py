"""The `blipdiff-jax` CLI: the README's demo command (the toy transfer picture; `--tiny`: the random-weight
install check) and `generate` on a model directory."""

import os

import numpy as np
import pytest
from support.images import make_image
from support.paths import shared_image
from PIL import Image

from blipdiff_jax.checkpoint import save_converted
from blipdiff_jax.cli import main


def test_tiny_demo_writes_a_png_offline(tmp_path, capsys):
    out = tmp_path / "demo.png"
    assert main(["demo", "--tiny", "--out", str(out), "--steps", "2"]) == 0
    image = Image.open(out)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert "RANDOM weights" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_draws_the_toy_transfer_picture(tmp_path):
    """The README's first command: the shipped toy model, a row per held-out subject (reference, then three
    backgrounds), each generation read back by the toy analyser: 8 of the 9 take their reference's colour and
    all 9 their prompt's background here (chance: 1 in 8 and 1 in 4 each; benchmarks/results-toy.md measures
    over 208 generations)."""
    from blipdiff_jax import demo, toyworld

    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out)]) == 0
    sheet = Image.open(out)
    cell = toyworld.IMAGE_SIZE * demo.SCALE
    rows, columns = len(demo.DEMO_SUBJECTS), 1 + len(demo.DEMO_BACKGROUNDS)
    assert sheet.size == (columns * cell + (columns - 1) * 4, 14 + rows * (cell + 4))
    assert "toy model" in sheet.text["model"] and sheet.text["steps"] == "25"
    colours, backgrounds = [], []
    for row, subject in enumerate(demo.DEMO_SUBJECTS):
        for col, background in enumerate(demo.DEMO_BACKGROUNDS, start=1):
            box = (col * (cell + 4), 14 + row * (cell + 4))
            found = toyworld.analyse(sheet.crop(box + (box[0] + cell, box[1] + cell)).resize((32, 32), Image.NEAREST))
            colours.append(found["colour"] == subject[1])
            backgrounds.append(found["background"] == background)
    assert sum(colours) >= 7 and sum(backgrounds) >= 8, (colours, backgrounds)


@pytest.mark.slow
def test_generate_from_a_converted_directory(converted_model, tmp_path):
    model_dir = save_converted(converted_model, str(tmp_path / "model"))
    reference = tmp_path / "ref.png"
    make_image(20, (48, 40)).save(reference)
    out = tmp_path / "sub" / "out.png"
    code = main(["generate", "--model", model_dir, "--image", str(reference), "--subject", "dog", "--prompt",
                 "swimming underwater", "--out", str(out), "--steps", "2", "--height", "16", "--width", "24", "--seed", "3"])
    assert code == 0
    assert Image.open(out).size == (24, 16)
    assert np.asarray(Image.open(out)).std() > 0


@pytest.mark.slow
def test_generate_from_a_pytorch_directory_with_a_real_photo(torch_pipeline_dir, tmp_path):
    out = tmp_path / "out.png"
    code = main(["generate", "--model", torch_pipeline_dir, "--image", shared_image("dog.png"), "--subject", "dog",
                 "--out", str(out), "--steps", "2", "--height", "16", "--width", "16"])
    assert code == 0 and out.exists()


@pytest.mark.parametrize("extra,message", [
    (["--height", "30"], "height"),
    (["--steps", "0"], "num_inference_steps"),
    (["--image", "/no/such.png"], "reference_image"),
])
def test_bad_arguments_exit_2_with_one_line(converted_model, tmp_path, capsys, extra, message):
    args = ["demo", "--tiny", "--out", str(tmp_path / "x.png")] + extra
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_generate_with_a_control_image_and_canny(torch_controlnet_pipeline_dir, tmp_path):
    reference, structure = tmp_path / "ref.png", tmp_path / "structure.png"
    make_image(21).save(reference)
    make_image(22, (40, 40)).save(structure)
    out = tmp_path / "styled.png"
    code = main(["generate", "--model", torch_controlnet_pipeline_dir, "--image", str(reference), "--subject", "flower",
                 "--target-subject", "teapot", "--prompt", "on a marble table", "--control-image", str(structure),
                 "--canny", "30", "70", "--out", str(out), "--steps", "2", "--height", "16", "--width", "16"])
    assert code == 0 and Image.open(out).size == (16, 16)


@pytest.mark.slow
def test_stylization_example_from_the_cli(torch_controlnet_pipeline_dir, tmp_path):
    out = tmp_path / "teapot.png"
    code = main(["generate", "--model", torch_controlnet_pipeline_dir, "--image", shared_image("flower.jpg"),
                 "--subject", "flower", "--target-subject", "teapot", "--prompt", "on a marble table",
                 "--control-image", shared_image("kettle.jpg"), "--canny", "30", "70", "--out", str(out),
                 "--steps", "2", "--height", "32", "--width", "32"])
    assert code == 0 and out.exists()


# The CLI's `edit`: system/test_new_user.py (a converted directory; its image equals the API's edit, side by side)
# and parity/test_editing.py (a PyTorch directory, default inversion steps; against LAVIS).


@pytest.mark.slow
def test_virtual_try_on_from_the_cli(torch_pipeline_dir, tmp_path):
    out = tmp_path / "tryon.png"
    code = main(["edit", "--model", torch_pipeline_dir, "--image", shared_image("dress-model.png"),
                 "--reference", shared_image("green-skirt.png"), "--subject", "skirt", "--original-subject", "dress",
                 "--prompt", "", "--out", str(out), "--steps", "2", "--height", "16", "--width", "16"])
    assert code == 0 and out.exists()


@pytest.mark.slow
def test_several_images_grid_metadata_and_output_dir(tmp_path, capsys):
    out, folder = tmp_path / "grid.png", tmp_path / "each"
    assert main(["demo", "--tiny", "--out", str(out), "--steps", "2", "--height", "16", "--width", "16", "--num-images", "3",
                 "--seed", "7", "--output-dir", str(folder), "--prompt", "on the moon"]) == 0
    grid = Image.open(out)
    assert grid.size == (48, 16)
    assert grid.text["prompt"] == "on the moon" and grid.text["seed"] == "7" and "tiny" in grid.text["model"]
    singles = sorted(os.listdir(folder))
    assert singles == ["7-000.png", "7-001.png", "7-002.png"]
    first = np.asarray(Image.open(folder / singles[0]))
    np.testing.assert_array_equal(np.asarray(grid)[:, :16], first)
    assert not np.array_equal(first, np.asarray(Image.open(folder / singles[1])))  # each from its own noise
    printed = capsys.readouterr().out
    assert "compiling" in printed and "sampling" in printed and "compilation cache" in printed


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("generate", "edit", "demo"):
        assert command in text
