"""Subject fine-tuning (LAVIS BLIP-Diffusion `finetune-db-*`): see `trainer.py`.

    from blipdiff_jax.training import FinetuneConfig, SubjectFinetuner

Modules: config (settings), data (images, captions, data order), loss (the LAVIS loss), trainer (the jitted
step and the loop), checkpoints (orbax, loss log), export (the model written into OUT), cli (`finetune`).
"""

_EXPORTS = {"FinetuneConfig": "config", "DiffusionLoss": "loss", "SubjectFinetuner": "trainer", "finetune": "trainer",
            "make_optimizer": "trainer", "make_train_step": "trainer"}


def __getattr__(name):
    # Lazy: the CLI builds its parser without importing the trainer, optax or orbax.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(name)


__all__ = sorted(_EXPORTS)
