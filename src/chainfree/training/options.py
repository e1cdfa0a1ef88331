"""Exact-baseline options every method can compose with: activation checkpointing and torch.compile.

These are what a practitioner already has, so every method is measured against them:

* `apply_activation_checkpointing(model, mode)` -- `mode` as torchtitan spells it:
  - ``"none"``: autograd keeps every activation;
  - ``"full"``: each residual block runs under ``torch.utils.checkpoint`` (non-reentrant); only the
    block inputs are kept and the block's forward is recomputed during backward;
  - ``"selective"``: torch's selective activation checkpointing
    (``torch.utils.checkpoint.create_selective_checkpoint_contexts``) inside each block: outputs of the
    matmuls and of the attention kernel are saved, pointwise ops (norms, activations, RoPE, gating) are
    recomputed -- most of the memory of full checkpointing for a fraction of its recompute.
  Blocks are found by type: the LanguageModel block kinds (GPT, Mamba-2, Mamba-3, hybrid) wherever they
  sit in the module tree (also inside a method's wrapper), and the decoder layers of a Hugging Face model
  (the classes named in its ``_no_split_modules``). The block's ``forward`` is replaced on the instance,
  so parameter names, state dicts and checkpoints do not change. Gradients are exact (tested in float64).
* `compile_model(model, mode, whole_model)` -- ``torch.compile`` in place (``nn.Module.compile``, again
  without renaming parameters) with a configurable mode: ``"default"``, ``"reduce-overhead"`` (CUDA
  graphs), ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``. The whole model when the method's step
  is plain autograd through ``model(x, y)``; otherwise each block (a method that runs blocks itself, such
  as HBLL or LBI, still gets compiled blocks). ``train.compile_scope = "blocks"`` asks for per-block
  compilation for any method, as torchtitan does for deep models: identical blocks share one compiled
  graph, so compile time no longer grows with depth.
* `compile_step_begin(mode)` -- marks the start of a training step for CUDA-graph modes, so the graphs
  of the previous step may be overwritten.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from chainfree.errors import ConfigError

CHECKPOINT_MODES = ("none", "full", "selective")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

_aten = torch.ops.aten


def _saved_ops() -> set[Any]:
    """ATen ops whose outputs selective checkpointing keeps: matmuls and the SDPA kernels (expensive to
    recompute, cheap to keep relative to the pointwise chains around them)."""
    names = ["mm", "addmm", "bmm", "baddbmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward",
             "_efficient_attention_forward"]
    ops = set()
    for name in names:
        packet = getattr(_aten, name, None)
        if packet is not None:
            ops.add(packet.default)
    return ops


SAVED_OPS = _saved_ops()


def _sac_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_context() -> tuple[Any, Any]:
    """The (forward, recompute) context pair of the selective policy (a fresh pair per call, as torch needs)."""
    return create_selective_checkpoint_contexts(_sac_policy)


def _block_types() -> tuple[type[nn.Module], ...]:
    from chainfree.models.lm import BLOCKS, block_class

    return tuple(block_class(kind) for kind in BLOCKS)


def iter_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """Residual blocks of `model`, outermost first: LanguageModel blocks of every kind and Hugging Face
    decoder layers. A block nested in another block is not yielded twice."""
    types = _block_types()
    hf_names: set[str] = set()
    for module in model.modules():
        hf_names.update(getattr(module, "_no_split_modules", None) or [])

    def visit(module: nn.Module) -> Iterator[nn.Module]:
        for child in module.children():
            if isinstance(child, types) or type(child).__name__ in hf_names:
                yield child
            else:
                yield from visit(child)

    yield from visit(model)


def _checkpointed(block: nn.Module, forward: Callable[..., Any], mode: str, *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():  # eval / generation: nothing is saved anyway
        return forward(*args, **kwargs)
    extra = {"context_fn": selective_context} if mode == "selective" else {}
    return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str) -> int:
    """Run every block of `model` under activation checkpointing `mode` (none | full | selective), in place.

    Returns how many blocks were wrapped (0 for 'none'). Applying it twice, or to a model without blocks
    when a mode other than 'none' is asked for, is refused with a ConfigError.
    """
    if mode not in CHECKPOINT_MODES:
        raise ConfigError(f"train.activation_checkpoint must be one of {', '.join(CHECKPOINT_MODES)}, got {mode!r}")
    if mode == "none":
        return 0
    blocks = list(iter_blocks(model))
    if not blocks:
        raise ConfigError(f"train.activation_checkpoint={mode!r}: {type(model).__name__} has no residual blocks "
                          "chainfree knows (GPT, Mamba-2/3, hybrid, Hugging Face decoder layers); set it to 'none'")
    for block in blocks:
        if getattr(block, "_chainfree_checkpoint", None) is not None:
            raise ConfigError(f"activation checkpointing is already applied ({block._chainfree_checkpoint!r}) to "
                              f"{type(block).__name__}; apply it once")
        original = block.forward  # bound method of the class
        block.forward = functools.partial(_checkpointed, block, original, mode)
        block._chainfree_checkpoint = mode
    return len(blocks)


def remove_activation_checkpointing(model: nn.Module) -> int:
    """Undo `apply_activation_checkpointing` (the blocks' class forward is used again); returns how many."""
    count = 0
    for block in iter_blocks(model):
        if getattr(block, "_chainfree_checkpoint", None) is not None:
            del block.forward
            block._chainfree_checkpoint = None
            count += 1
    return count


def check_compile_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise ConfigError(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")


def uses_cudagraphs(mode: str) -> bool:
    return mode in ("reduce-overhead", "max-autotune")


def compile_model(model: nn.Module, mode: str = "default", whole_model: bool = True) -> int:
    """torch.compile `model` in place with `mode`; returns how many modules were compiled.

    `whole_model=True` compiles the model's forward (one graph for forward and backward per shape: the
    right choice when the step is autograd through `model(x, y)`); False compiles each block, for methods
    that call blocks themselves. CUDA-graph modes need `compile_step_begin` at the start of every step.
    """
    check_compile_mode(mode)
    prime_caches(model)
    # dynamic=False: training shapes are fixed, and a value that changes between compiled instances of one
    # class (e.g. BASIS compression in two models of one process) must be specialised on, not turned symbolic
    kwargs: dict[str, Any] = {"dynamic": False} if mode == "default" else {"mode": mode, "dynamic": False}
    keep_saved = bool(getattr(model, "retains_block_graphs", False))
    if keep_saved:
        # the method's step differentiates a block's graph more than once (LBI's Jacobian VJPs, then the
        # parameter VJP): compile with AOTAutograd's donated buffers off, see _inductor_keeping_saved_tensors
        kwargs["backend"] = _inductor_keeping_saved_tensors
    blocks = [] if whole_model else list(iter_blocks(model))
    targets = blocks or [model]
    for module in targets:
        module.compile(**kwargs)
        module._chainfree_keeps_saved_tensors = keep_saved  # LBI checks this before a retain_graph backward
    return len(targets)


def _inductor_keeping_saved_tensors(gm: Any, example_inputs: Any, mode: str | None = None) -> Any:
    """The inductor backend with AOTAutograd's "donated buffers" off, for models that declare
    ``retains_block_graphs`` (a step that backpropagates through one forward graph more than once, with
    retain_graph=True). With donation on, the compiled backward frees the tensors it saved, and torch refuses
    a second backward through it ("compiled with non-empty donated buffers which requires ...
    retain_graph=False"). The flag is read when AOTAutograd partitions the joint graph, i.e. when dynamo
    compiles at the first forward call, not at ``module.compile()``: hence a backend that sets it around
    that compilation (a global flip would change every other compiled model of the process, and a context
    around ``compile()`` would be gone by then). Being a backend of its own, its graphs are also cached apart
    from plain inductor ones, so a block compiled earlier with donation on is never reused here (checked: a
    plain blocks-scope compile of the same block class before it still leaves these graphs undonated). torch
    also re-reads the global flag when a retain_graph backward runs; the method switches it off around those
    backward calls only (chainfree.models.lbi.retaining_compiled_graphs), after checking the mark set here."""
    import torch._functorch.config as functorch_config
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode, False) if mode and mode != "default" else {}
    with functorch_config.patch(donated_buffer=False):
        return compile_fx(gm, example_inputs, config_patches=patches)


def prime_caches(model: nn.Module) -> int:
    """Fill the lazily built caches of the model (the RoPE cos/sin tables of every attention layer, for the
    model's seq_len) before compiling. Built inside a compiled graph, such a cache becomes a graph output that is
    stored on the module: under CUDA graphs the next replay overwrites it while the module still holds it.
    Returns how many caches were filled."""
    seq_len = next((m.cfg.seq_len for m in model.modules() if hasattr(getattr(m, "cfg", None), "seq_len")), None)
    param = next(model.parameters(), None)
    if seq_len is None or param is None:
        return 0
    count = 0
    for module in model.modules():
        rope = getattr(module, "rope", None)
        if callable(rope) and hasattr(module, "_rope"):
            rope(seq_len, param.device)
            count += 1
    return count


def compile_step_begin(mode: str) -> None:
    """Start of a training step: under CUDA graphs, lets the compiled graphs reuse their output buffers."""
    if uses_cudagraphs(mode) and torch.cuda.is_available():
        torch.compiler.cudagraph_mark_step_begin()


def apply_train_options(model: nn.Module, train: Any, uses_autograd_step: bool = True) -> dict[str, Any]:
    """Apply the `train.activation_checkpoint` / `train.compile` / `train.compile_mode` / `train.compile_scope`
    settings of a TrainConfig (read with defaults, so a config without them means none/off); returns what was
    done. Scope 'model' on a method that runs blocks itself is refused: its step never calls model.forward."""
    ac = getattr(train, "activation_checkpoint", "none")
    compiled = bool(getattr(train, "compile", False))
    mode = getattr(train, "compile_mode", "default")
    scope = getattr(train, "compile_scope", "auto")
    if compiled and scope == "model" and not uses_autograd_step:
        raise ConfigError("train.compile_scope='model': this method runs the model's blocks itself, so a compiled "
                          "model.forward would never run; use 'blocks' or 'auto'")
    whole = uses_autograd_step if scope == "auto" else scope == "model"
    done: dict[str, Any] = {"activation_checkpoint": ac,
                            "checkpointed_blocks": apply_activation_checkpointing(model, ac)}
    if compiled:
        done["compiled_modules"] = compile_model(model, mode, whole_model=whole)
        done["compile_mode"] = mode
        done["compile_scope"] = "model" if whole else "blocks"
    return done
