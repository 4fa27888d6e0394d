"""What the pipelines return: every entry point (generation, ControlNet, edit) returns this one class."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class FlaxBlipDiffusionPipelineOutput:
    images: object  # list of PIL images, or an array (batch, height, width, 3) in [0, 1]
