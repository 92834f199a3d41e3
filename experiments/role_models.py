"""The protocol's three roles: HF checkpoints loaded, the others restored from their checkpoints (trained first
when they have none), and the vocabulary checks that let PoE and ADS mix the teacher's and the proxy's logits."""

from __future__ import annotations

from experiments import io as rio
from experiments import retokenize as retok
from experiments.config import Config, ConfigError
from experiments.distributed import is_main_process
from experiments.tasks.registry import Task, build_task
from experiments.train import RoleModel, Trainer, load_hf_role, load_role_params
from models import hf_loader


def ensure_models(cfg: Config, mesh, progress: bool, task: Task | None = None) -> dict[str, RoleModel]:
    """Load HF roles (`ROLE.hf_dir`); restore the others from their checkpoints, training any that has none yet."""
    task = task or build_task(cfg.task)
    tokenizer = task.tokenizer
    models, hf_tokenizers = {}, {}
    student_tok = cross_tokenizer_student(cfg, tokenizer)  # before any model loads: a refusal costs nothing
    for role in ("teacher", "proxy", "student"):
        if cfg.role(role).hf_dir:
            models[role], hf_tokenizers[role] = load_hf_role(cfg, role, mesh)
            if role == "student" and student_tok is not None:  # its own vocabulary: traces reach it as text
                models[role].tokenizer = student_tok
            else:
                check_task_vocabulary(tokenizer, hf_tokenizers[role], role)
            continue
        ckpt_dir = rio.path(cfg.run_dir) / role / "checkpoints"
        if not ckpt_dir.exists() or not any(p.name.isdigit() for p in ckpt_dir.iterdir()):
            summary = Trainer(cfg, role, mesh, task=task).fit(progress=progress)
            if is_main_process():
                print(f"trained {role}: test accuracy {summary['test_accuracy']:.3f} in {summary['seconds']:.0f}s")
        models[role] = load_role_params(cfg, role, mesh, tokenizer.vocab_size)
    if "teacher" in hf_tokenizers and "proxy" in hf_tokenizers:
        hf_loader.check_shared_vocabulary(hf_tokenizers["teacher"], hf_tokenizers["proxy"])
    t_vocab = models["teacher"].params["embed_vd"].shape[0]
    p_vocab = models["proxy"].params["embed_vd"].shape[0]
    if t_vocab != p_vocab:
        raise ConfigError(
            f"teacher and proxy vocabularies differ ({t_vocab} vs {p_vocab} embedding rows); PoE and ADS need one "
            f"vocabulary: if the tokenizers agree and only the padding differs, set "
            f"{'proxy' if p_vocab < t_vocab else 'teacher'}.model.vocab_rows={max(t_vocab, p_vocab)}"
        )
    return models


def cross_tokenizer_student(cfg: Config, task_tokenizer):
    """The HF student's own tokenizer when it is not the task's (= the teacher's), else None; refuses, in one
    line naming the keys, token-level attacks that cannot cross vocabularies (experiments/retokenize.py)."""
    if not cfg.student.hf_dir:
        return None
    try:
        hf_tok = hf_loader.load_tokenizer(cfg.student.hf_dir)
    except hf_loader.HFLoadError:
        return None  # the loader reports the directory, naming the role
    try:
        check_task_vocabulary(task_tokenizer, hf_tok, "student")
        return None
    except ConfigError:
        pass
    student_tok = retok.wrap_hf_tokenizer(hf_tok, f"{cfg.student.hf_dir}/tokenizer.json")
    retok.refuse_token_level(cfg, student_tok.vocab_size, task_tokenizer.vocab_size)
    return student_tok


def check_task_vocabulary(task_tokenizer, hf_tokenizer, role: str) -> None:
    """The task's token ids must mean the same tokens to an HF role (its tokenizer.json)."""
    if hasattr(task_tokenizer, "tokens"):
        task_vocab = {t: i for i, t in enumerate(task_tokenizer.tokens)}
    elif hasattr(task_tokenizer, "get_vocab"):
        task_vocab = task_tokenizer.get_vocab(with_added_tokens=True)
    else:
        raise ConfigError(
            f"{role}.hf_dir: cannot compare the task tokenizer {task_tokenizer!r} with its tokenizer.json"
        )
    hf_vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
    if task_vocab != hf_vocab:
        diff = sorted(set(task_vocab.items()) ^ set(hf_vocab.items()))[:3]
        raise ConfigError(
            f"{role}.hf_dir: its tokenizer.json ({len(hf_vocab)} tokens) is not the task's tokenizer "
            f"({len(task_vocab)} tokens; e.g. {diff} differ); the task must be tokenized with the model's tokenizer"
            + (
                "; PoE and ADS mix the teacher's and the proxy's logits id by id, so the proxy needs the teacher's (= the "
                "task's) vocabulary"
                if role == "proxy"
                else ""
            )
        )
