"""``ZOSFTTrainer``: TRL's ``SFTTrainer`` with zoft's zeroth-order step.

Everything supervised-fine-tuning is TRL's: dataset preparation (chat templates, prompt-completion
pairs, packing), the labels it builds (completion-only and assistant-only loss: tokens outside
the loss are -100), the collator (padded or padding-free), evaluation and its metrics. The step
is ``ZOTrainingMixin``'s (see ``zoft.integrations.trainer``).

A probe's loss is the one TRL minimises for ``loss_type="nll"``: the summed NLL of the labelled
tokens over the batch's labelled-token count (``num_items_in_batch``), computed from that probe's
logits through the model's loss function. TRL's own training forward takes another route, a fused
LM head that reads the head's weight outside the head module's call, where the engine's unit
hooks would not perturb it; evaluation keeps TRL's route (the pending update is flushed first).
Packed padding-free batches stack P copies of their rows; the model rebuilds each row's
block-diagonal document mask from ``position_ids`` (sdpa and eager attention).

``SFTConfig`` defaults to ``bf16=True``: the probes' forwards then run under bf16 autocast, whose
rounding of a loss (~1e-3 on a small model) can be as large as the difference a perturbation at
``eps=1e-3`` makes; take a larger ``eps`` or set ``bf16=False`` (and load the model in the
precision the loss differences should be taken in).
"""
from __future__ import annotations

from trl import SFTTrainer

from zoft.errors import UsageError
from zoft.integrations.trainer import ZOTrainingMixin


class ZOSFTTrainer(ZOTrainingMixin, SFTTrainer):
    """``trl.SFTTrainer`` with zoft's zeroth-order step; takes ``SFTTrainer``'s arguments plus the
    ``zo_*`` ones of ``ZOTrainingMixin``::

        trainer = ZOSFTTrainer(model=model, args=SFTConfig("out", learning_rate=1e-6, max_steps=1000),
                               train_dataset=chats, zo_optimizer="mezo-sgd", zo_options={"eps": 1e-3})
        trainer.train()
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.loss_type != "nll":
            raise UsageError(f"ZOSFTTrainer minimises TRL's loss_type='nll'; '{self.args.loss_type}' weights "
                             "tokens by the model's own probabilities, which is not implemented for ZO steps")


__all__ = ["ZOSFTTrainer"]
