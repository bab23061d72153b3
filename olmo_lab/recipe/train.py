"""Training small models on CPU: a byte-level BPE tokenizer, token streams, and one clear training loop.

    tok = train_bpe_tokenizer(texts, vocab_size=4096)
    data = TokenStream.from_texts(tok, texts)
    result = train(model, data, TrainConfig(steps=500, lr=2e-3), eval_data=heldout, checkpoint_dir="run/")

The loop is plain AdamW with linear warm-up and cosine decay, gradient clipping and a tqdm progress
bar (off with `progress=False`). Batches are a pure function of (seed, step), so a run stopped and
resumed from its checkpoint continues with exactly the batches it would have seen, and ends with the
same weights as an uninterrupted run. Hooks let the FlexOlmo recipe (`olmo_lab.flexolmo`) plug in its
own loss and its gradient masking without a second loop.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Callable, Sequence

import safetensors
import safetensors.torch
import tokenizers
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checkpoints.tokenizer import Tokenizer

EOS, PAD = "<|endoftext|>", "<|pad|>"
# The pre-tokenizer regex of dolma2 (cl100k_base's, non-possessive), so the lab tokenizer splits text
# into the same pre-tokens as the real OLMo tokenizer before applying its own, smaller, merge table.
DOLMA2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
STATE_FILE = "train_state.safetensors"  # tensors + a JSON header: no pickle to load


# ------------------------------------------------------------------------------------ tokenizer
def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int = 4096) -> Tokenizer:
    """A byte-level BPE trained on `texts`, laid out like dolma2: merges first, then EOS and PAD last.

    `vocab_size` counts everything, so ids run 0..vocab_size-1 with `<|endoftext|>` = vocab_size-2 and
    `<|pad|>` = vocab_size-1 (dolma2: 100257 and 100277 after the 100,256 BPE ranks). Deterministic for
    the same texts.
    """
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(DOLMA2_SPLIT), behavior="removed", invert=True),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size - 2, show_progress=False, special_tokens=[],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    backend.add_special_tokens([tokenizers.AddedToken(EOS, special=True), tokenizers.AddedToken(PAD, special=True)])
    return Tokenizer(backend, eos_token=EOS, pad_token=PAD, stop_token_ids=(), source="<trained BPE>")


def token_byte_lengths(tok: Tokenizer) -> torch.Tensor:
    """(V,) UTF-8 bytes of text each id stands for; special tokens count as 1 (a document break).

    Byte-level BPE writes each byte as one printable character, so a token's byte length is the
    length of its vocabulary string.
    """
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    specials = {t.content for t in tok.backend.get_added_tokens_decoder().values()}
    lengths = torch.zeros(tok.max_token_id + 1, dtype=torch.long)
    for piece, i in vocab.items():
        lengths[i] = 1 if piece in specials else len(piece)
    return lengths


# ------------------------------------------------------------------------------------ data
class TokenStream:
    """One long 1-D stream of token ids (documents joined by EOS) that hands out training windows."""

    def __init__(self, ids: torch.Tensor):
        if ids.dim() != 1 or ids.numel() < 2:
            raise ValueError(f"ids: expected a 1-D tensor of at least 2 token ids, got shape {tuple(ids.shape)}")
        self.ids = ids

    @classmethod
    def from_texts(cls, tok: Tokenizer, texts: Sequence[str]) -> "TokenStream":
        """Encode documents and join them, each followed by EOS."""
        out = []
        for row in tok.encode(list(texts)):
            out.extend(row)
            out.append(tok.eos_token_id)
        return cls(torch.tensor(out, dtype=torch.int16 if tok.max_token_id < 2**15 else torch.int32))

    def __len__(self) -> int:
        return self.ids.numel()

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int = 0) -> torch.Tensor:
        """(batch_size, seq_len + 1) int64 windows at random offsets, a pure function of (seed, step)."""
        if len(self) <= seq_len + 1:
            raise ValueError(f"the stream has {len(self)} tokens, too few for windows of {seq_len + 1}")
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(self) - seq_len - 1, (batch_size,), generator=g)
        return torch.stack([self.ids[s:s + seq_len + 1] for s in starts.tolist()]).long()

    def windows(self, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
        """(N, seq_len + 1) consecutive non-overlapping windows from the start: a fixed evaluation set."""
        n = (len(self) - 1) // seq_len
        n = n if max_windows is None else min(n, max_windows)
        return torch.stack([self.ids[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)]).long()


def init_weights(model, std: float = 0.02, seed: int | None = None) -> None:
    """OLMo-style initialisation: every Linear and Embedding weight ~ N(0, std), norm weights 1."""
    if seed is not None:
        torch.manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=std)


def lm_loss(model, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of a (B, S + 1) batch."""
    logits = model(batch[:, :-1]).logits  # (B, S, V)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def bits_per_byte(model, windows: torch.Tensor, byte_lengths: torch.Tensor, batch_size: int = 16) -> float:
    """Held-out loss in bits per UTF-8 byte: total cross-entropy / ln 2 / bytes of the predicted text.

    Unlike loss per token, this compares models with different tokenizers, and it is what the
    results tables report. `windows` is (N, S + 1); positions 1..S are predicted.
    """
    was_training = model.training
    model.eval()
    nats, n_bytes = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i:i + batch_size]
        logits = model(batch[:, :-1]).logits.float()  # (b, S, V)
        nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        n_bytes += int(byte_lengths[batch[:, 1:]].sum())
    model.train(was_training)
    return nats / math.log(2) / n_bytes


# ------------------------------------------------------------------------------------ loop
STOP_WINDOW = 20  # steps averaged for `TrainConfig.stop_below`


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-3
    warmup: int = 50  # linear warm-up steps, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    batch_size: int = 16
    seq_len: int = 256
    seed: int = 0  # selects the batches (and nothing else: initialise the model before calling train)
    lr_multipliers: dict[str, float] = field(default_factory=dict)  # {name substring: lr factor}, e.g. routers
    eval_every: int = 0  # 0: evaluate only at the end (when eval_data is given)
    eval_windows: int = 32
    checkpoint_every: int = 0  # 0: save only at the end (when checkpoint_dir is given)
    stop_below: float = 0.0  # stop early once the mean train loss of the last 20 steps is below this; 0: never
    progress: bool = True

    def lr_at(self, step: int) -> float:
        """Learning rate of `step` (0-based): linear warm-up, then cosine from lr down to min_lr_ratio * lr."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class TrainResult:
    steps: int  # steps taken (fewer than configured when the run stopped early)
    train_loss: list[float] = field(default_factory=list)  # per step, nats/token
    eval_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, nats/token)


def train(model, data: TokenStream, config: TrainConfig, *, eval_data: TokenStream | None = None,
          checkpoint_dir: str | os.PathLike | None = None,
          step_fn: Callable[[object, int], float] | None = None,
          after_backward: Callable[[object], None] | None = None,
          on_eval: Callable[[int, float], None] | None = None,
          stop_when: Callable[[object, int], bool] | None = None) -> TrainResult:
    """Train `model` in place for `config.steps` optimizer steps and return the loss history.

    Only parameters with `requires_grad` are optimised. `step_fn(model, step)` replaces the default
    forward + backward (LM loss on `data.batch(step)`); it must call backward and return the loss.
    `after_backward(model)` runs before clipping, e.g. to zero the gradients of frozen slices.
    With `checkpoint_dir`, model, optimizer and history are saved there (`train_state.safetensors`) every
    `checkpoint_every` steps and at the end, and a run finding a state there resumes from it.
    With `config.stop_below`, training ends as soon as the recent train loss is below it (e.g. once a
    curriculum task is learned), evaluating and saving there; resuming a run that stopped does nothing.
    `stop_when(model, steps_done)`, called after every step, ends the run the same way when it returns
    True (e.g. once a probe finds the circuit a curriculum is for).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    groups = {}  # (weight decay, lr factor) -> parameters; matrices decay, norm weights (vectors) do not
    for name, p in named:
        factor = next((f for key, f in config.lr_multipliers.items() if key in name), 1.0)
        groups.setdefault((config.weight_decay if p.dim() >= 2 else 0.0, factor), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": wd, "lr_factor": f} for (wd, f), ps in groups.items()],
                            lr=config.lr, betas=config.betas)
    result = TrainResult(steps=config.steps)
    state_path = os.path.join(checkpoint_dir, STATE_FILE) if checkpoint_dir is not None else None
    start = 0
    if checkpoint_dir is not None and os.path.exists(os.path.join(checkpoint_dir, "train_state.pt")):
        raise ValueError(f"{checkpoint_dir} holds a train_state.pt from an older olmo-lab (a pickle, which is never "
                         "loaded); delete it to start afresh")
    if state_path is not None and os.path.exists(state_path):
        state = _load_state(state_path)
        _check_same_run(state_path, state, asdict(config), [n for n, _ in named])
        model.load_state_dict(state["model"])
        factors = [group["lr_factor"] for group in opt.param_groups]
        opt.load_state_dict(state["optimizer"])
        for group, factor in zip(opt.param_groups, factors):  # the schedule's factors come from config, not the file
            group["lr_factor"] = factor
        start = config.steps if state.get("stopped") else state["step"]  # a run that stopped early is done
        result.train_loss, result.eval_loss = state["train_loss"], [tuple(e) for e in state["eval_loss"]]

    def default_step(model, step):
        loss = lm_loss(model, data.batch(step, config.batch_size, config.seq_len, config.seed))
        loss.backward()
        return loss.item()

    step_fn = step_fn or default_step
    model.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, disable=not config.progress,
               desc="training", unit="step")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = config.lr_at(step) * group["lr_factor"]
        loss = step_fn(model, step)
        if after_backward is not None:
            after_backward(model)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        result.train_loss.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{config.lr_at(step):.2e}")
        done = step + 1
        tail = result.train_loss[-STOP_WINDOW:]
        stopped = bool(config.stop_below) and len(tail) == STOP_WINDOW and sum(tail) / STOP_WINDOW < config.stop_below
        stopped = stopped or (stop_when is not None and bool(stop_when(model, done)))
        last = stopped or done == config.steps
        if eval_data is not None and ((config.eval_every and done % config.eval_every == 0) or last):
            result.eval_loss.append((done, evaluate(model, eval_data, config)))
            if on_eval is not None:
                on_eval(done, result.eval_loss[-1][1])
        if state_path is not None and ((config.checkpoint_every and done % config.checkpoint_every == 0) or last):
            os.makedirs(checkpoint_dir, exist_ok=True)
            tmp = state_path + ".tmp"
            _save_state(tmp, model, opt, {"step": done, "stopped": stopped, "train_loss": result.train_loss,
                                          "eval_loss": result.eval_loss, "config": asdict(config),
                                          "trainable": [n for n, _ in named]})
            os.replace(tmp, state_path)
        if stopped:
            break
    result.steps = len(result.train_loss)
    model.eval()
    return result


def _save_state(path: str, model, opt, info: dict) -> None:
    """Model and AdamW tensors as safetensors; the step, loss history, config and param groups as JSON."""
    optim = opt.state_dict()
    tensors = {f"model/{k}": v.detach().clone(memory_format=torch.contiguous_format)  # copies: no shared storage
               for k, v in model.state_dict().items()}
    tensors.update({f"optimizer/{i}/{name}": t.clone(memory_format=torch.contiguous_format)
                    for i, s in optim["state"].items() for name, t in s.items()})
    info = dict(info, param_groups=optim["param_groups"])
    safetensors.torch.save_file(tensors, path, metadata={"train_state": json.dumps(info)})


BOOKKEEPING = {"eval_every", "eval_windows", "checkpoint_every", "progress"}  # may change between a run and its resume


def _check_same_run(path: str, state: dict, config: dict, trainable: list[str]) -> None:
    """A resume must continue the same run: the settings that shape the weights and the trained parameters."""
    config = json.loads(json.dumps(config))  # tuples -> lists, as stored
    # A setting added to TrainConfig after the state was written had its default value in that run.
    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory() for f in fields(TrainConfig)
                if f.default is not MISSING or f.default_factory is not MISSING}
    saved = json.loads(json.dumps({**defaults, **state["config"]}))
    changed = [f"{k}: {saved.get(k)!r} there, {config[k]!r} now" for k in config
               if k not in BOOKKEEPING and saved.get(k) != config[k]]
    if state.get("trainable") != trainable:
        changed.append("the set of trainable parameters differs")
    if changed:
        raise ValueError(f"{path} was written by a different training run ({', '.join(changed)}); "
                         "use another checkpoint_dir or delete the file to start afresh")


def _load_state(path: str) -> dict:
    """What `_save_state` wrote, as {"model": state dict, "optimizer": state dict, **info}."""
    with safetensors.safe_open(path, framework="pt") as f:
        info = json.loads(f.metadata()["train_state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    state = {}
    for key, t in tensors.items():
        if key.startswith("optimizer/"):
            _, i, name = key.split("/", 2)
            state.setdefault(int(i), {})[name] = t
    optimizer = {"state": state, "param_groups": info.pop("param_groups")}
    model = {k.removeprefix("model/"): t for k, t in tensors.items() if k.startswith("model/")}
    return dict(info, model=model, optimizer=optimizer)


@torch.no_grad()
def evaluate(model, data: TokenStream, config: TrainConfig) -> float:
    """Mean next-token loss (nats) over the first `config.eval_windows` windows of `data`."""
    was_training = model.training
    model.eval()
    windows = data.windows(config.seq_len, config.eval_windows)
    losses = [lm_loss(model, windows[i:i + config.batch_size]).item() * len(windows[i:i + config.batch_size])
              for i in range(0, len(windows), config.batch_size)]
    model.train(was_training)
    return sum(losses) / len(windows)
