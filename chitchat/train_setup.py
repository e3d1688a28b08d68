"""Setting up a training run: which run (new or resumed), its data, model, optimizer,
precision and schedule, and the state the loop starts from (`setup`).

`chitchat.training` runs the loop over what `setup` returns.
"""
from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from . import allocator
from .batching import WindowTable, build_windows, collate_rows, epoch_rows, plan_steps
from .budget import TimeBudget, parse_duration
from .checkpoint import (check_run_dir, check_same_data, checkpoints_of,
                         find_resume_checkpoint, load_checkpoint, merge_resume_options,
                         restore_tensors, set_aside_newer, set_aside_unfinished,
                         trim_metrics)
from .config import TrainConfig
from .distributed import DistInfo, broadcast_text
from .loss import LossModel
from .modeling import (build_model, check_same_vocab, is_reverse, load_config, load_model,
                       read_config, set_reverse, set_speaker_token_ids, speaker_token_ids)
from .precision import (attention_kernel, autocast_ctx, cpu_vendor, pick_fp32_matmul,
                        probe_onednn_fp32, resolve_dtype, set_fp32_precision)
from .store import ReversedStore, TokenStore, resplit
from .tokenization import ChatTokenizer
from .train_kernels import ATTENTION, Q_BLOCK, use_training_kernels
from .utils import ChitchatError, get_logger


@dataclasses.dataclass
class TrainState:
    """Where the loop is. The part a checkpoint keeps goes to its trainer_state.json."""
    step: int = 0
    epoch: int = 0
    pos: int = 0  # optimizer steps done in the current epoch
    best: float = math.inf  # lowest validation loss so far
    bad_evals: int = 0  # evaluations since it last improved (--patience)
    tokens_seen: int = 0
    step0: int = 0  # this process's first step: the time budget counts from it
    tokens0: int = 0
    budget: TimeBudget | None = None
    last_ckpt: Path | None = None  # the newest intact checkpoint (rank 0 only)
    last_saved: int = -1
    checked_step: int = 0  # the loss is known to be finite up to this step
    bad_loss: torch.Tensor | None = None  # loss sums since then (on the device)
    last_norm: torch.Tensor | None = None
    t_start: float = 0.0
    first_step_s: float = 0.0
    stop_reason: str | None = None


@dataclasses.dataclass
class Run:
    """What the loop trains with; fixed once set up."""
    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    run_dir: Path
    log: object
    store: object
    tok: ChatTokenizer
    data_print: dict
    train_table: WindowTable
    valid_table: WindowTable
    row_len: int | None  # packed row length; None: one padded window per row
    model: nn.Module
    runner: nn.Module  # LossModel(model), wrapped in DDP and torch.compile as asked
    ddp: nn.Module | None
    optimizer: torch.optim.Optimizer
    scaler: object
    amp: object
    dtype: str
    tf32: bool
    fp32_matmul: str  # "onednn" or "blas": precision.fp32_matmul, around the loop
    speaker_ids: tuple[int, int] | None
    first_plan: list
    total_steps: int
    warmup: int
    metrics: object = None

    @property
    def cpu_fp32(self) -> bool:
        """Whether --fp32_matmul concerns this run: fp32 on a CPU."""
        return self.device.type == "cpu" and self.dtype == "fp32"


# ---- optimizer --------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay only on the weight matrices of attention and MLP.

    Biases and LayerNorm weights are 1-D; the token and position embeddings (wte, wpe,
    and lm_head, tied to wte) are 2-D but are lookup tables, which decay would shrink
    towards zero for rarely seen tokens.
    """
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for _, p in model.named_parameters():  # tied parameters are listed once
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device):
    # The fused kernel updates every parameter in one call (CPU and CUDA); the default on a
    # CPU is one Python-level update per parameter tensor (124 of them in the small config).
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, eps=cfg.eps,
                             fused=device.type in ("cuda", "cpu") or None)


# ---- model --------------------------------------------------------------------------------
def make_model(cfg: TrainConfig, tok: ChatTokenizer, store: TokenStore, log):
    if cfg.pretrained_model:
        path = Path(cfg.pretrained_model)
        has_vocab = (path / "vocab.txt").is_file()
        model, model_tok = load_model(path, None if has_vocab else store.vocab_path)
        n_emb = model.get_input_embeddings().weight.shape[0]
        # A folder without vocab.txt was loaded with the store's vocab: load_model checked
        # the sizes, so the fix below is for folders with their own vocab.
        fix = (f"Preprocess the corpus with the model's vocab: python preprocess.py "
               f"--train_path <train.txt> --pretrained_model {path} --save_path "
               f"{store.path}")
        if n_emb != tok.vocab_size:
            raise ChitchatError(f"vocab size mismatch: the model at {path} has {n_emb} token "
                                f"embeddings but the data at {store.path} has a vocab of "
                                f"{tok.vocab_size} tokens. {fix}")
        if has_vocab:
            check_same_vocab(model_tok, path / "vocab.txt", tok, store.vocab_path, fix)
        model.train()
        log.info(f"fine-tuning {path} ({model.num_parameters():,} parameters, n_positions "
                 f"{model.config.n_positions})")
        # load_model took the special ids from the vocab; say so when the folder had others.
        for note in read_config(path, model_tok)[1]:
            log.info(f"  {note}")
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(load_config(cfg.model_config, tok))
    if cfg.speaker_ids and speaker_token_ids(model.config) is None:
        set_speaker_token_ids(model.config, tok.speaker_ids())
    if cfg.pretrained_model and is_reverse(model.config) and not cfg.reverse:
        raise ChitchatError(f"{cfg.pretrained_model} is a reverse model (trained with "
                            "--reverse); continue it with --reverse, or fine-tune a forward "
                            "model instead")
    # A forward model may seed a reverse one (--reverse --pretrained_model fwd/): the
    # flag follows the data order it is trained on from now on.
    set_reverse(model.config, cfg.reverse)
    return model


def check_lengths(cfg: TrainConfig, model) -> None:
    n_pos = model.config.n_positions
    if cfg.max_len > n_pos:
        raise ChitchatError(f"--max_len {cfg.max_len} exceeds the model's n_positions "
                            f"{n_pos}: positions beyond it have no embedding. Use --max_len "
                            f"{n_pos} or less, or a config with larger n_positions.")


# ---- the run ------------------------------------------------------------------------------
def setup(cfg: TrainConfig, info: DistInfo, device: torch.device,
          given: frozenset[str] | None = None) -> tuple[Run, TrainState]:
    """Everything the loop needs, and the state it starts from (a checkpoint's, on resume).
    `given`: the flags typed on the command line (see `merge_resume_options`)."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per save is noise
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.log_path and Path(cfg.log_path).is_dir():
        raise ChitchatError(f"--log_path {cfg.log_path} is a folder; name a file, e.g. "
                            f"{Path(cfg.log_path) / 'train.log'}")
    cfg, ckpt, saved, run_dir, created = choose_run(cfg, info, device, given)
    log = get_logger("chitchat.train", (cfg.log_path or run_dir / "train.log")
                     if info.main else None, quiet=not info.main)
    if not info.main:  # only rank 0 logs (the tqdm redirect ignores handler levels)
        log.setLevel("WARNING")
    try:
        return _prepare(cfg, info, device, ckpt, saved, run_dir, log)
    except BaseException:
        if created:
            discard_unstarted(run_dir, log)
        raise


def discard_unstarted(run_dir: Path, log) -> None:
    """A new run that failed before its first step (a missing store, a bad option, Ctrl-C)
    leaves no folder behind: this call made it, and it holds only its train.log."""
    for h in list(log.handlers):
        if Path(getattr(h, "baseFilename", "/")).resolve().parent == run_dir.resolve():
            log.removeHandler(h)
            h.close()
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {"train.log"}:
        (run_dir / "train.log").unlink(missing_ok=True)
        run_dir.rmdir()


def _prepare(cfg, info, device, ckpt, saved, run_dir, log) -> tuple[Run, TrainState]:
    """setup's work once the run folder and its log are chosen."""
    if ckpt is None and cfg.resume == "auto" and info.main:
        log.info("--resume auto: no checkpoint found, starting a new run")

    store = TokenStore(cfg.train_path)
    if cfg.reverse:
        store = ReversedStore(store)
    data_print = store.fingerprint()
    if ckpt is not None:
        check_same_data(saved, data_print, ckpt, store)
    train_idx, valid_idx = resplit(store, cfg.val_num, cfg.val_fraction, cfg.seed)
    tables = [build_windows(store, idx, cfg.max_len, cfg.loss_on)
              for idx in (train_idx, valid_idx)]
    if len(tables[0]) == 0:
        raise ChitchatError(f"{store.path}: no training window has a target token "
                            f"({len(train_idx)} training dialogues, --loss_on {cfg.loss_on})."
                            " With --loss_on response every dialogue needs two utterances.")
    if info.main:  # the options and the data are checked: the run will go on from here
        if ckpt is not None:
            set_aside_newer(run_dir, ckpt, log)
        else:
            set_aside_unfinished(run_dir, log)
    run = _build(cfg, info, device, run_dir, log, store, data_print, tables, ckpt, saved)
    st = TrainState(bad_loss=torch.zeros((), device=device),
                    last_norm=torch.zeros((), device=device))
    if ckpt is not None:
        restore_tensors(ckpt, run.optimizer, run.scaler)
        st.step, st.epoch, st.pos = saved["step"], saved["epoch"], saved["step_in_epoch"]
        st.best = saved["best_val_loss"] if saved["best_val_loss"] is not None else math.inf
        st.bad_evals, st.tokens_seen = saved["bad_evals"], saved["tokens_seen"]
        log.info(f"resuming {run_dir} from {ckpt.name}: step {st.step}, epoch "
                 f"{st.epoch + 1}, step {st.pos} of the epoch")
    st.step0, st.tokens0, st.checked_step = st.step, st.tokens_seen, st.step
    st.last_ckpt = ckpt if info.main else None
    st.last_saved = st.step if ckpt is not None else -1
    if cfg.max_time:
        st.budget = TimeBudget(parse_duration(cfg.max_time), cap=run.total_steps - st.step,
                               warmup_steps=cfg.warmup_steps)
    if info.main:
        _log_start(run, st, len(train_idx), len(valid_idx))
    run.metrics = Metrics(run_dir, info.main, log)
    return run, st


def choose_run(cfg: TrainConfig, info: DistInfo, device: torch.device,
               given: frozenset[str] | None = None):
    """(options, checkpoint or None, its trainer state, run folder, whether this call made
    the folder): a new run, or the one --resume names. Rank 0 decides; the others follow."""
    ckpt = None
    if cfg.resume:
        ckpt_text = ""
        if info.main:
            found = find_resume_checkpoint(cfg.resume, cfg.save_model_path, cfg.run_name,
                                           get_logger("chitchat.train", quiet=cfg.quiet))
            ckpt_text = str(found) if found else ""
        ckpt_text = broadcast_text(ckpt_text, info, device)
        ckpt = Path(ckpt_text) if ckpt_text else None
    saved: dict = {}
    if ckpt is not None:
        saved = load_checkpoint(ckpt, info.world)
        cfg = merge_resume_options(cfg, saved["options"], ckpt, given)
        run_dir = ckpt.parent.parent
    else:
        name = cfg.run_name or broadcast_text(datetime.now().strftime("%Y%m%d-%H%M%S"), info,
                                                device)
        cfg = dataclasses.replace(cfg, run_name=name)
        run_dir = Path(cfg.save_model_path) / name
        if info.main and checkpoints_of(run_dir):
            raise ChitchatError(f"{run_dir} already holds checkpoints. Continue it with "
                                f"--resume auto --run_name {name}, or pick another "
                                "--run_name.")
        if info.main:
            check_run_dir(run_dir)
    created = False
    if info.main:
        created = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:
            trim_metrics(run_dir / "metrics.jsonl", saved["step"])
    return cfg, ckpt, saved, run_dir, created


def _build(cfg, info, device, run_dir, log, store, data_print, tables, ckpt, saved) -> Run:
    """The model on its device, its optimizer, precision and the step plan."""
    tok = store.tokenizer()
    train_table, valid_table = tables
    row_len = (cfg.pack_len or cfg.max_len) if cfg.batching == "pack" else None
    if ckpt is not None:
        model, _ = load_model(ckpt, store.vocab_path)
        model.train()
    else:
        model = make_model(cfg, tok, store, log)
    check_lengths(cfg, model)
    speaker_ids = speaker_token_ids(model.config)
    model.to(device)
    use_training_kernels(model, cfg.dropout_kernel, device.type)
    dtype = resolve_dtype(cfg.dtype, device)
    amp = autocast_ctx(dtype, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == "fp16" else None
    optimizer = make_optimizer(model, cfg, device)
    tf32 = set_fp32_precision(device, cfg.exact_fp32)
    library = "blas"
    if info.main:  # rank 0's choice holds everywhere, as the checkpoint has only its word
        library = pick_fp32_matmul(
            cfg.fp32_matmul, device.type, dtype, cfg.exact_fp32, cpu_vendor(),
            probe_onednn_fp32,
            kept=saved.get("fp32_matmul") if ckpt is not None else None)
    library = broadcast_text(library, info, device)
    runner = loss_model = LossModel(model)
    ddp = None
    if info.enabled:
        ddp = runner = nn.parallel.DistributedDataParallel(
            loss_model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        runner = torch.compile(runner)
    first_plan = plan_steps(epoch_rows(train_table, 0, cfg.seed, cfg.batching,
                                       row_len or cfg.max_len),
                            train_table, cfg.batch_size, cfg.gradient_accumulation_steps,
                            info.world)
    total_steps = cfg.max_steps or cfg.epochs * len(first_plan)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(0.05 * total_steps)
    return Run(cfg, info, device, run_dir, log, store, tok, data_print, train_table,
               valid_table, row_len, model, runner, ddp, optimizer, scaler, amp, dtype, tf32,
               library, speaker_ids, first_plan, total_steps, warmup)


def _log_start(run: Run, st: TrainState, n_train: int, n_valid: int) -> None:
    cfg, log, model, budget = run.cfg, run.log, run.model, st.budget
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"run {run.run_dir}  device {run.device}  dtype {run.dtype}"
             + ("  (TF32 matmuls)" if run.tf32 else "")
             + (f"  (fp32 products by {'oneDNN' if run.fp32_matmul == 'onednn' else 'BLAS'})"
                if run.cpu_fp32 else "")
             + f"  processes {run.info.world}  "
             f"threads {torch.get_num_threads()}  params {n_params / 1e6:.1f}M  "
             f"vocab {run.tok.vocab_size}"
             + ("  torch.compile (the first steps include compiling)" if cfg.compile else "")
             + f"  memory: {allocator.applied().note}")
    log.info(f"data {run.store.path}: {n_train} train / {n_valid} validation "
             f"dialogues -> {len(run.train_table)} / {len(run.valid_table)} windows, "
             f"{int(run.train_table.lengths.sum()):,} tokens per epoch; "
             f"{cfg.batching} rows of {run.row_len or 'longest'} tokens; "
             f"{len(run.first_plan)} steps per epoch; "
             + (f"--max_time {cfg.max_time}: as many steps as fit, at most "
                f"{run.total_steps} (--max_steps or --epochs; warmup and decay fitted to the "
                "measured speed)" if budget else
                f"{run.total_steps} steps; warmup {run.warmup}")
             + ("; REVERSED utterance order (MMI reverse model)" if cfg.reverse else ""))
    cut = run.train_table.cut_tokens
    if cut.any():
        log.warning(f"warning: {int((cut > 0).sum()):,} utterances do not fit a window of "
                    f"--max_len {cfg.max_len} on their own and are cut to it "
                    f"({int(cut.sum()):,} tokens never trained on); a larger --max_len (up "
                    "to the model's n_positions) keeps them.")
    if not budget and run.warmup >= run.total_steps:
        # e.g. GPT2-chitchat's --warmup_steps 4000 carried over to a short run
        log.warning(f"warning: --warmup_steps {run.warmup} is not below the run's "
                    f"{run.total_steps} steps: the lr rises to "
                    f"{run.total_steps / run.warmup:.0%} of --lr {cfg.lr:g} at most and never "
                    "decays. Use fewer warmup steps (unset: 5% of the steps).")
    if model.config._attn_implementation == ATTENTION:
        log.info(f"attention: SDPA, and with attn_pdrop {model.config.attn_pdrop} in training "
                 "chitchat's math path with cheap dropout masks, in rows over "
                 f"{2 * Q_BLOCK} tokens by blocks of {Q_BLOCK} queries (--dropout_kernel "
                 "native: PyTorch's)" if model.config.attn_pdrop > 0 else
                 f"attention: {attention_kernel(model, run.device, run.amp)}; dropout masks "
                 "from cheap random bits (--dropout_kernel native: PyTorch's)")
    elif model.config._attn_implementation == "sdpa":
        kernel = attention_kernel(model, run.device, run.amp)
        if "math" in kernel:
            log.warning(f"attention: {kernel}, SDPA's unfused path"
                        + (f" (attn_pdrop {model.config.attn_pdrop} has no fused kernel "
                           "here; with attn_pdrop 0 the fused one runs, see "
                           "docs/benchmarks.md)" if model.config.attn_pdrop > 0 else ""))
        else:
            log.info(f"attention: {kernel}")


# ---- data of the loop ---------------------------------------------------------------------
def epoch_loader(run: Run, epoch: int, pos: int):
    """(the step plan of `epoch`, a loader of this rank's steps from step `pos` on)."""
    cfg = run.cfg
    plan = run.first_plan if epoch == 0 else plan_steps(
        epoch_rows(run.train_table, epoch, cfg.seed, cfg.batching, run.row_len or cfg.max_len),
        run.train_table, cfg.batch_size, cfg.gradient_accumulation_steps, run.info.world)
    loader = torch.utils.data.DataLoader(
        StepData(run.store, run.train_table, plan[pos:], run.info.rank, run.tok.pad_id,
                 run.row_len, run.speaker_ids),
        batch_size=None, shuffle=False, num_workers=cfg.num_workers,
        pin_memory=run.device.type == "cuda")
    return plan, loader


class StepData(torch.utils.data.Dataset):
    """Item i: this rank's collated micro-batches of step i, the step's target count and
    its real tokens on all ranks (both known on the host, so no device sync is needed)."""

    def __init__(self, store, table, plans, rank, pad_id, row_len, speaker_ids):
        self.store, self.table, self.plans, self.rank = store, table, plans, rank
        self.pad_id, self.row_len, self.speaker_ids = pad_id, row_len, speaker_ids

    def __len__(self):
        return len(self.plans)

    def __getitem__(self, i):
        p = self.plans[i]
        micro = [collate_rows(self.store, self.table, rows, self.pad_id, self.row_len,
                              self.speaker_ids) for rows in p.micro[self.rank]]
        lengths = self.table.lengths
        tokens = int(sum(lengths[w] for r in p.micro for m in r for row in m for w in row))
        return micro, p.n_targets, tokens


class Metrics:
    """metrics.jsonl plus TensorBoard (when installed), rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, log):
        self.enabled = enabled
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.info("TensorBoard logging off (pip install tensorboard to turn it on)")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("event", "step", "epoch") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['event']}/{k}", v, record["step"])

    def close(self):
        if self.file:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
