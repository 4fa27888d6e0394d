"""Silence the one-line Flax deprecation notices diffusers and transformers print for every Flax class.

We pin the last releases that still ship those classes on purpose; users should see only our messages.
"""

import logging

_NOTICES = ("Flax classes are deprecated", "TensorFlow and JAX classes are deprecated")
_LOGGERS = (
    "diffusers.models.modeling_flax_utils",
    "diffusers.schedulers.scheduling_utils_flax",
    "diffusers.pipelines.pipeline_flax_utils",
    "transformers.modeling_flax_utils",
)


class _DropFlaxDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in str(record.msg) for notice in _NOTICES)


def silence_flax_deprecation() -> None:
    for name in _LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropFlaxDeprecation) for f in log.filters):
            log.addFilter(_DropFlaxDeprecation())
