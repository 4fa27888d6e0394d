"""The evaluation's metric models against transformers' PyTorch classes: CLIPModel (CLIP-I, CLIP-T) and ViTModel
(DINO's architecture), tiny and random, converted strictly by convert/metrics.py and read back without torch.
Features within 1e-5, scores within 1e-4; the preprocessing as transformers' own CLIP image processor."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from support.metric_models import IMAGE_SIZE, converted_metric_model, save_torch_metric_model
from transformers import CLIPImageProcessor

from blipdiff_jax.evaluation.metric_models import preprocess
from blipdiff_jax.evaluation.metrics import load_metric_model, real_image_scores, subject_scores
from convert.mapping import ConversionError
from convert.metrics import IMAGENET_MEAN, IMAGENET_STD, read_metric_directory

FEATURES, SCORES = 1e-5, 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("metric-models"))
    torch_clip, clip_dir = converted_metric_model("clip", root, seed=1)
    torch_dino, dino_dir = converted_metric_model("dino", root, seed=2)
    return torch_clip, torch_dino, load_metric_model(clip_dir, "clip"), load_metric_model(dino_dir, "dino")


def _photos(count, seed):
    """Photos of varied shapes and sizes (some smaller than the crop, some not square)."""
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, size=(30 + 9 * i, 41 - 3 * i, 3), dtype=np.uint8)) for i in range(count)]


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a[:, None], b[None], dim=-1)


def test_dino_features_and_score_equal_pytorch_vit(models):
    torch_clip, torch_dino, clip, dino = models
    generated, real = _photos(3, 0), _photos(4, 1)
    with torch.no_grad():
        def torch_features(images):
            return torch_dino(torch.from_numpy(dino.pixels(images))).last_hidden_state[:, 0]

        expected_features, expected_real = torch_features(generated), torch_features(real)
        expected_score = _cos(expected_features, expected_real).mean(dim=1).numpy()
    ours = dino.image_features(generated)
    assert ours.shape == (3, 32) and np.abs(expected_features.numpy()).max() > 0.1
    np.testing.assert_allclose(ours, expected_features.numpy(), rtol=0, atol=FEATURES)
    scores = subject_scores(dino, clip, generated, ["a dog"] * 3, real)
    np.testing.assert_allclose(scores[:, 0], expected_score, rtol=0, atol=SCORES)


def test_clip_image_and_text_features_and_scores_equal_pytorch_clip(models):
    torch_clip, torch_dino, clip, dino = models
    generated, real = _photos(3, 2), _photos(2, 3)
    texts = ["a dog in the snow", "a red teapot", "a dog in the snow"]
    tokens = clip.tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        image = torch_clip.get_image_features(torch.from_numpy(clip.pixels(generated)))
        real_image = torch_clip.get_image_features(torch.from_numpy(clip.pixels(real)))
        text = torch_clip.get_text_features(tokens.input_ids, attention_mask=tokens.attention_mask)
        clip_i = _cos(image, real_image).mean(dim=1).numpy()
        clip_t = torch.nn.functional.cosine_similarity(image, text, dim=-1).numpy()
    np.testing.assert_allclose(clip.image_features(generated), image.numpy(), rtol=0, atol=FEATURES)
    np.testing.assert_allclose(clip.text_features(texts), text.numpy(), rtol=0, atol=FEATURES)
    scores = subject_scores(dino, clip, generated, texts, real)
    np.testing.assert_allclose(scores[:, 1], clip_i, rtol=0, atol=SCORES)
    np.testing.assert_allclose(scores[:, 2], clip_t, rtol=0, atol=SCORES)


def test_more_images_than_one_chunk_and_real_photos_against_each_other(models):
    """Features do not depend on the chunk an image falls in (20 images: a full chunk of 16 and a padded one);
    the real photos' bound averages each photo against the others, itself left out."""
    _, _, clip, dino = models
    photos = _photos(5, 4) * 4
    features = dino.image_features(photos)
    np.testing.assert_array_equal(features[:5], features[15:])
    np.testing.assert_allclose(features[:5], dino.image_features(photos[:5]), rtol=0, atol=1e-6)
    bound = real_image_scores([photos[:3]], dino, clip)
    f = dino.image_features(photos[:3]).astype(np.float64)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    pairs = [f[i] @ f[j] for i in range(3) for j in range(3) if i != j]
    assert bound["images"] == 3 and bound["clip_t"] is None
    assert bound["dino"] == pytest.approx(np.mean(pairs), abs=1e-9)


@pytest.mark.parametrize("resize, crop, mean, std", [
    (IMAGE_SIZE, IMAGE_SIZE, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),  # CLIP's
    (round(IMAGE_SIZE * 256 / 224), IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD),  # DINO's: 37 then a 32 crop
], ids=["clip", "dino"])
def test_preprocessing_equals_transformers_image_processor(resize, crop, mean, std):
    """Short side resized (bicubic), center crop, normalised: as CLIPImageProcessor does it, on photos whose
    crop margins are even (for an odd margin torchvision, whose offsets DreamBooth's metrics used and ours
    follow, rounds half to even where transformers floors)."""
    processor = CLIPImageProcessor(size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop},
                                   resample=Image.BICUBIC, image_mean=list(mean), image_std=list(std))
    rng = np.random.RandomState(5)
    photos = [Image.fromarray(rng.randint(0, 256, size=(h, w, 3), dtype=np.uint8)) for h, w in ((61, 40), (50, 82))]
    for photo in photos:
        expected = processor(photo, return_tensors="np").pixel_values
        ours = preprocess([photo], resize, crop, mean, std)
        assert ours.shape == (1, 3, crop, crop)
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-5)


def test_conversion_is_strict(tmp_path):
    """A tensor missing or one too many: the conversion names it."""
    from safetensors.numpy import load_file, save_file

    folder = str(tmp_path / "dino")
    save_torch_metric_model("dino", folder, seed=3)
    weights = os.path.join(folder, "model.safetensors")
    state = load_file(weights)
    missing = dict(state)
    del missing["encoder.layer.1.output.dense.bias"]
    save_file(missing, weights)
    with pytest.raises(ConversionError, match=r"missing tensors.*encoder\.layer\.1\.output\.dense\.bias"):
        read_metric_directory(folder)
    save_file({**state, "head.weight": np.zeros((2, 32), np.float32)}, weights)
    with pytest.raises(ConversionError, match="unexpected tensors.*head.weight"):
        read_metric_directory(folder)
    save_file(state, weights)
    with pytest.raises(ValueError, match="vit model, not a clip one"):
        read_metric_directory(folder, kind="clip")
