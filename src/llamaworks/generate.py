"""Text generation: prefill, then decode with the static KV cache.

The decode step (one forward + sampling) has fixed shapes and no host
synchronisation, so it can be compiled (and CUDA-graphed); the loop looks at the
host only every `sync_every` steps, or per token when streaming.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated

import torch

from llamaworks.cli import Arg

# Meta's example.py defaults for LLaMA 1.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95


def probabilities(logits: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = None,
                  top_p: float = DEFAULT_TOP_P) -> torch.Tensor:
    """The distribution sampling draws from: (bsz, vocab) logits -> probabilities after the
    temperature, top-k and nucleus filters (temperature must be > 0)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (bsz, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        # Nucleus (Holtzman et al. 2020) as in Meta's sample_top_p: keep the smallest prefix of
        # the sorted distribution whose mass reaches top_p (the top token is always kept).
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = None,
           top_p: float = DEFAULT_TOP_P, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Next token ids (bsz,) from logits (bsz, vocab). temperature <= 0 is greedy.

    `noise` is Exp(1) noise of the logits' shape: argmax(p / noise) is a sample from p
    (the exponential-race form of the Gumbel trick), which needs no multinomial sync and
    lets the caller own the random stream.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature, top_k, top_p)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise).argmax(dim=-1)


def decode_step(model, tokens: torch.Tensor, input_pos: torch.Tensor, noise: torch.Tensor | None,
                temperature: float, top_k: int | None, top_p: float):
    """One token for every sequence: tokens, input_pos (bsz, 1) -> next ids (bsz,), log-probs (bsz,)."""
    logits = model(tokens, input_pos)[:, -1]  # (bsz, vocab)
    nxt = sample(logits, temperature, top_k, top_p, noise)
    logprob = torch.log_softmax(logits, dim=-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
    return nxt, logprob


def compile_step(fn, device: torch.device):
    """torch.compile a fixed-shape decode step. On CUDA also with CUDA graphs ("reduce-overhead"):
    one graph replay per step instead of a kernel launch per op, which is what bounds a small
    model's decode on a GPU; elsewhere plain inductor."""
    if device.type != "cuda":
        return torch.compile(fn, dynamic=False)
    graphed = torch.compile(fn, dynamic=False, mode="reduce-overhead")

    def step(*args):
        torch.compiler.cudagraph_mark_step_begin()
        out = graphed(*args)
        # A replay overwrites the previous replay's outputs, and callers keep them across steps.
        return tuple(t.clone() for t in out) if isinstance(out, tuple) else out.clone()

    return step


@dataclass
class Completion:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    logprobs: list[float] | None = None
    prompt_tokens: int = 0
    stats: dict = field(default_factory=dict)


def _cache_len(needed: int, max_seq_len: int) -> int:
    # Round up so that repeated calls with similar lengths reuse one compiled decode graph.
    return min(max_seq_len, -(-needed // 256) * 256)


def check_prompt_lengths(prompts: list[list[int]], max_seq_len: int, truncate: bool) -> list[list[int]]:
    out = []
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty after tokenisation; give at least one token (or keep bos=True)")
        if len(p) >= max_seq_len:
            if not truncate:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens but the model's context window is {max_seq_len} "
                    "(and at least one new token must fit): shorten the prompt, or pass truncate=True "
                    "(--truncate) to keep only its last tokens")
            p = p[len(p) - max_seq_len + 1:]
        out.append(p)
    return out


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = DEFAULT_TEMPERATURE,
                 top_k: int | None = None, top_p: float = DEFAULT_TOP_P, eos_id: int | None = None,
                 seed: int | None = None, compile: bool = False, compile_prefill: bool = False,
                 sync_every: int = 8) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens, logprobs), each (bsz, n) on the model's device, every `sync_every` steps.

    Sequences of different lengths run together: each sits at its own positions in the
    cache (right-padded prefill, per-row input_pos), so every sequence gets exactly the
    tokens it would get alone. After eos a sequence keeps emitting eos.
    compile: torch.compile the decode step (compile_step); compile_prefill: also the prefill
    forward, with dynamic shapes (batch and prompt length vary from call to call).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature > 0 and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
    device = model.output.weight.device
    max_seq_len = model.args.max_seq_len
    lens = torch.tensor([len(p) for p in prompts], device=device)
    bsz, longest = len(prompts), max(len(p) for p in prompts)
    assert longest < max_seq_len, (longest, max_seq_len)
    max_new_tokens = min(max_new_tokens, max_seq_len - longest)
    model.setup_caches(bsz, _cache_len(longest + max_new_tokens, max_seq_len))
    gen = None
    if temperature > 0:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed if seed is not None else torch.seed())
    step_fn = compile_step(decode_step, device) if compile else decode_step
    prefill = torch.compile(model, dynamic=True) if compile_prefill else model

    # Prefill: one causal pass over the right-padded prompts; pad positions write keys that
    # no real query can see (they lie beyond its position) and are overwritten later.
    padded = torch.zeros(bsz, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = torch.tensor(p, device=device)
    pos = torch.arange(longest, device=device).expand(bsz, longest)
    logits = prefill(padded, pos)[torch.arange(bsz, device=device), lens - 1]  # (bsz, vocab)
    noise = _noise(logits, gen)
    tok = sample(logits, temperature, top_k, top_p, noise)
    logprob = torch.log_softmax(logits, dim=-1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)

    done = torch.zeros(bsz, dtype=torch.bool, device=device)
    out_tok, out_lp = [], []
    for step in range(max_new_tokens):
        if eos_id is not None:
            tok = torch.where(done, torch.full_like(tok, eos_id), tok)
            done = done | (tok == eos_id)
        out_tok.append(tok)
        out_lp.append(logprob)
        last = step == max_new_tokens - 1
        # Step 0 is yielded alone so callers can time prefill apart from decoding.
        if step == 0 or len(out_tok) >= sync_every or last:
            yield torch.stack(out_tok, 1), torch.stack(out_lp, 1)
            out_tok, out_lp = [], []
            if last or (eos_id is not None and bool(done.all())):
                return
        input_pos = (lens + step).unsqueeze(1)  # (bsz, 1): each sequence's own next position
        tok, logprob = step_fn(model, tok.unsqueeze(1), input_pos, _noise(logits, gen), temperature, top_k, top_p)


def _noise(logits: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor | None:
    if gen is None:
        return None
    return torch.empty(logits.shape, dtype=torch.float32, device=logits.device).exponential_(1, generator=gen)


def _first_stop(text: str, stop: Sequence[str]) -> int:
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else -1


@torch.no_grad()
def generate(model, tokenizer, prompts: str | list[str], max_new_tokens: int = 256, *,
             temperature: float = DEFAULT_TEMPERATURE, top_k: int | None = None, top_p: float = DEFAULT_TOP_P,
             stop: Sequence[str] = (), seed: int | None = None, logprobs: bool = False, bos: bool = True,
             truncate: bool = False, compile: bool = False, compile_prefill: bool = False, sync_every: int = 8,
             on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Complete each prompt; stops at eos, at any of `stop` (not included), or after max_new_tokens.

    `on_text(i, delta)` streams the final text of sequence i as it is produced (incremental,
    UTF-8 safe, stop strings withheld until resolved); streaming syncs with the host per token.
    """
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    ids = check_prompt_lengths(tokenizer.encode_batch(texts, bos=bos, eos=False), model.args.max_seq_len, truncate)
    bsz = len(ids)
    rows = _Rows(tokenizer, ids, stop, on_text)
    t0 = time.perf_counter()
    t_first = None
    for chunk_tok, chunk_lp in generate_ids(model, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                                            top_p=top_p, eos_id=tokenizer.eos_id, seed=seed, compile=compile,
                                            compile_prefill=compile_prefill,
                                            sync_every=1 if on_text else sync_every):
        t_first = t_first or time.perf_counter()
        for i, (row_t, row_lp) in enumerate(zip(chunk_tok.tolist(), chunk_lp.tolist())):
            rows.take(i, row_t, row_lp)
        if all(rows.finished):
            break
    t_end = time.perf_counter()
    results = [rows.completion(i, logprobs) for i in range(bsz)]
    n_gen = sum(len(r.tokens) for r in results)
    prefill_s = (t_first or t_end) - t0
    stats = {"prefill_tokens": sum(map(len, ids)), "prefill_s": prefill_s, "decode_tokens": n_gen,
             "decode_s": t_end - (t_first or t_end)}
    stats["prefill_tokens_per_s"] = stats["prefill_tokens"] / max(prefill_s, 1e-9)
    stats["decode_tokens_per_s"] = max(n_gen - bsz, 0) / max(stats["decode_s"], 1e-9)
    for r in results:
        r.stats = stats
    return results


class _Rows:
    """Per-sequence bookkeeping of generate() and generate_speculative(): tokens (and their
    log-probs) up to eos or a stop string, the streamed text, and why each sequence ended."""

    def __init__(self, tokenizer, ids: list[list[int]], stop: Sequence[str],
                 on_text: Callable[[int, str], None] | None):
        self.eos_id, self.on_text, self.prompt_lens = tokenizer.eos_id, on_text, [len(p) for p in ids]
        self.streams = [_StopStream(tokenizer, p, stop) for p in ids]
        self.toks: list[list[int]] = [[] for _ in ids]
        self.lps: list[list[float]] = [[] for _ in ids]
        self.finished = [False] * len(ids)
        self.reasons = ["length"] * len(ids)

    def take(self, i: int, tokens: list[int], logprobs: list[float] | None = None) -> None:
        for j, t in enumerate(tokens):
            if self.finished[i]:
                return
            if t == self.eos_id:
                self.finished[i], self.reasons[i] = True, "stop"
                return
            self.toks[i].append(t)
            if logprobs is not None:
                self.lps[i].append(logprobs[j])
            delta, hit = self.streams[i].push(t)
            if self.on_text and delta:
                self.on_text(i, delta)
            if hit:
                self.finished[i], self.reasons[i] = True, "stop"

    def completion(self, i: int, logprobs: bool = False, **stats) -> Completion:
        tail = self.streams[i].finish()
        if self.on_text and tail:
            self.on_text(i, tail)
        return Completion(text=self.streams[i].text, tokens=self.toks[i], finish_reason=self.reasons[i],
                          logprobs=self.lps[i] if logprobs else None, prompt_tokens=self.prompt_lens[i],
                          stats=stats)


class _StopStream:
    """Incremental text of one sequence, cut at the first stop string.

    Text that could still be the start of a stop string is held back, so a streaming
    client never sees part of a stop string it should not see.
    """

    def __init__(self, tokenizer, prefix_ids: list[int], stop: Sequence[str]):
        self.decoder = tokenizer.stream_decoder(prefix_ids)
        self.stop = [s for s in stop if s]
        self.text = ""  # final text emitted so far
        self.pending = ""  # decoded but withheld
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.pending += self.decoder.push(token)
        return self._emit(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.pending += self.decoder.flush()
        return self._emit(final=True)[0]

    def _emit(self, final: bool) -> tuple[str, bool]:
        cut = _first_stop(self.pending, self.stop)
        if cut >= 0:
            delta, self.pending, self.stopped = self.pending[:cut], "", True
        elif final or not self.stop:
            delta, self.pending = self.pending, ""
        else:
            # Hold back the longest suffix that is a proper prefix of some stop string.
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
            delta = self.pending[: len(self.pending) - hold]
            self.pending = self.pending[len(delta):]
        self.text += delta
        return delta, self.stopped


def generate_command(
    checkpoint: Annotated[str, Arg("model directory (params.json, model.safetensors, tokenizer.model)")],
    prompt: Annotated[list[str], Arg("prompt text; several prompts run as one batch")],
    max_new_tokens: Annotated[int, Arg("tokens to generate per prompt")] = 256,
    temperature: Annotated[float, Arg("sampling temperature; 0 is greedy")] = DEFAULT_TEMPERATURE,
    top_p: Annotated[float, Arg("nucleus sampling mass")] = DEFAULT_TOP_P,
    top_k: Annotated[int | None, Arg("keep only the k most likely tokens")] = None,
    seed: Annotated[int | None, Arg("random seed; the same seed gives the same sample")] = None,
    stop: Annotated[list[str] | None, Arg("stop strings (not included in the output)")] = None,
    truncate: Annotated[bool, Arg("keep the last tokens of a prompt longer than the context window")] = False,
    device: Annotated[str, Arg("cpu, cuda, cuda:N or auto")] = "auto",
    dtype: Annotated[str | None, Arg("float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on GPU)")] = None,
    compile: Annotated[bool, Arg("torch.compile the decode step (with CUDA graphs on a GPU)")] = False,
    compile_prefill: Annotated[bool, Arg("also torch.compile the prompt's forward pass (dynamic shapes)")] = False,
    draft: Annotated[str | None, Arg("draft model directory: speculative decoding (batched)")] = None,
    draft_k: Annotated[int, Arg("tokens the draft proposes per target forward")] = 4,
) -> int:
    """Generate a completion for each prompt; prints the text, then speed on stderr."""
    from llamaworks.modeldir import load_model, resolve_device
    from llamaworks.train.distributed import close_distributed, env_world_size

    dev, dt = resolve_device(device, dtype)
    out, err, env = sys.stdout, sys.stderr, None
    if env_world_size() > 1:  # under torchrun: tensor parallelism, each process holds 1/N of the weights
        if draft is not None:
            raise ValueError("--draft (speculative decoding) runs in one process; launch it without torchrun")
        env, dev, model, tokenizer, seed = _setup_tensor_parallel(checkpoint, dev, dt, seed)
        if not env.is_main:  # the other ranks compute the same tokens in silence
            out = err = io.StringIO()
    else:
        model, tokenizer = load_model(checkpoint, device=dev, dtype=dt)
    torch.manual_seed(0)
    if draft is not None:
        from llamaworks.speculative import generate_with_draft

        return generate_with_draft(model, tokenizer, draft, prompt, max_new_tokens, k=draft_k, device=dev, dtype=dt,
                                   temperature=temperature, top_k=top_k, top_p=top_p, stop=stop or (), seed=seed,
                                   truncate=truncate)
    streaming = len(prompt) == 1

    def show(i, delta):
        out.write(delta)
        out.flush()

    if streaming:
        out.write(prompt[0])
    results = generate(model, tokenizer, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       stop=stop or (), seed=seed, truncate=truncate, compile=compile, compile_prefill=compile_prefill,
                       on_text=show if streaming else None)
    if streaming:
        out.write("\n")
    else:
        for p, r in zip(prompt, results):
            print(f"{p}{r.text}\n{'-' * 40}", file=out)
    s = results[0].stats
    where = f"{dev}" if env is None else f"{env.world_size} x {dev.type}, tensor parallel"
    print(f"prefill: {s['prefill_tokens']} tokens, {s['prefill_tokens_per_s']:.1f} tokens/s | "
          f"decode: {s['decode_tokens']} tokens, {s['decode_tokens_per_s']:.1f} tokens/s "
          f"({where}, {str(dt).removeprefix('torch.')})", file=err)
    if env is not None:
        close_distributed(env)
    return 0


def _setup_tensor_parallel(checkpoint: str, dev: torch.device, dt: torch.dtype, seed: int | None):
    """Join torchrun's process group, split the model over a 1-D mesh of all ranks
    (train/parallelize.py: load_tensor_parallel) and agree on one sampling seed: every rank
    samples from the same gathered logits with the same generator, so all ranks pick the
    same tokens and their KV caches stay consistent. -> (env, device, model, tokenizer, seed)"""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from llamaworks.train.distributed import init_distributed
    from llamaworks.train.parallelize import load_tensor_parallel

    env, dev = init_distributed(dev)
    mesh = init_device_mesh(dev.type, (env.world_size,), mesh_dim_names=("tp",))
    model, tokenizer = load_tensor_parallel(checkpoint, mesh, dev, dt)
    if seed is None:  # rank 0's random seed for all
        chosen = torch.tensor([torch.seed() % 2**63], dtype=torch.int64, device=dev)
        dist.broadcast(chosen, src=0)
        seed = int(chosen.item())
    return env, dev, model, tokenizer, seed
