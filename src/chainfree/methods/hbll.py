"""HBLL: hierarchical block-local learning -- a training step whose critical path is O(log N) blocks.

Source and status. The HBLL paper (arXiv 2606.21497) was not readable offline: only its abstract (seed 002)
and third-party summaries. What follows is OUR construction (SPEC section 4), built from the abstract and
from its predecessor, block-local learning (BLL, arXiv 2305.14974: blocks with detached inputs, a backward
path carrying target information, local losses that compare forward and backward information).

Structure. The model's N residual layers are grouped into M = N / block_size leaf blocks F_0..F_{M-1}
(M a power of two). A binary tree sits over the leaves: node (l, k) covers leaves [k 2^l, (k+1) 2^l).
Every node owns a *shortcut* S_v (a copy of `shortcut_layers` layers of the model, so all shortcuts have
one shape and can be stacked) mapping the state at the node's left boundary to an estimate of the state
at its right boundary; boundary b < M has a small auxiliary readout A_b (norm + linear).

Probabilistic model and local objectives (the variational derivation). Treat the boundary states as
latent variables of a Gaussian chain,
    z_0 = stem(x),   p(z_{i+1} | z_i) = N(F_i(z_i), s^2 I),   p(y | z_M) = softmax(head(norm(z_M))),
and approximate the posterior with a factorised Gaussian q(z | x, y) = prod_b N(m_b, s^2 I). The evidence
lower bound
    log p(y | x) >= E_q[log p(y | z_M)] + sum_i E_q[log p(z_{i+1} | z_i)] + H(q)
splits, for point-like q, into terms -|m_{i+1} - F_i(m_i)|^2 / 2s^2 that each involve ONE block and two
*fixed* boundary values: block i is trained on its own detached input m_i against its own target m_{i+1}.
Locality is therefore exact for a given q; everything rests on how cheaply good means m_b are obtained.
  * Prior (forward) part of m_b: the tree. m_j for leaf j's input is the composition of the shortcuts of
    the binary decomposition of j (j = 6 = 4 + 2: S_[0,4) then S_[4,6)): at most log2 M sequential
    shortcut evaluations, and all leaves get their inputs after log2 M rounds.
    Paired leaves (`pair_leaves`, default): the last of these rounds would apply the level-0 shortcuts S_[2i,2i+1),
    each an estimate of ONE leaf. Instead that round runs the even leaves themselves, and odd leaf 2i+1 reads
    the true F_{2i}(m_{2i}): half the leaves see exactly the chain's state given their neighbour's input, at no
    extra round (the critical path grows by max(0, block_size - shortcut_layers)). The level-0 shortcuts still
    distil (they form sub-network level 0 and carry the level-0 messages). Measured in docs/hbll.md.
  * Likelihood (backward) part: q(z_b | x, y) ~ p(z_b | x) p(y | z_b). With p(z_b | x) = N(mu_b, s^2 I)
    and p(y | z_b) the likelihood of the label with the rest of the chain replaced by the shortcuts of
    the suffix [b, M) (again a binary decomposition, <= log2 M of them), a first-order (Laplace) step gives
    the posterior mean m_b = mu_b - s^2 * delta_b,  delta_b = d(-log p(y | z_b)) / d z_b. The messages
    delta_b are computed top-down by vector-Jacobian products through the *shortcuts* (never through the
    leaf blocks, so no gradient crosses a block and leaf weights are never transported backward), one
    tree level per round: log2 M rounds. The gradient of the block term |F_i(m_i) - m_{i+1}|^2 / 2s^2
    at F_i(m_i) = mu_{i+1} is exactly delta_{i+1}: we implement it as the surrogate <F_i(m_i), delta_{i+1}>.
  * The label term p(y | z_b) is also estimated directly by the local readout A_b: leaf i adds
    CE(A_{i+1}(F_i(m_i)), y) (weight `aux_weight`), the local term of flat block-local learning.
  * Weight of the message (`global_weight`, the s^2 of m_b = mu_b - s^2 delta_b): default 0.1. Measured on CPU
    (docs/hbll.md): at weight 1 the byte-GPT chain diverged (messages 4-7x the true gradient's norm, shortcut
    errors ~0.8: the messages then train the tree path, whose states the shortcuts no longer track); at 0.1
    the shortcuts track the chain (relative error 0.04-0.09), the messages point along the true chain gradient
    (cosine 0.90-0.95), and quality equals the message-free variant's (weight 0) within noise.
  * Shortcut nodes fit their own Gaussian q(z_b | z_a) = N(S_v(z_a), s^2 I) to the chain's transition over
    the span, i.e. minimise E|S_v(m_a) - F_{b-1}(m_{b-1})|^2 (`shortcut_weight`; we divide by the target's
    mean square, i.e. s^2 scales with the state, so the term stays O(1) as residual streams grow; without
    this the shortcuts' gradients dominated the loop's global clip norm in LM runs): distillation onto the
    output of the span's last leaf evaluated on ITS tree input -- a fixed-point consistency condition that
    holds exactly when every shortcut equals its span's composition. They also add a readout CE
    (`shortcut_aux_weight`) so that every cut through the tree is itself a classifier (sub-networks).
  * The head and final norm train on the detached z_M = F_{M-1}(m_{M-1}); the last leaf gets the exact
    delta_M, the stem trains through leaf 0 (its input is not detached: the stem is part of leaf 0).

Critical path of one step (counted by `HBLL.step`, in layer evaluations, block_size = shortcut_layers = 1):
log2 M prefix rounds + 1 leaf round + log2 M suffix (VJP) rounds + 1 local backward = 2 log2 N + 2, against
2 N for backprop. Same-round work is independent and runs as ONE batched call per round
(`parallel='vmap'`: parameters of same-shape modules stacked with torch.stack, the module applied with
torch.func.functional_call under torch.func.vmap); `parallel='loop'` is the plain reference.

Optional fixed-point corrections (`corrections=c`, default 0): after the tree, c Jacobi sweeps
m_{j+1} <- F_j(m_j) (all leaves at once, no graph) move every leaf input one true block closer to the
chain's state; each sweep adds at most block_size to the critical path (the sweep's inputs are never the
deepest prefix state).

Sub-networks: cutting the tree at level l (compose the M / 2^l shortcuts of that level) gives a network of
depth (M / 2^l) * shortcut_layers; `subnetwork_logits` evaluates every level, the leaf chain and the tree path.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from chainfree.errors import ConfigError
from chainfree.methods.base import Method, StepStats
from chainfree.ops.cross_entropy import IGNORE_INDEX, linear_cross_entropy


@dataclass
class HBLLConfig:
    """Parameters of HBLL (`method.<key>`)."""

    block_size: int = 1  # layers per leaf block; n_layers / block_size must be a power of two
    shortcut_layers: int = 1  # layers in every node's shortcut network
    aux_weight: float = 1.0  # leaf readout CE (local likelihood term)
    global_weight: float = 0.1  # top-down posterior target (suffix message through shortcuts); 1.0 diverged (LM)
    shortcut_weight: float = 1.0  # shortcut distillation onto its span's last leaf output
    shortcut_aux_weight: float = 0.1  # readout CE of each shortcut output (keeps sub-networks usable)
    corrections: int = 0  # Jacobi sweeps m_{j+1} <- F_j(m_j) after the tree (each adds block_size)
    pair_leaves: bool = True  # odd leaf 2i+1 reads even leaf 2i's true output (replaces level-0 prefix shortcuts)
    aux_head: str = "auto"  # 'linear' (own Linear per boundary), 'shared' (detached model head), 'auto'
    parallel: str = "auto"  # 'vmap' (one batched call per round), 'loop' (reference), 'auto' (vmap on GPU)
    eval_path: str = "chain"  # inference: 'chain' (all leaves in order) or 'tree' (log-depth path)
    # under torchrun (world > 1): 'tree' splits every round's members across ranks (chainfree.parallel.hbll_tree;
    # all ranks one batch), 'data' runs the whole tree per rank on its shard (data parallel); 'auto' = 'tree'
    distributed: str = "auto"

    def validate(self) -> None:
        if self.block_size < 1:
            raise ConfigError("method.block_size must be >= 1")
        if self.shortcut_layers < 1:
            raise ConfigError("method.shortcut_layers must be >= 1")
        if self.corrections < 0:
            raise ConfigError(f"method.corrections must be >= 0, got {self.corrections}")
        if not isinstance(self.pair_leaves, bool):
            raise ConfigError(f"method.pair_leaves must be true or false, got {self.pair_leaves!r}")
        for key in ("aux_weight", "global_weight", "shortcut_weight", "shortcut_aux_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key} must be >= 0")
        if self.aux_head not in ("auto", "linear", "shared"):
            raise ConfigError("method.aux_head must be 'auto', 'linear' or 'shared'")
        if self.parallel not in ("auto", "vmap", "loop"):
            raise ConfigError("method.parallel must be 'auto', 'vmap' or 'loop'")
        if self.eval_path not in ("chain", "tree"):
            raise ConfigError("method.eval_path must be 'chain' or 'tree'")
        if self.distributed not in ("auto", "tree", "data"):
            raise ConfigError(f"method.distributed must be 'auto', 'tree' or 'data', got {self.distributed!r}")


# ------------------------------------------------------------------------------------------------ model glue
# HBLL works on any "chain model": `.embed` (stem), `.blocks` (residual layers x -> x, same shape),
# `.norm`, `.head` (nn.Linear) and `.loss(h, targets)` (mean CE of normalised hidden states) -- the
# LanguageModel and chainfree.models.vision.VisionNet both have this surface.


def readout_ce(z: torch.Tensor, norm: nn.Module, weight: torch.Tensor, bias, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of a norm + linear readout; token-shaped inputs use the chunked fused loss (no full logits)."""
    h = norm(z)
    if h.dim() == 3:
        return linear_cross_entropy(h, weight, bias, targets)
    return F.cross_entropy(F.linear(h, weight, bias).float(), targets)


class _SavedGradCE(torch.autograd.Function):
    """Mean CE of h Wᵀ + b whose forward keeps the logit gradient softmax - onehot (compute dtype, [R, V]) so
    the backward is two matmuls. Why: HBLL's readouts evaluate an LM head at every tree boundary (R = 190 x
    B x T rows at N = 64); the chunked CE used for the model's own head recomputes the logits in the backward
    and makes ~10 elementwise passes over each [rows, V] fp32 chunk, which dominated the GPT step's GPU time
    (profile in benchmarks/results/hbll_speed_h100_profile.txt). Here: ~4 passes, at the price of R x V
    values of memory. Rows with IGNORE_INDEX targets contribute nothing."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk_rows):
        cd = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else (
            torch.promote_types(h.dtype, weight.dtype))
        acc = torch.promote_types(cd, torch.float32)
        w = weight.to(cd)
        valid = targets != IGNORE_INDEX
        tgt = targets.clamp_min(0).unsqueeze(1)
        G = torch.empty((h.shape[0], w.shape[0]), device=h.device, dtype=cd)
        total = torch.zeros((), device=h.device, dtype=acc)
        for a in range(0, h.shape[0], chunk_rows):
            b = min(a + chunk_rows, h.shape[0])
            logits = h[a:b].to(cd) @ w.T
            if bias is not None:
                logits = logits.to(acc) + bias.to(acc)
            logp = torch.log_softmax(logits, dim=-1, dtype=acc)  # upcast inside the kernel: no extra pass
            total -= (logp.gather(1, tgt[a:b]).squeeze(1) * valid[a:b]).sum()
            g = logp.exp_()
            g.scatter_add_(1, tgt[a:b], -torch.ones_like(g[:, :1]))
            G[a:b] = g
        count = valid.sum().clamp_min(1)
        ctx.save_for_backward(h, w, G, valid, count)
        ctx.has_bias = bias is not None
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        h, w, G, valid, count = ctx.saved_tensors
        scale = (grad_out / count).to(G.dtype)
        v = valid.to(G.dtype).unsqueeze(1) * scale  # zero ignored rows, scale on the small side
        dh = ((G @ w) * v).to(h.dtype) if ctx.needs_input_grad[0] else None
        dw = (G.T @ (h.to(G.dtype) * v)).to(w.dtype) if ctx.needs_input_grad[1] else None
        db = (v.T @ G).squeeze(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dh, dw, db, None, None


def readout_linear_ce(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of softmax(h Wᵀ + b) against targets for readouts (see `_SavedGradCE`). h: [..., d]."""
    h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if h2.shape[0] != t.shape[0]:
        raise ValueError(f"hidden rows ({h2.shape[0]}) and targets ({t.shape[0]}) differ in number")
    return _SavedGradCE.apply(h2, weight, bias, t, max(1, (1 << 24) // max(weight.shape[0], 1)))


class AuxHead(nn.Module):
    """Readout of one boundary state: own norm, and either an own Linear or the detached model head."""

    def __init__(self, model: nn.Module, own_linear: bool) -> None:
        super().__init__()
        self.norm = copy.deepcopy(model.norm)
        self.linear = copy.deepcopy(model.head) if own_linear else None
        self._shared = [model.head]  # a list, so the model head is not registered twice

    def ce(self, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        head = self.linear if self.linear is not None else self._shared[0]
        weight = head.weight if self.linear is not None else head.weight.detach()
        bias = head.bias
        if bias is not None and self.linear is None:
            bias = bias.detach()
        return readout_ce(z, self.norm, weight, bias, targets)


def _split_name(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(owning submodule, attribute) of a dotted parameter name."""
    owner, _, attr = name.rpartition(".")
    return (module.get_submodule(owner) if owner else module), attr


class StackedParams(nn.Module):
    """n same-structure modules stored as ONE parameter per tensor name, shape [n, ...].

    Why: a tree round applies many same-shape modules at once. With one parameter per module, every round
    had to torch.stack their parameters (a copy per tensor) and its backward had to unbind and accumulate
    into n separate .grad tensors (n small kernels per tensor per round; ~3k extra kernel launches per step
    at N = 64), and the optimizer walked 3N small tensors. Stacked, a round takes a slice of each parameter
    (a view, no copy; `rows`), and gradients accumulate in place into slices of the stacked .grad.

    The member modules keep working as ordinary modules (inference, sub-networks, hooks): their parameter
    attributes are replaced by detached views (aliases) of their row, re-bound after .to()/.double() and
    deepcopy. Gradients never flow through the aliases: training goes through `rows()`.
    """

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        super().__init__()
        first = modules[0]
        self.names = [name for name, _ in first.named_parameters()]
        for mod in modules[1:]:
            shapes = [(n, p.shape) for n, p in mod.named_parameters()]
            if shapes != [(n, first.get_parameter(n).shape) for n in self.names]:
                raise ConfigError(f"stacked modules must have one structure; {type(mod).__name__} differs")
        self.stacked = nn.ParameterDict({
            n.replace(".", "__"): nn.Parameter(torch.stack([mod.get_parameter(n).detach() for mod in modules]))
            for n in self.names
        })
        self._members = list(modules)  # plain list: the members are registered where they live
        self._index = {id(mod): i for i, mod in enumerate(modules)}
        for mod in modules:
            for n in self.names:
                owner, attr = _split_name(mod, n)
                del owner._parameters[attr]
        self.rebind()

    def __len__(self) -> int:
        return len(self._members)

    def param(self, name: str) -> nn.Parameter:
        """The stacked parameter [n, ...] of a member parameter name (e.g. 'mlp.up.weight')."""
        return self.stacked[name.replace(".", "__")]

    def rebind(self) -> None:
        """Point every member's parameter attributes at (detached) views of its row of the stacked tensors."""
        for i, mod in enumerate(self._members):
            for n in self.names:
                owner, attr = _split_name(mod, n)
                setattr(owner, attr, self.param(n).detach()[i])

    def _apply(self, fn, recurse: bool = True):  # .to(), .double(), .cuda(): new storage -> new aliases
        out = super()._apply(fn, recurse)
        self.rebind()
        return out

    def __setstate__(self, state: dict) -> None:  # deepcopy / unpickle: aliases must follow the copy
        super().__setstate__(state)
        if "_members" in state:
            self.rebind()

    def member(self, row: int) -> nn.Module:
        return self._members[row]

    def member_rows(self, modules: Sequence[nn.Module]) -> list[int] | None:
        """Rows of `modules` in this stack, or None if one of them is not a member."""
        rows = [self._index.get(id(mod)) for mod in modules]
        return None if any(r is None for r in rows) else rows  # type: ignore[return-value]

    def rows(self, index: int | slice | list[int]) -> dict[str, torch.Tensor]:
        """Parameters of the members at `index` for ONE training call: a row (int) or a [k, ...] block.

        int and slice: fresh autograd leaves over a view of the stacked parameter whose .grad is the
        matching view of the stacked .grad (allocated as zeros if absent), so backward accumulates in place
        -- no stack, no unbind, no per-member accumulation. A list (non-contiguous rows) gathers with
        differentiable indexing (one gather and one index_add per tensor). Without grad mode: plain views."""
        out: dict[str, torch.Tensor] = {}
        for n in self.names:
            p = self.param(n)
            if isinstance(index, list):
                idx = torch.tensor(index, device=p.device)
                out[n] = p.index_select(0, idx) if torch.is_grad_enabled() else p.detach().index_select(0, idx)
                continue
            if not (torch.is_grad_enabled() and p.requires_grad):
                out[n] = p.detach()[index]
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            q = p.detach()[index].requires_grad_(True)
            q.grad = p.grad[index]
            out[n] = q
        return out


class HBLLTree(nn.Module):
    """The model plus the tree's shortcuts and readouts. Forward = inference of the trained model."""

    def __init__(self, model: nn.Module, cfg: HBLLConfig) -> None:
        super().__init__()
        n_layers = len(model.blocks)
        if n_layers % cfg.block_size:
            raise ConfigError(f"method.block_size={cfg.block_size} must divide the {n_layers} layers")
        m = n_layers // cfg.block_size
        if m < 2 or m & (m - 1):
            raise ConfigError(
                f"HBLL needs a power-of-two number (>= 2) of leaf blocks; {n_layers} layers / block_size "
                f"{cfg.block_size} = {m}: change model.n_layers or method.block_size"
            )
        if cfg.shortcut_layers > n_layers:
            raise ConfigError(f"method.shortcut_layers={cfg.shortcut_layers} exceeds the {n_layers} layers")
        self.model, self.cfg, self.n_leaves, self.levels = model, cfg, m, int(math.log2(m))
        bs = cfg.block_size
        # leaves are views of the model's own blocks (kept in a list: no duplicate registration)
        self._leaves = [nn.Sequential(*model.blocks[i * bs : (i + 1) * bs]) for i in range(m)]
        # node (l, k): shortcut initialised as a copy of the first layers it covers. Order: per level the left
        # children (even k: the prefix round of that level), then the right children (odd k: its VJP round),
        # the root last -- so every round's shortcuts are one contiguous slice of the stacked parameters
        self.nodes = [(lv, k) for lv in range(self.levels) for par in (0, 1) for k in range(par, m >> lv, 2)]
        self.nodes.append((self.levels, 0))
        self.node_index = {node: i for i, node in enumerate(self.nodes)}
        self.shortcuts = nn.ModuleList(
            nn.Sequential(*(copy.deepcopy(model.blocks[(k << lv) * bs + t]) for t in range(cfg.shortcut_layers)))
            for lv, k in self.nodes
        )
        own = cfg.aux_head == "linear" or (cfg.aux_head == "auto" and model.head.out_features <= 1024)
        self.own_linear = own
        self.aux = nn.ModuleList(AuxHead(model, own) for _ in range(m - 1))  # boundaries 1..M-1
        # persistent [n, ...] parameters (see StackedParams): leaves, shortcuts and readouts each one tensor
        # per parameter name; the modules above stay usable through aliases of their rows
        # leaf rows: even leaves, then odd ones (rounds run all leaves, or the evens and then the odds)
        self.leaf_stack = StackedParams([self._leaves[i] for i in [*range(0, m, 2), *range(1, m, 2)]])
        self.shortcut_stack = StackedParams(list(self.shortcuts))
        self.aux_stack = StackedParams(list(self.aux))
        self.partition = None  # set by chainfree.parallel.hbll_tree.partitioned: this rank's share of each round

    # ---------------------------------------------------------------------------------------- primitives
    def stem(self, inputs: torch.Tensor) -> torch.Tensor:
        seq_len = getattr(getattr(self.model, "cfg", None), "seq_len", None)
        if seq_len is not None and inputs.shape[-1] > seq_len:
            raise ValueError(f"sequence of {inputs.shape[-1]} tokens is longer than model.seq_len={seq_len}")
        return self.model.embed(inputs)

    def final_ce(self, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(self.model.norm(z), targets)

    def readout_ce(self, boundary: int, z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """CE of boundary state z_b; b = M uses the model head with detached weights (a local readout)."""
        if boundary < self.n_leaves:  # through the stack: the aux modules' own attributes are detached aliases
            return self.readout_ce_many([boundary], z.unsqueeze(0), targets)
        head, norm = self.model.head, self.model.norm
        bias = head.bias.detach() if head.bias is not None else None
        return readout_ce(z, _frozen(norm), head.weight.detach(), bias, targets)

    def readout_ce_many(self, boundaries: Sequence[int], zs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over items of the readout CE of zs[i] at boundary boundaries[i], as ONE batched call. The
        readouts' parameters come from the persistent stack (boundary b < M is row b - 1; b = M is the
        model's frozen norm/head): one slice per tensor for consecutive boundaries, else one gather. Own
        linears run as one einsum; a shared head is one fused chunked CE. Tree-parallel: each rank evaluates
        its share of the items (`TreePartition.split_loss`)."""
        if self.partition is not None:
            bl = list(boundaries)
            return self.partition.split_loss(
                len(bl), zs, lambda a, b, z: self._readout_ce_local(bl[a:b], z, targets)
            )
        return self._readout_ce_local(boundaries, zs, targets)

    def _readout_ce_local(self, boundaries: Sequence[int], zs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n, d, M = len(boundaries), zs.shape[-1], self.n_leaves
        _frozen(self.model.norm)  # validates the norm type
        head, norm = self.model.head, self.model.norm
        idx = [b - 1 for b in boundaries]
        if M not in boundaries and idx == list(range(idx[0], idx[0] + n)):
            P = self.aux_stack.rows(slice(idx[0], idx[0] + n))
        else:
            frozen = {"norm.weight": norm.weight, "norm.bias": norm.bias, "linear.weight": head.weight,
                      "linear.bias": head.bias}
            rows = torch.tensor(idx, device=zs.device)
            P = {name: torch.cat([self.aux_stack.param(name), frozen[name].detach().unsqueeze(0)]).index_select(0, rows)
                 for name in self.aux_stack.names}
        view = (n,) + (1,) * (zs.dim() - 2) + (d,)
        h = F.layer_norm(zs, (d,), eps=norm.eps) * P["norm.weight"].view(view)
        if "norm.bias" in P:
            h = h + P["norm.bias"].view(view)
        rep = targets.unsqueeze(0).expand(n, *targets.shape).reshape(-1)
        if not self.own_linear:
            hb = head.bias.detach() if head.bias is not None else None
            return readout_linear_ce(h, head.weight.detach(), hb, rep)
        logits = torch.einsum("n...d,ncd->n...c", h, P["linear.weight"].to(h.dtype))  # [n, ..., C]
        if "linear.bias" in P:
            logits = logits + P["linear.bias"].view((n,) + (1,) * (zs.dim() - 2) + (-1,)).to(logits.dtype)
        # fp32 softmax under autocast, float64 stays float64 (exactness tests, tree-parallel == one process)
        logits = logits.reshape(-1, logits.shape[-1])
        return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), rep)

    def shortcut(self, node: tuple[int, int]) -> nn.Module:
        return self.shortcuts[self.node_index[node]]

    def apply(self, modules: Sequence[nn.Module], xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Evaluate modules[i](xs[i]) for all i as ONE parallel call (same-shape leaves or shortcuts).

        Parameters come from the persistent stack (`StackedParams.rows`): a round of consecutive members is
        one slice per tensor (the node order makes every tree round consecutive). 'vmap' runs all members at
        once over the [k, ...] slice (`stacked_apply`); 'loop' (the reference) calls each module on its row.
        Under `self.partition` (tree-parallel) only this rank's share runs and the outputs are gathered."""
        stack = next((st for st in (self.leaf_stack, self.shortcut_stack) if st.member_rows(modules) is not None),
                     None)
        if stack is None:
            raise ValueError("HBLLTree.apply takes the tree's leaves or shortcuts")
        rows = stack.member_rows(modules)
        mode = self.cfg.parallel
        if mode == "auto":  # on CPU the batched call saves no latency and vmap's overhead dominates
            mode = "vmap" if xs[0].is_cuda else "loop"
        if self.partition is None and mode == "loop":
            return [functional_call(mod, stack.rows(r), (x,)) for mod, r, x in zip(modules, rows, xs, strict=True)]
        # the call's order is free: run the members in row order, so a round is one slice when its rows are
        order = sorted(range(len(rows)), key=rows.__getitem__)
        srt = [rows[i] for i in order]

        def run(rs: list[int], x: torch.Tensor) -> torch.Tensor:  # members at stack rows rs on inputs x [n, ...]
            if mode == "loop":
                return torch.stack([functional_call(stack.member(r), stack.rows(r), (xi,)) for r, xi in zip(rs, x)])
            consecutive = rs == list(range(rs[0], rs[0] + len(rs)))
            params = stack.rows(slice(rs[0], rs[0] + len(rs)) if consecutive else rs)
            return stacked_apply(stack.member(rs[0]), params, x)

        if self.partition is not None:  # tree-parallel over ranks (chainfree.parallel.hbll_tree)
            outs = self.partition.apply(srt, [xs[i] for i in order], run)
        else:
            outs = run(srt, torch.stack([xs[i] for i in order])).unbind(0)
        result: list[torch.Tensor] = [outs[0]] * len(rows)
        for pos, i in enumerate(order):
            result[i] = outs[pos]
        return result

    def named_model_grads(self) -> dict[str, torch.Tensor]:
        """Gradients under the plain model's parameter names ('blocks.3.mlp.up.weight', 'embed.weight', ...):
        the stacked leaf gradients split back into per-block rows (views). For comparisons with exact
        backprop on the unprepared model."""
        out = {n: p.grad for n, p in self.model.named_parameters() if p.grad is not None}
        bs = self.cfg.block_size
        for name in self.leaf_stack.names:
            g = self.leaf_stack.param(name).grad
            if g is None:
                continue
            t, _, rest = name.partition(".")  # leaf i = Sequential of block_size blocks: 't.rest'
            for i, row in enumerate(self.leaf_stack.member_rows(self._leaves) or []):
                out[f"blocks.{i * bs + int(t)}.{rest}"] = g[row]
        return out

    # ------------------------------------------------------------------------------------------ inference
    def chain_hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        z = self.stem(inputs)
        for leaf in self._leaves:
            z = leaf(z)
        return z

    def prefix_states(self, z0: torch.Tensor) -> list[torch.Tensor]:
        """h_j for j = 0..M-1 by binary decomposition of j: log2 M rounds of parallel shortcut calls."""
        h: list[torch.Tensor | None] = [z0] + [None] * (self.n_leaves - 1)
        for lv in range(self.levels - 1, -1, -1):
            ks = list(range(0, self.n_leaves >> lv, 2))
            outs = self.apply([self.shortcut((lv, k)) for k in ks], [h[k << lv] for k in ks])
            for k, out in zip(ks, outs, strict=True):
                h[(k + 1) << lv] = out
        return h  # type: ignore[return-value]

    def tree_hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        """z_M along the tree path: prefix shortcuts to the last leaf's input, then the last leaf."""
        return self._leaves[-1](self.prefix_states(self.stem(inputs))[-1])

    def level_hidden(self, inputs: torch.Tensor, level: int) -> torch.Tensor:
        """Sub-network cut at `level`: compose the M / 2^level shortcuts of that level."""
        z = self.stem(inputs)
        for k in range(self.n_leaves >> level):
            z = self.shortcut((level, k))(z)
        return z

    def subnetworks(self) -> list[tuple[str, int]]:
        """(name, effective depth in layers) of every sub-network `subnetwork_hidden` offers."""
        sl, n = self.cfg.shortcut_layers, self.n_leaves * self.cfg.block_size
        subs = [(f"level{lv}", (self.n_leaves >> lv) * sl) for lv in range(self.levels, -1, -1)]
        return subs + [("tree", self.levels * sl + self.cfg.block_size), ("chain", n)]

    def subnetwork_hidden(self, inputs: torch.Tensor, name: str) -> torch.Tensor:
        if name == "chain":
            return self.chain_hidden(inputs)
        if name == "tree":
            return self.tree_hidden(inputs)
        return self.level_hidden(inputs, int(name.removeprefix("level")))

    def hidden(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.chain_hidden(inputs) if self.cfg.eval_path == "chain" else self.tree_hidden(inputs)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        z = self.hidden(inputs)
        if targets is None:
            return self.model.head(self.model.norm(z))
        return self.final_ce(z, targets)


def _frozen(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's final LayerNorm with detached parameters: a readout that trains nothing of the model."""
    if not isinstance(norm, nn.LayerNorm):
        raise ConfigError(f"HBLL expects the model's final norm to be nn.LayerNorm, got {type(norm).__name__}")

    def apply(z: torch.Tensor) -> torch.Tensor:
        w = norm.weight.detach() if norm.weight is not None else None
        b = norm.bias.detach() if norm.bias is not None else None
        return F.layer_norm(z, norm.normalized_shape, w, b, norm.eps)

    return apply


def math_attention(q, k, v, is_causal: bool = True, scale: float | None = None, enable_gqa: bool = False):
    """Causal attention from matmul + softmax (SDPA calling convention). Used inside vmap: every op has a
    batching rule, whereas the fused SDPA kernels fall back to a per-sample loop (CPU) or, on CUDA with
    bf16, gave non-finite gradients under vmap in our GPU run. Softmax in fp32."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)).to(torch.promote_types(q.dtype, torch.float32)) * scale
    if is_causal:
        T, S = q.shape[-2], k.shape[-2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(-1).to(v.dtype) @ v


def _sub(params: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in params.items() if k.startswith(prefix)}


def _linear_k(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """k Linears at once: x [k, ..., in], w [k, out, in], b [k, out] -> [k, ..., out] (one (b)addbmm)."""
    k = x.shape[0]
    x2 = x.reshape(k, -1, x.shape[-1])
    wt = w.transpose(1, 2)
    y = torch.bmm(x2, wt) if b is None else torch.baddbmm(b.unsqueeze(1), x2, wt)
    return y.reshape(*x.shape[:-1], w.shape[1])


def _layer_norm_k(norm: nn.LayerNorm, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    y = F.layer_norm(x, norm.normalized_shape, None, None, norm.eps)
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    if "weight" in p:
        y = y * p["weight"].view(shape)
    return y + p["bias"].view(shape) if "bias" in p else y


def _batchable(module: nn.Module) -> bool:
    """Module types with a hand-batched forward (`_forward_k`): exact types only, so a subclass or a layer
    swapped in by another method (e.g. BASIS linears) takes the generic vmap path."""
    known = _BATCHABLE.get(module)
    if known is None:
        known = _BATCHABLE[module] = _batchable_uncached(module)
    return known


_BATCHABLE: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _batchable_uncached(module: nn.Module) -> bool:
    from chainfree.models.attention import CausalSelfAttention, TransformerBlock
    from chainfree.models.mlp import MLP
    from chainfree.models.vision import ResidualMLPBlock

    if type(module) is nn.Sequential:
        return all(_batchable(m) for m in module)
    if type(module) in (ResidualMLPBlock, TransformerBlock, MLP, CausalSelfAttention, nn.Linear, nn.GELU):
        return all(_batchable(m) for m in module.children())
    return type(module) is nn.LayerNorm and len(module.normalized_shape) == 1


def _forward_k(module: nn.Module, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The forward of k same-structure members at once: x [k, ...], p[name] [k, ...]. Same ops as the
    module's forward with a leading member dimension; attention runs its own attn_fn on k*B sequences."""
    from chainfree.models.attention import CausalSelfAttention, TransformerBlock, apply_rope
    from chainfree.models.mlp import MLP
    from chainfree.models.vision import ResidualMLPBlock

    kind = type(module)
    if kind is nn.Sequential:
        for i, m in enumerate(module):
            x = _forward_k(m, _sub(p, f"{i}."), x)
        return x
    if kind is nn.Linear:
        return _linear_k(x, p["weight"], p.get("bias"))
    if kind is nn.LayerNorm:
        return _layer_norm_k(module, p, x)
    if kind is nn.GELU:
        return module(x)
    if kind is MLP:
        h = module.act(_forward_k(module.up, _sub(p, "up."), x))
        return _forward_k(module.down, _sub(p, "down."), h)
    if kind is ResidualMLPBlock:
        return x + _forward_k(module.mlp, _sub(p, "mlp."), _forward_k(module.ln, _sub(p, "ln."), x))
    if kind is TransformerBlock:
        x = x + _forward_k(module.attn, _sub(p, "attn."), _forward_k(module.ln1, _sub(p, "ln1."), x))
        return x + _forward_k(module.mlp, _sub(p, "mlp."), _forward_k(module.ln2, _sub(p, "ln2."), x))
    if kind is CausalSelfAttention:
        k, B, T = x.shape[:3]
        qkv = _forward_k(module.qkv_proj, _sub(p, "qkv_proj."), x)
        q, kk, v = qkv.split(module.qkv_split, dim=-1)
        H, Hk, D = module.n_heads, module.n_kv_heads, module.head_dim
        q = q.reshape(k * B, T, H, D).transpose(1, 2)
        kk = kk.reshape(k * B, T, Hk, D).transpose(1, 2)
        v = v.reshape(k * B, T, Hk, D).transpose(1, 2)
        cos, sin = module.rope(T, x.device)
        q, kk = apply_rope(q, cos, sin), apply_rope(kk, cos, sin)
        if Hk != H:
            y = module.attn_fn(q, kk, v, is_causal=True, enable_gqa=True)
        else:
            y = module.attn_fn(q, kk, v, is_causal=True)
        y = y.transpose(1, 2).reshape(k, B, T, H * D)
        return _forward_k(module.o_proj, _sub(p, "o_proj."), y)
    raise TypeError(f"no batched forward for {kind.__name__}")


def stacked_apply(
    template: nn.Module, params: dict[str, torch.Tensor], xs: torch.Tensor, generic: bool = False
) -> torch.Tensor:
    """`template`'s forward for k members at once: stacked parameters params[name] [k, ...], inputs xs
    [k, ...]. Gradients reach whatever `params` are views of (the persistent stacks of
    `StackedParams.rows`). Known block types (GPT, residual MLP) run a hand-batched forward (`_forward_k`:
    (b)addbmm linears, the model's own attention function on k*B sequences -- fused SDPA kernels, no
    per-op vmap dispatch); anything else, or generic=True, runs torch.func.vmap of functional_call, where
    attention layers use `math_attention` (see there)."""
    if not generic and _batchable(template):
        return _forward_k(template, params, xs)

    def one(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(template, p, (x,))

    attn = [m for m in template.modules() if hasattr(m, "attn_fn")]
    saved = [m.attn_fn for m in attn]
    try:
        for m in attn:
            m.attn_fn = math_attention
        return vmap(one)(params, xs)
    finally:
        for m, fn in zip(attn, saved, strict=True):
            m.attn_fn = fn


# ------------------------------------------------------------------------------------------------- method
class HBLL(Method):
    """Hierarchical block-local learning (our construction; see the module docstring)."""

    name = "hbll"
    Config = HBLLConfig
    uses_autograd_step = False

    def prepare(self, model: nn.Module) -> nn.Module:
        if isinstance(model, HBLLTree):
            return model
        for attr in ("embed", "blocks", "norm", "head", "loss"):
            if not hasattr(model, attr):
                raise ConfigError(
                    f"HBLL needs a model with .{attr} (embed -> blocks -> norm -> head); got {type(model).__name__}"
                )
        return HBLLTree(model, self.config)

    def eval_loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(inputs, targets)

    @property
    def tree_parallel(self) -> bool:
        """True when the tree's rounds are split across the ranks of torch.distributed (world > 1)."""
        from chainfree.parallel.hbll_tree import tree_parallel_world

        return self.config.distributed != "data" and tree_parallel_world() > 1

    # the loop reads these two: every rank gets the full batch, and the step syncs gradients itself
    replicates_batch = tree_parallel
    syncs_gradients = tree_parallel

    def step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        tree = model if isinstance(model, HBLLTree) else None
        if tree is None:
            raise ConfigError("HBLL.step needs the model returned by HBLL.prepare (an HBLLTree)")
        if tree.partition is None and self.tree_parallel:  # rounds split across ranks; the same step inside
            from chainfree.parallel.hbll_tree import tree_parallel_step

            return tree_parallel_step(lambda x, y: self.step(tree, x, y), tree, inputs, targets)
        cfg, m, levels = self.config, tree.n_leaves, tree.levels
        bs, sl = cfg.block_size, cfg.shortcut_layers
        depth: dict[str, int] = {}  # critical-path bookkeeping, in sequential layer evaluations

        # -- prefix rounds: inputs of all leaves via binary decomposition (log2 M rounds) ----------------
        z0 = tree.stem(inputs)
        h: list[torch.Tensor | None] = [z0.detach()] + [None] * (m - 1)
        hd = [0] * m
        sc_out: dict[tuple[int, int], torch.Tensor] = {}
        sc_in_depth: dict[tuple[int, int], int] = {}
        pair = cfg.pair_leaves
        for lv in range(levels - 1, 0 if pair else -1, -1):
            ks = list(range(0, m >> lv, 2))
            outs = tree.apply([tree.shortcut((lv, k)) for k in ks], [h[k << lv] for k in ks])
            for k, out in zip(ks, outs, strict=True):
                j = (k + 1) << lv
                sc_out[(lv, k)], sc_in_depth[(lv, k)] = out, hd[k << lv]
                h[j], hd[j] = out.detach(), hd[k << lv] + sl

        # -- paired leaves: the last prefix round runs the even leaves themselves, so odd leaf 2i+1 reads the
        #    true F_{2i}(m_{2i}) instead of the level-0 shortcut's estimate (same number of rounds) ------------
        even_out: list[torch.Tensor] = []
        if pair:
            evens = list(range(0, m, 2))
            even_in = [z0 if i == 0 else h[i] for i in evens]  # leaf 0 keeps the stem in its graph
            with torch.set_grad_enabled(cfg.corrections == 0):  # after corrections the leaf round reruns them
                even_out = tree.apply([tree._leaves[i] for i in evens], even_in)
            for i, out in zip(evens, even_out, strict=True):
                h[i + 1], hd[i + 1] = out.detach(), hd[i] + bs

        # -- optional fixed-point (Jacobi) corrections: m_{j+1} <- F_j(m_j), all j at once, no graph ------
        for sweep in range(cfg.corrections):
            # after pairing, the first sweep's even-leaf outputs are the pairing round's (same inputs): skip them
            js = list(range(1, m - 1, 2)) if pair and sweep == 0 else list(range(m - 1))
            if not js:  # two paired leaves: the pairing round was already the sweep
                continue
            with torch.no_grad():
                outs = tree.apply([tree._leaves[j] for j in js], [h[j] for j in js])
            old_hd, h, hd = hd, list(h), list(hd)
            for j, out in zip(js, outs, strict=True):  # Jacobi: every update reads the previous sweep's states
                h[j + 1], hd[j + 1] = out.detach(), old_hd[j] + bs

        # -- leaf round: every leaf on its tree input; also the shortcuts not on a prefix path ----------
        leaf_in = [z0] + h[1:]  # leaf 0 keeps the stem in its graph: the stem is part of leaf 0
        if pair and cfg.corrections == 0:  # even leaves ran in the pairing round: only the odd ones are left
            odd_out = tree.apply([tree._leaves[i] for i in range(1, m, 2)], leaf_in[1::2])
            leaf_out = [t for pair_out in zip(even_out, odd_out, strict=True) for t in pair_out]
        else:
            leaf_out = tree.apply(tree._leaves, leaf_in)
        ld = [hd[i] + bs for i in range(m)]
        if pair:  # level-0 left shortcuts left the prefix; they still distil (sub-network level 0) on m_{2i}
            ks = list(range(0, m, 2))
            outs = tree.apply([tree.shortcut((0, k)) for k in ks], [h[k] for k in ks])
            for k, out in zip(ks, outs, strict=True):
                sc_out[(0, k)], sc_in_depth[(0, k)] = out, hd[k]
        right: dict[int, tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = {}
        for lv in range(levels - 1, -1, -1):  # right children, per level (their VJPs form the suffix rounds)
            ks = list(range(1, m >> lv, 2))
            ins = [h[k << lv].detach().requires_grad_(True) for k in ks]  # an alias, not a copy
            outs = tree.apply([tree.shortcut((lv, k)) for k in ks], ins)
            right[lv] = (ks, ins, outs)
            for k, out in zip(ks, outs, strict=True):
                sc_out[(lv, k)], sc_in_depth[(lv, k)] = out, hd[k << lv]
        (root_out,) = tree.apply([tree.shortcut((levels, 0))], [h[0]])
        sc_out[(levels, 0)], sc_in_depth[(levels, 0)] = root_out, 0

        # -- head on the detached z_M: the top message delta_M ---------------------------------------------
        z_m = leaf_out[-1].detach().requires_grad_(True)
        final = tree.final_ce(z_m, targets)
        final.backward()  # head/norm grads (local) and delta_M
        delta: list[torch.Tensor | None] = [None] * (m + 1)
        dd = [0] * (m + 1)
        delta[m], dd[m] = z_m.grad, ld[-1]

        # -- suffix rounds: delta_j = VJP of the right-child shortcut starting at j (log2 M rounds) --------
        if cfg.global_weight > 0:
            for lv in range(levels - 1, -1, -1):
                ks, ins, outs = right[lv]
                grads_out = [delta[(k + 1) << lv] for k in ks]
                grads = torch.autograd.grad(outs, ins, grads_out, retain_graph=True)
                for k, g in zip(ks, grads, strict=True):
                    j = k << lv
                    delta[j] = g
                    dd[j] = max(dd[(k + 1) << lv], sc_in_depth[(lv, k)] + sl) + sl

        # -- local objectives, one backward (all parts independent: inputs detached) ------------------------
        # leaves: surrogate <F_i(m_i), delta_{i+1}> (= gradient of the Gaussian match to the posterior mean)
        outs = torch.stack(leaf_out)
        weights = [cfg.global_weight] * (m - 1) + [1.0]
        if cfg.global_weight > 0:
            deltas = torch.stack([delta[i + 1] * w for i, w in enumerate(weights)])
        else:
            deltas = torch.zeros_like(outs)
            deltas[-1] = delta[m]
        loss = (outs * deltas.to(outs.dtype)).sum()
        for i in range(m):
            b = i + 1
            dep = max(ld[i], dd[b]) if (cfg.global_weight > 0 or b == m) else ld[i]
            depth[f"leaf{i}"] = dep + bs
        aux_ce = torch.zeros((), device=outs.device)
        if cfg.aux_weight > 0:  # local likelihood: readout CE at boundaries 1..M-1
            aux_ce = tree.readout_ce_many(list(range(1, m)), outs[:-1], targets)
            loss = loss + cfg.aux_weight * (m - 1) * aux_ce
        # shortcuts: distillation onto the span's last leaf output (+ readout CE)
        nodes = list(sc_out)
        sc = torch.stack([sc_out[v] for v in nodes])
        sc_bound = [(k + 1) << lv for lv, k in nodes]
        target = torch.stack([leaf_out[b - 1] for b in sc_bound]).detach()
        # relative squared error: scale-free, so growing residual streams (LMs) do not let the shortcuts'
        # gradients swamp the blocks' under the loop's global gradient clipping
        mse = (sc - target).float().pow(2).flatten(1).mean(1) / (target.float().pow(2).flatten(1).mean(1) + 1e-6)
        loss = loss + cfg.shortcut_weight * mse.sum()
        if cfg.shortcut_aux_weight > 0:
            loss = loss + cfg.shortcut_aux_weight * len(nodes) * tree.readout_ce_many(sc_bound, sc, targets)
        for (lv, k), b in zip(nodes, sc_bound, strict=True):
            depth[f"node{lv}.{k}"] = max(sc_in_depth[(lv, k)] + sl, ld[b - 1]) + sl
        loss.backward()

        critical = max(depth.values())
        return StepStats(
            loss=float(final.detach()),
            tokens=targets.numel(),
            extra={
                "critical_path": float(critical),
                "aux_ce_mean": float(aux_ce.detach()),
                "shortcut_mse_mean": float(mse.detach().mean()),
            },
        )


# ------------------------------------------------------------------------------------ flat block-local
@dataclass
class FlatBLLConfig:
    block_size: int = 1  # layers per block


class FlatBlockLocal(Method):
    """Baseline: blocks in sequence, inputs detached, each block trained by its own readout CE (no tree,
    no top-down message). Critical path N forward + block_size backward; the value of the hierarchy is
    HBLL measured against this."""

    name = "flat_bll"
    Config = FlatBLLConfig
    uses_autograd_step = False

    def prepare(self, model: nn.Module) -> nn.Module:
        if isinstance(model, FlatTree):
            return model
        return FlatTree(model, self.config.block_size)

    def eval_loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(inputs, targets)

    def step(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> StepStats:
        z = model.model.embed(inputs)
        terms, n = [], len(model.leaves)
        for i, leaf in enumerate(model.leaves):
            out = leaf(z)
            if i + 1 < n:
                terms.append(model.aux[i].ce(out, targets))
            else:
                final = model.model.loss(model.model.norm(out), targets)
                terms.append(final)
            z = out.detach()
        torch.stack(terms).sum().backward()
        return StepStats(
            loss=float(final.detach()), tokens=targets.numel(),
            extra={"critical_path": float(len(model.model.blocks) + model.block_size)},
        )


class FlatTree(nn.Module):
    def __init__(self, model: nn.Module, block_size: int) -> None:
        super().__init__()
        n = len(model.blocks)
        if block_size < 1 or n % block_size:
            raise ConfigError(f"block_size={block_size} must be >= 1 and divide the {n} layers")
        self.model, self.block_size = model, block_size
        self.leaves = [nn.Sequential(*model.blocks[i : i + block_size]) for i in range(0, n, block_size)]
        own = model.head.out_features <= 1024
        self.aux = nn.ModuleList(AuxHead(model, own) for _ in range(len(self.leaves) - 1))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(inputs, targets)


def count_exact_critical_path(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Sequential layer evaluations of one exact-backprop step, counted with forward and backward hooks on
    the residual blocks (every one of them is on the single dependency chain)."""
    count = [0]

    def bump(*_args):
        count[0] += 1

    handles = []
    for block in model.blocks:
        handles.append(block.register_forward_hook(bump))
        handles.append(block.register_full_backward_hook(bump))
    try:
        loss = loss_fn(model, inputs, targets) if loss_fn else model(inputs, targets)
        loss.backward()
    finally:
        for hnd in handles:
            hnd.remove()
    return count[0]
