"""Where things are: the repository, and ../shared/ (real photos and the real-size architecture), which a
fresh clone does not have."""

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = os.path.join(ROOT, "..", "shared")
FULL_CONFIG = os.path.join(SHARED, "reference", "blipdiffusion_full.json")  # the real-size architecture


def shared_image(name: str) -> str:
    path = os.path.join(SHARED, "images", name)
    if not os.path.isfile(path):
        pytest.skip(f"../shared/images/{name} is not here (a fresh clone has no ../shared/); core behaviour is tested on generated images")
    return path
