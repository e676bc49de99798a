"""Teacher and student models: local Hugging Face causal LMs, or a student built from a config.

No DeepSpeed here: `engines.py` decides how these are constructed and sharded.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vkd_ds.errors import VkdError, library_reason
from vkd_ds.features import HiddenCapture, hidden_width
from vkd_ds.losses import fused_head_losses
from vkd_ds.valence import ValenceHead


def load_tokenizer(path: str, key: str = "data.tokenizer_path"):
    from transformers import AutoTokenizer

    _require_dir(path, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise VkdError(f"no usable tokenizer in {path} ({key}): {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of every loss; any id will do, EOS is the convention.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    return tokenizer


def _require_dir(path: str | None, key: str) -> Path:
    if not path or not Path(path).is_dir():
        raise VkdError(f"{key}: directory not found: {path}")
    return Path(path)


def load_model_config(path: str, key: str):
    """The transformers config of a local model directory (no weights are read)."""
    from transformers import AutoConfig

    directory = _require_dir(path, key)
    if not (directory / "config.json").is_file():
        raise VkdError(f"{key}: {directory} has no config.json (not a Hugging Face model directory)")
    try:
        return AutoConfig.from_pretrained(str(directory))
    except Exception as err:  # unreadable JSON, an unknown model_type, transformers' validation of the sizes
        raise VkdError(f"{key}: cannot read {directory / 'config.json'}: {library_reason(err)}") from None


def model_config_from_dict(config: dict, key: str):
    """A transformers config from a config.json's contents (e.g. the teacher's, stored in a teacher cache)."""
    from transformers import AutoConfig

    fields = dict(config)
    model_type = fields.pop("model_type", None)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as err:
        raise VkdError(f"{key}: cannot rebuild the teacher's config: {library_reason(err)}") from None


def student_config_from_dict(spec: dict, vocab_size: int):
    """A transformers config from `student.config` (model_type plus keys)."""
    import transformers
    from transformers import CONFIG_MAPPING, AutoConfig

    fields = dict(spec)
    model_type = fields.pop("model_type", None)
    if not model_type:
        raise VkdError("student.config needs a `model_type` (e.g. llama, qwen2, gpt2, mistral)")
    if model_type not in CONFIG_MAPPING:
        raise VkdError(
            f"student.config.model_type: transformers {transformers.__version__} has no model type "
            f"{model_type!r} (e.g. llama, qwen2, gpt2, mistral)"
        )
    fields.setdefault("vocab_size", vocab_size)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as err:  # transformers' own checks raise several types (ValueError, its strict-dataclass errors)
        raise VkdError(f"student.config: transformers rejects it: {library_reason(err)}") from None


def check_buildable(config, key: str) -> None:
    """transformers builds a causal LM of `config` on the meta device (no memory, no weights read):
    its checks of sizes, activations and architecture run here, before any process starts."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
    except Exception as err:  # whatever transformers raises, one line naming the key
        raise VkdError(f"{key}: transformers cannot build a causal LM from it: {library_reason(err)}") from None


def parameter_count(config) -> int:
    """Parameters of a causal LM of `config` (tied ones once), counted on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def check_vocab(tokenizer_len: int, model_vocab: int, who: str) -> None:
    """Embedding tables padded past the tokenizer (e.g. 152064 for 151936 tokens) are fine;
    a table smaller than the tokenizer is a real mismatch."""
    if model_vocab < tokenizer_len:
        raise VkdError(
            f"vocabulary mismatch: the tokenizer has {tokenizer_len} tokens but the {who} "
            f"has only {model_vocab} embeddings"
        )


def check_same_tokenizer(tokenizer, other_dir: str, who: str) -> None:
    """A student directory that ships its own tokenizer must ship the same one."""
    directory = Path(other_dir)
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        return
    other = load_tokenizer(str(directory))
    if other.get_vocab() != tokenizer.get_vocab():
        raise VkdError(
            f"vocabulary mismatch: the {who} at {directory} ships a tokenizer that differs from "
            f"data.tokenizer_path ({len(other)} vs {len(tokenizer)} tokens, or different ids)"
        )


class StudentModule(nn.Module):
    """Everything the student engine trains: the LM, the feature projectors and the valence head.

    `forward` returns a dict: `logits` [B,S,V]; `hiddens`, the student's mapped layers already
    projected to the teacher's width (a list of [B,S,Ht]); `attentions` (head-averaged, when the
    attention-map term is on); `valence` [B,S,k] (when there is a head); `reg`, Σ‖θ‖² over the
    projectors, the valence head and the LM parameters matching `reg_patterns` (a scalar).
    With `fused_head`, CE and soft KD come out per sequence instead of `logits` (see forward).
    Checkpoints hold this module's state dict; `lm.` prefixes the plain LM's weights.
    """

    LM_PREFIX = "lm."
    VALENCE_PREFIX = "valence_head."

    def __init__(
        self,
        lm: nn.Module,
        feat_layers: Sequence[int] = (),
        teacher_width: int | None = None,
        projectors: bool = True,
        valence_k: int | None = None,
        attention: bool = False,
        reg_patterns: Sequence[str] = (),
        fused_head: bool = False,
        dtype: torch.dtype | None = None,
    ):
        """`dtype`: the LM's parameter dtype (the engine's precision); the projectors and the valence
        head are built in it too, because DeepSpeed's bf16 and ZeRO optimizers flatten all trainable
        parameters into one buffer of one dtype."""
        super().__init__()
        self.lm = lm
        self.fused_head = fused_head
        width = hidden_width(lm.config)
        self.projectors = None
        if feat_layers and teacher_width is not None and teacher_width != width:
            if not projectors:
                raise VkdError(
                    f"feature KD: the student's width {width} differs from the teacher's {teacher_width} "
                    "and feat.projectors=false; enable projectors or map layers of equal width"
                )
            self.projectors = nn.ModuleList(nn.Linear(width, teacher_width) for _ in feat_layers)
        self.valence_head = ValenceHead(width, valence_k) if valence_k else None
        if dtype is not None:
            for extra in (self.projectors, self.valence_head):
                if extra is not None:
                    extra.to(dtype)
        self.capture = HiddenCapture(lm, feat_layers, attention=attention, last=self.valence_head is not None)
        self.reg_names = [
            name
            for name, param in self.named_parameters()
            if param.requires_grad
            and (
                name.startswith(("projectors.", self.VALENCE_PREFIX))
                or any(fnmatch.fnmatchcase(name[len(self.LM_PREFIX) :], pat) for pat in reg_patterns)
            )
        ]
        params = dict(self.named_parameters())
        # Read by this module's forward outside their own submodules (the regularizer, the fused
        # head): under ZeRO-3 the engine builder registers them as external parameters of this module.
        self.external_params = [params[name] for name in self.reg_names]
        if fused_head:
            self.external_params += list(lm.get_output_embeddings().parameters())

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        fused: dict | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`fused` (with the fused LM head): the arguments of `losses.fused_head_losses` but the head's
        (mask, targets and/or teacher_logits, divergence, vocab_size, chunk_tokens, token_weights,
        sequences); then `ce` and `soft` per sequence replace `logits` in the output. `position_ids`
        with no `attention_mask`: a packed batch (sequences.model_inputs)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            inputs["position_ids"] = position_ids
        if self.fused_head and fused is not None:
            hidden = self.lm.base_model(**inputs)
            last = hidden.last_hidden_state
            head = self.lm.get_output_embeddings()
            ce, soft = fused_head_losses(last, head.weight, head.bias, **fused)
            hiddens, attentions, _ = self.capture.take()
            out = {"ce": ce, "soft": soft}
        else:
            logits = self.lm(**inputs).logits
            hiddens, attentions, last = self.capture.take()
            out = {"logits": logits}
        if self.projectors is not None:
            hiddens = [proj(h) for proj, h in zip(self.projectors, hiddens, strict=True)]
        out.update(hiddens=hiddens, attentions=attentions)
        if self.valence_head is not None:
            out["valence"] = self.valence_head(last)
        params = dict(self.named_parameters())
        reg = input_ids.new_zeros((), dtype=torch.float32)
        for name in self.reg_names:
            reg = reg + params[name].float().pow(2).sum()
        out["reg"] = reg
        return out
