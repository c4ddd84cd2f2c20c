"""The contract every PEFT method implements.

A method is one folder under ``peftlab/methods/`` whose ``__init__.py`` calls :func:`register` with a
:class:`MethodSpec` (both live in the leaf module :mod:`peftlab.registry`, re-exported here).
``spec.apply(model, config)`` modifies the model in place (wrapping modules, adding parameters) and returns a
:class:`PeftMethod` object that the trainer, evaluator and saver talk to. The core never switches on method names:
anything a method does to the inputs (soft prompts, prefixes) goes through :meth:`PeftMethod.prepare_inputs`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.models.arch import is_tied
from peftlab.registry import MethodSpec, SizeKnob, all_methods, get_method, register

__all__ = ["BaseModelHandle", "LayerwiseMergeable", "MethodSpec", "ParamGroup", "PeftMethod", "SizeKnob",
           "all_methods", "freeze_all", "get_method", "register"]


@dataclass(frozen=True)
class ParamGroup:
    """Trainable parameters that share one learning-rate multiplier (an optimizer parameter group).

    Attributes:
        name: what the group holds (``"all"``, ``"lora_B"``, ...), for messages and tests.
        params: name -> parameter, keys as in :meth:`PeftMethod.trainable_parameters`.
        lr_scale: the group's learning rate is ``lr_scale * train.lr``; the schedule (warmup, decay) then scales
            every group's own rate by the same factor.
    """

    name: str
    params: dict[str, nn.Parameter]
    lr_scale: float = 1.0


class PeftMethod:
    """A method applied to one model.

    Subclasses set ``self.model`` (the modified model) and ``self.config`` (their config dataclass) and override
    :meth:`trainable_parameters`; the other hooks have defaults that suit methods that only add or unfreeze weights.
    """

    model: nn.Module
    config: Any

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Name -> parameter for every weight this method trains (names are stable keys for saving)."""
        raise NotImplementedError

    def param_groups(self) -> list[ParamGroup]:
        """The trainable parameters split into groups with their own learning-rate multipliers.

        The groups partition :meth:`trainable_parameters` (every parameter in exactly one group). The default is
        one group at multiplier 1; a method whose paper trains some weights at another rate overrides it (LoRA+:
        B at ``loraplus_lr_ratio`` times A's rate). The trainer builds one AdamW group per (group, decay / no decay).
        """
        return [ParamGroup("all", self.trainable_parameters())]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """What is saved as the adapter: by default the trainable parameters, detached, on CPU, contiguous."""
        return {k: v.detach().to("cpu").contiguous() for k, v in self.trainable_parameters().items()}

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy saved adapter weights in; a missing or unexpected key or a shape mismatch raises ``ValueError``."""
        params = self.trainable_parameters()
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"adapter weights do not match this model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        with torch.no_grad():
            for name, param in params.items():
                value = state[name]
                if value.shape != param.shape:
                    raise ValueError(
                        f"adapter weight {name!r} has shape {tuple(value.shape)}, "
                        f"the model expects {tuple(param.shape)}"
                    )
                param.copy_(value.to(param.device, param.dtype))

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Model keyword arguments for a batch.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T), 1 for real tokens.
            labels: (B, T) with -100 where no loss is taken, or None at generation time.

        Returns:
            ``input_ids`` or ``inputs_embeds`` (B, T', d), ``attention_mask`` (B, T') and, when given, ``labels``
            (B, T'); methods that prepend virtual tokens return T' = n + T with masks and labels extended.
        """
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if labels is not None:
            out["labels"] = labels
        return out

    def frozen_trunk(self) -> bool:
        """True when nothing before the output head trains, so the trunk's hidden states depend only on the input.

        The trainer may then compute each training example's trunk features once and reuse them in later epochs
        (``train.cache_frozen_trunk``). The default, False, is always safe.
        """
        return False

    def frozen_blocks(self) -> int:
        """How many transformer blocks, counted from the bottom, compute the same output for an example whatever
        training does: nothing in them or below them trains (embeddings included) and :meth:`prepare_inputs` leaves
        the inputs as they are.

        The trainer may then compute the hidden states entering the first trained block once per training example
        and run only the blocks above in later epochs (``train.cache_frozen_trunk``); the FLOP count charges those
        bottom blocks a forward pass only. The default, 0, is always safe; :meth:`frozen_trunk` takes precedence.
        """
        return 0

    def after_training(self) -> None:
        """Called once after training, before the adapter is saved (e.g. prefix tuning folds its MLP into P)."""

    @property
    def mergeable(self) -> bool:
        """True when :meth:`merge` folds the method into the base weights (inference without overhead)."""
        return False

    def merge(self) -> None:
        """Fold the method into the base weights; a no-op for methods that are not mergeable."""

    def unmerge(self) -> None:
        """Undo :meth:`merge`."""

    def describe(self) -> dict[str, Any]:
        """Facts recorded in the result's ``train_info['method']`` (e.g. whether a head was untied)."""
        return {}


class LayerwiseMergeable(PeftMethod):
    """A method made of wrapped layers that each fold into their base weight (LoRA, IA3).

    Subclasses set ``self.layers`` (name -> layer with ``merge()``/``unmerge()``), ``self._tied`` (targets whose
    weight is also the input embedding: merging those would change the inputs too) and ``merge_label``.
    """

    layers: dict[str, nn.Module]
    _tied: list[str]
    merge_label: str = "method"

    def __init__(self, model: nn.Module, config: Any, layers: dict[str, nn.Module], tied: list[str]) -> None:
        self.model = model
        self.config = config
        self.layers = layers
        self._tied = tied

    @property
    def mergeable(self) -> bool:
        """False when a target shares its weight with the input embeddings (a tied LM head)."""
        return not self._tied

    def merge(self) -> None:
        if not self.mergeable:
            warnings.warn(f"{self.merge_label} not merged: {self._tied} share their weight with the input embeddings",
                          stacklevel=2)
            return
        for layer in self.layers.values():
            layer.merge()

    def unmerge(self) -> None:
        for layer in self.layers.values():
            layer.unmerge()


class BaseModelHandle(PeftMethod):
    """The base model as loaded, behind the :class:`PeftMethod` interface (zero-shot evaluation): nothing is
    trainable, nothing is wrapped, frozen or cast (a bf16 base stays bf16), and the inputs pass through."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = None

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {}

    def describe(self) -> dict[str, Any]:
        """Whether the head is tied (what zero-shot results recorded when the ``full`` method was the handle)."""
        return {"tied": is_tied(self.model)}


def freeze_all(model: nn.Module) -> None:
    """Set ``requires_grad=False`` on every parameter (methods then unfreeze or add what they train)."""
    for p in model.parameters():
        p.requires_grad_(False)
