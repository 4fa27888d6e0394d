"""Silence the one-line Flax deprecation notices diffusers and transformers print for every Flax class.

We pin the last releases that still ship those classes on purpose; users should see only our messages.
The notices come from many module loggers that propagate to each library's root handler, so the filter
sits on those handlers.
"""

import logging

_NOTICES = ("Flax classes are deprecated", "TensorFlow and JAX classes are deprecated")


class _DropFlaxDeprecation(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not any(notice in str(record.msg) for notice in _NOTICES)


def silence_flax_deprecation() -> None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    targets = []
    for library in (diffusers_logging, transformers_logging):
        root = library.get_logger()  # also installs the library's default handler
        targets += [root, *root.handlers]
    # Module loggers too: a logger's own filter also holds for records that propagate elsewhere (pytest, the
    # user's root handler). Call again after importing more Flax modules.
    for name, log in list(logging.root.manager.loggerDict.items()):
        if name.startswith(("diffusers.", "transformers.")) and isinstance(log, logging.Logger):
            targets.append(log)
    for target in targets:
        if not any(isinstance(f, _DropFlaxDeprecation) for f in target.filters):
            target.addFilter(_DropFlaxDeprecation())
