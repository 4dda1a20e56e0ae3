"""lm-evaluation-harness on llamaworks models (optional extra: `pip install llamaworks[harness]`).

`LlamaworksLM` is an `lm_eval.api.model.LM` over `EvalModel`, so any lm-evaluation-harness
task runs on a llamaworks model directory without converting it:

    import lm_eval
    from llamaworks.eval.harness import LlamaworksLM

    lm = LlamaworksLM("runs/small/model", batch_size=8)
    out = lm_eval.simple_evaluate(model=lm, tasks=["my_task"],
                                  task_manager=lm_eval.tasks.TaskManager(include_path="my_tasks/"))

Importing `LlamaworksLM` also registers it with lm-eval's model registry as "llamaworks"
(`simple_evaluate(model="llamaworks", model_args="pretrained=DIR")`). lm-eval's own CLI has
no plugin mechanism for third-party models: `llamaworks eval --harness lm-eval --tasks T
[--include-path DIR] --checkpoint DIR` is the command line.

Scores are EvalModel's: lm-evaluation-harness' tokenisation (joint encoding of context and
continuation, trailing space moved to the continuation, left truncation), independent of the
batch size. BOS: `add_bos=True` (llamaworks' default, LLaMA's training) starts every context
with `<s>`, which is what lm-eval's transformers backend does for a LLaMA tokenizer that adds
BOS (its `add_bos_token` unset); `add_bos=False` matches `add_bos_token=False`.

This module imports without lm_eval; the class is built on first access.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from llamaworks.atomic import atomic_write_json
from llamaworks.eval.lm import EvalModel, GenOptions

__all__ = ["LlamaworksLM", "harness_available", "run_harness"]  # noqa: F822 (LlamaworksLM: built lazily)

log = logging.getLogger(__name__)

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'llamaworks[harness]' (lm-eval[hf])"
# lm-eval generation arguments EvalModel ignores when they ask for what it does anyway.
_NEUTRAL_GEN_KWARGS = {"num_beams": 1, "top_k": 0, "repetition_penalty": 1.0}


def harness_available() -> bool:
    try:
        import lm_eval.api.model  # noqa: F401
    except ImportError:
        return False
    return True


def _gen_options(kwargs: dict) -> dict:
    """lm-eval's gen_kwargs as EvalModel options (until, max_gen_toks, temperature, do_sample, top_p, seed)."""
    opts = dict(kwargs or {})
    for key, neutral in _NEUTRAL_GEN_KWARGS.items():
        if key in opts and opts[key] in (neutral, None):
            del opts[key]
    if opts.get("top_k") is None:
        opts.pop("top_k", None)
    try:
        GenOptions.parse(opts)
    except ValueError as e:
        raise ValueError(f"lm-eval generation arguments {kwargs!r}: {e} (llamaworks supports greedy and "
                         "temperature/top-p sampling)") from None
    return opts


def _build_class():
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: it loads them only into an empty registry)
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    class LlamaworksLM(LM):
        """An lm-evaluation-harness `LM` over a llamaworks model directory or an `EvalModel`.

        `pretrained` is a model directory (params.json, model.safetensors, tokenizer.model) or
        an `EvalModel`; batch_size, add_bos, max_length, device and dtype as `EvalModel`.
        """

        def __init__(self, pretrained, batch_size: int | str = 8, add_bos: bool | str = True,
                     max_length: int | None = None, device: str | None = "auto", dtype: str | None = None,
                     **unused):
            super().__init__()
            unused = {k: v for k, v in unused.items() if v is not None and k != "max_batch_size"}
            if unused:
                log.warning("LlamaworksLM ignores %s", ", ".join(sorted(unused)))
            if isinstance(batch_size, str):
                batch_size = 8 if batch_size.startswith("auto") else int(batch_size)
            if isinstance(add_bos, str):
                add_bos = add_bos.strip().lower() in ("1", "true", "yes")
            if isinstance(pretrained, EvalModel):
                self.lm = pretrained
            else:
                self.lm = EvalModel.from_dir(pretrained, device=device or "auto", dtype=dtype,
                                             batch_size=int(batch_size), add_bos=add_bos,
                                             max_length=int(max_length) if max_length else None)
            self._device = self.lm.device

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.lm.tokenizer, "path", "llamaworks")).replace("/", "__")

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            out = self.lm.loglikelihood([tuple(r.args) for r in requests])
            for r, res in zip(requests, out):
                self.cache_hook.add_partial("loglikelihood", r.args, res)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = self.lm.loglikelihood_rolling([r.args[0] for r in requests])
            for r, res in zip(requests, out):
                self.cache_hook.add_partial("loglikelihood_rolling", r.args, res)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = self.lm.generate_until([(r.args[0], _gen_options(r.args[1])) for r in requests])
            for r, res in zip(requests, out):
                self.cache_hook.add_partial("generate_until", r.args, res)
            return out

    LlamaworksLM.__module__ = __name__
    register_model("llamaworks")(LlamaworksLM)
    return LlamaworksLM


def _model_class():
    cls = globals().get("LlamaworksLM")
    if cls is None:
        try:
            cls = _build_class()
        except ImportError as e:
            raise ImportError(f"{INSTALL_HINT} ({e})") from None
        globals()["LlamaworksLM"] = cls
    return cls


def __getattr__(name: str):
    if name == "LlamaworksLM":
        return _model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def run_harness(checkpoint, tasks: list[str], *, include_path: str | os.PathLike | None = None,
                limit: int | None = None, shots: int | None = None, batch_size: int = 8, add_bos: bool = True,
                device: str = "auto", dtype: str | None = None, log_samples: bool = False, lm=None) -> dict:
    """lm-evaluation-harness' `simple_evaluate` on a llamaworks model directory (or `lm`)."""
    if not harness_available():
        raise ValueError(INSTALL_HINT)
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).exists():
        raise FileNotFoundError(f"--include-path {include_path} does not exist (a folder of lm-eval task YAMLs)")
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"lm-eval knows no task {', '.join(unknown)}"
                         + ("" if include_path else "; pass --include-path DIR for local task YAMLs"))
    if lm is None:
        lm = _model_class()(checkpoint, batch_size=batch_size, add_bos=add_bos, device=device,
                               dtype=dtype)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=shots, limit=limit,
                                   task_manager=manager, log_samples=log_samples)


def harness_command(checkpoint, tasks: list[str], *, include_path=None, limit=None, shots=None, batch_size=8,
                    add_bos=True, device="auto", dtype=None, output=None) -> int:
    """`llamaworks eval --harness lm-eval`: print lm-eval's table, write its results as JSON."""
    from lm_eval.utils import make_table

    out = run_harness(checkpoint, tasks, include_path=include_path, limit=limit, shots=shots,
                      batch_size=batch_size, add_bos=add_bos, device=device, dtype=dtype,
                      log_samples=output is not None)
    print(make_table(out))
    if output:
        atomic_write_json(Path(output), _jsonable({
            "checkpoint": str(checkpoint), "harness": "lm-eval", "add_bos": add_bos,
            "results": out.get("results", {}), "n-shot": out.get("n-shot", {}), "configs": out.get("configs", {}),
            "versions": out.get("versions", {}), "samples": out.get("samples", {})}))
    return 0
