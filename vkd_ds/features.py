"""Layer-wise feature capture for L_feat, L_val and the saliency (docs/objective.md).

Forward hooks sit on the mapped decoder layers only (never on every layer),
plus a pre-hook on the LM head whose input is the last hidden state after
the final norm, which the valence heads read. The hooks work the same on a
plain module and inside a ZeRO-3 engine: they see the layer's output, not
its (partitioned) parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vkd_ds.errors import VkdError


def uniform_layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Student layer j of n -> teacher layer round((j+1)·N/n) − 1, halves rounded up (exact integers)."""
    return [(j, ((j + 1) * n_teacher * 2 + n_student) // (2 * n_student) - 1) for j in range(n_student)]


def resolve_layer_map(spec, n_student: int, n_teacher: int, key: str = "feat.layer_map") -> list[tuple[int, int]]:
    """`uniform`, or an explicit list of [student_layer, teacher_layer] pairs (0-based), checked."""
    if spec == "uniform":
        return uniform_layer_map(n_student, n_teacher)
    if not isinstance(spec, (list, tuple)) or not spec:
        raise VkdError(f"config key `{key}` must be `uniform` or a non-empty list of [student, teacher] pairs")
    pairs = []
    for entry in spec:
        if (
            not isinstance(entry, (list, tuple))
            or len(entry) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in entry)
        ):
            raise VkdError(f"config key `{key}`: each entry must be a [student_layer, teacher_layer] pair of ints")
        s, t = int(entry[0]), int(entry[1])
        if not 0 <= s < n_student:
            raise VkdError(f"config key `{key}`: student layer {s} does not exist (the student has {n_student})")
        if not 0 <= t < n_teacher:
            raise VkdError(f"config key `{key}`: teacher layer {t} does not exist (the teacher has {n_teacher})")
        pairs.append((s, t))
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise VkdError(f"config key `{key}`: a student layer appears more than once in {pairs}")
    return pairs


def num_layers(config) -> int:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise VkdError(f"cannot tell how many decoder layers a {type(config).__name__} has")


def hidden_width(config) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise VkdError(f"cannot tell the hidden width of a {type(config).__name__}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of a causal LM's decoder layers (Llama `model.layers`, GPT-2 `transformer.h`, ...)."""
    count = num_layers(model.config)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise VkdError(f"cannot find the {count} decoder layers of {type(model).__name__}")


def attention_module(layer: nn.Module) -> nn.Module:
    for name in ("self_attn", "attn", "attention", "self_attention"):
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise VkdError(f"cannot find the attention module of a {type(layer).__name__}")


class HiddenCapture:
    """Records, during one forward, the outputs of chosen decoder layers, optionally their head-averaged
    attention probabilities, and the last hidden state (the LM head's input). `take()` returns and clears."""

    def __init__(self, model: nn.Module, layers: Sequence[int], attention: bool = False, last: bool = False):
        self.layers = list(layers)
        self._hiddens: dict[int, torch.Tensor] = {}
        self._attentions: dict[int, torch.Tensor] = {}
        self._last: torch.Tensor | None = None
        self.handles = []
        blocks = decoder_layers(model)
        for slot, index in enumerate(self.layers):
            self.handles.append(blocks[index].register_forward_hook(self._hidden_hook(slot)))
            if attention:
                self.handles.append(attention_module(blocks[index]).register_forward_hook(self._attention_hook(slot)))
        if last:
            head = model.get_output_embeddings()
            self.handles.append(head.register_forward_pre_hook(self._last_hook))

    def _hidden_hook(self, slot: int):
        def hook(module, args, output):
            self._hiddens[slot] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def _attention_hook(self, slot: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
            if weights is None:
                raise VkdError(
                    "the attention-map term (feat.attention > 0) needs attention probabilities; "
                    "this model's attention returned none (it must run with attn_implementation=eager)"
                )
            self._attentions[slot] = weights.mean(1)  # [B, S, S], averaged over heads

        return hook

    def _last_hook(self, module, args):
        self._last = args[0]

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        hiddens = [self._hiddens[i] for i in range(len(self.layers))] if self.layers else []
        attentions = [self._attentions[i] for i in range(len(self.layers))] if self._attentions else []
        last = self._last
        self._hiddens, self._attentions, self._last = {}, {}, None
        return hiddens, attentions, last

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
