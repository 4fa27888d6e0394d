"""Write a converted model into a directory that already holds other things (checkpoints, previews, logs).

`save_converted` refuses an existing directory; here it writes to a staging folder inside `out`, whose
entries then replace the model entries of `out` one rename at a time. `model_index.json` is removed first
and renamed into place last, so `out` is either the old model, the new one, or (after a kill in the middle)
no loadable model at all: never a mix that loads.
"""

from __future__ import annotations

import os
import shutil
import uuid

from ..checkpoint import ConvertedModel, save_converted

INDEX = "model_index.json"


def write_converted_into(model: ConvertedModel, out: str) -> str:
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    staging = save_converted(model, os.path.join(out, f".export-{tag}"))
    trash = os.path.join(out, f".export-old-{tag}")
    os.makedirs(trash)
    index = os.path.join(out, INDEX)
    if os.path.exists(index):
        os.rename(index, os.path.join(trash, INDEX))
    for name in sorted(os.listdir(staging)):
        if name == INDEX:
            continue
        target = os.path.join(out, name)
        if os.path.lexists(target):
            os.rename(target, os.path.join(trash, name))
        os.rename(os.path.join(staging, name), target)
    os.rename(os.path.join(staging, INDEX), index)
    os.rmdir(staging)
    shutil.rmtree(trash)
    return out
