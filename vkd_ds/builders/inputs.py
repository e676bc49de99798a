"""The run's inputs, every one checked before anything is built or written (no process group needed)."""

from __future__ import annotations

from dataclasses import dataclass

from vkd_ds.builders.objective import build_objective
from vkd_ds.cross_tokenizer import check_records, cross_vocab
from vkd_ds.errors import VkdError
from vkd_ds.features import hidden_width, num_layers, resolve_layer_map
from vkd_ds.models import (
    check_buildable,
    check_same_tokenizer,
    check_vocab,
    load_model_config,
    load_tokenizer,
    model_config_from_dict,
    student_config_from_dict,
)
from vkd_ds.objective import Objective
from vkd_ds.packing import PackedRows, packed_rows
from vkd_ds.settings import Settings
from vkd_ds.token_store import TokenRows, open_splits
from vkd_ds.valence import load_head


@dataclass
class Prepared:
    tokenizer: object
    student_config: object
    train_data: TokenRows
    valid_data: TokenRows | list  # [] without data.valid_path
    objective: Objective
    teacher_width: int
    data_notes: list[str]  # skipped, cut and prompt-only records: logged at start
    settings: Settings
    data_splits: dict | None = None  # open_splits' {split: (config value, rows)}: what a teacher cache holds
    cache_manifest: dict | None = None  # teacher.cache's, checked against this run
    teacher_parameters: int | None = None  # teacher.path's, its checkpoint checked against its config
    packs: PackedRows | None = None  # the training rows packed (data.packing), None unpacked

    @property
    def loads_teacher(self) -> bool:
        """Whether the ranks load teacher.path: a term needs its outputs, or the gate its valence
        baseline; never with teacher.cache (the settings refused every term that needs it live)."""
        s = self.settings
        return not s.teacher.cache and (self.objective.needs_teacher or s.gate.enabled)


def prepare(cfg) -> Prepared:
    """Every input check, with no side effects (no process group needed); the settings of the run."""
    s = Settings.from_config(cfg)
    if s.teacher.path is not None:
        teacher_config = load_model_config(s.teacher.path, "teacher.path")
    else:  # teacher.cache without the teacher: its config comes from the cache's manifest
        from vkd_ds.teacher_cache import read_manifest

        teacher_config = model_config_from_dict(read_manifest(s.teacher.cache)["teacher"]["config"], "teacher.cache")
    tokenizer = load_tokenizer(s.data.tokenizer_path)
    vocab = len(tokenizer)
    cross = cross_vocab(s, tokenizer)
    teacher_vocab = cross.teacher_vocab if cross is not None else vocab
    check_vocab(teacher_vocab, teacher_config.vocab_size, f"teacher ({s.teacher.path})")
    if s.student.path is not None:
        student_config = load_model_config(s.student.path, "student.path")
        check_same_tokenizer(tokenizer, s.student.path, "student")
    else:
        student_config = student_config_from_dict(s.student.config, vocab)
    check_vocab(vocab, student_config.vocab_size, "student")
    check_buildable(teacher_config, "teacher.path")
    teacher_parameters = None
    if s.teacher.path is not None:
        from vkd_ds.teacher_load import check_checkpoint

        teacher_parameters = check_checkpoint(teacher_config, s.teacher.path).parameters
    check_buildable(student_config, "student.path" if s.student.path is not None else "student.config")
    # Tokenized once into token stores (found again by fingerprint on every later start).
    splits = open_splits(s.data, tokenizer)
    if cross is not None:
        check_records(splits)
    train_data = splits["train"][1]
    valid_data = splits["valid"][1] if "valid" in splits else []
    _check_prompts(s, train_data)
    layer_map = resolve_layer_map(s.feat.layer_map, num_layers(student_config), num_layers(teacher_config))
    objective = build_objective(s, layer_map, vocab, cross)
    teacher_width, student_width = hidden_width(teacher_config), hidden_width(student_config)
    if objective.layer_map and teacher_width != student_width and not s.feat.projectors:
        raise VkdError(
            f"feat.projectors=false but the student's width ({student_width}) differs from the teacher's "
            f"({teacher_width}): feature KD needs projectors (feat.projectors=true) or equal widths"
        )
    if objective.fused_head:
        for key in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
            if getattr(student_config, key, None):
                raise VkdError(
                    f"loss.fused_head=true: the student's config sets {key}, so its logits are not "
                    "hidden @ W.T and the fused LM head would compute the wrong loss; set loss.fused_head=false"
                )
    if s.valence.teacher_head:
        load_head(s.valence.teacher_head, int(s.valence.k), teacher_width)
    manifest = None
    if s.teacher.cache:
        from vkd_ds.teacher_cache import check_for_training

        teacher_tokenizer = None if cross is None else cross.teacher_tokenizer
        manifest = check_for_training(s, tokenizer, splits, s.valence_feeds_the_loss, teacher_tokenizer)
    notes = [note for _, rows in splits.values() for note in rows.notes()]
    # Across tokenizers each row is re-tokenized for the teacher: one document per row (settings refuse true).
    packing = False if cross is not None else s.data.packing
    packs = packed_rows(packing, train_data, int(s.data.max_seq_len), s.data.pack_length)
    return Prepared(
        tokenizer,
        student_config,
        train_data,
        valid_data,
        objective,
        teacher_width,
        notes,
        s,
        splits,
        manifest,
        teacher_parameters,
        packs,
    )


def _check_prompts(s: Settings, train_data: TokenRows) -> None:
    """The student samples from prompts (L_seq, on-policy steps): a record without a prompt takes its
    first seq_kd.prompt_tokens tokens, which must leave room for a completion in data.max_seq_len."""
    samples = s.loss.weights["seq"] > 0 or s.onpolicy.fraction > 0
    if not samples or s.seq_kd.prompt_tokens < s.data.max_seq_len:
        return
    textual = train_data.text_rows
    if textual:
        user = "onpolicy.fraction > 0" if s.onpolicy.fraction > 0 else "loss.seq > 0"
        raise VkdError(
            f"{user} samples from prompts, and {textual} row(s) of data.train_path have none: their "
            f"prompt is their first seq_kd.prompt_tokens ({s.seq_kd.prompt_tokens}) tokens, which leaves no room "
            f"in data.max_seq_len ({s.data.max_seq_len}); lower seq_kd.prompt_tokens"
        )
