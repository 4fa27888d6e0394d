"""Subject fine-tuning (LAVIS BLIP-Diffusion `finetune-db-*`): see `trainer.py`.

    from blipdiff_jax.training import FinetuneConfig, SubjectFinetuner
"""


def __getattr__(name):
    # Lazy, so the CLI can build its parser without importing jax.
    if name in ("FinetuneConfig", "SubjectFinetuner", "finetune", "make_optimizer", "make_train_step"):
        from . import trainer

        return getattr(trainer, name)
    if name == "DiffusionLoss":
        from .loss import DiffusionLoss

        return DiffusionLoss
    raise AttributeError(name)


__all__ = ["DiffusionLoss", "FinetuneConfig", "SubjectFinetuner", "finetune", "make_optimizer", "make_train_step"]
