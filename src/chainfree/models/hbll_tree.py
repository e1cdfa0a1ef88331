"""HBLLTree: a chain model wrapped into HBLL's tree of leaf blocks, shortcuts and boundary readouts.

The training step that uses it is chainfree.methods.hbll (the derivation is in its docstring and in
docs/hbll.md); this module holds the structure: which modules exist, how same-round members are stored
(one stacked parameter per tensor, `chainfree.nn.stacked.StackedParams`) and evaluated as one call
(`HBLLTree.apply`), the readout losses, and inference along the chain, the tree path or a sub-network.

A "chain model" has `.embed` (stem), `.blocks` (residual layers x -> x, same shape), `.norm` (LayerNorm),
`.head` (nn.Linear) and `.loss(h, targets)` (mean CE of normalised hidden states): the LanguageModel and
chainfree.models.vision.VisionNet both do. FlatTree is the same model cut into blocks for the flat
block-local baseline (no tree). TimeTree is the same idea over time: a tree over the chunks of a sequence
read by a recurrent model (chainfree.models.char_rnn.CharGRU).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from chainfree.errors import ConfigError
from chainfree.nn.stacked import StackedParams, stacked_apply
from chainfree.ops.cross_entropy import linear_cross_entropy


class TreeSpec(Protocol):
    """The tree's shape and execution settings (chainfree.methods.hbll.HBLLConfig provides them)."""

    block_size: int
    shortcut_layers: int
    aux_head: str
    parallel: str
    eval_path: str


def readout_ce(z: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor,
               bias: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of a norm + linear readout; token-shaped inputs use the chunked fused loss (no full logits)."""
    h = norm(z)
    if h.dim() == 3:
        return linear_cross_entropy(h, weight, bias, targets)
    return F.cross_entropy(F.linear(h, weight, bias).float(), targets)


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


class HBLLTree(nn.Module):
    """The model plus the tree's shortcuts and readouts. Forward = inference of the trained model."""

    def __init__(self, model: nn.Module, cfg: TreeSpec) -> None:
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
        self.partition: Any = None  # set by chainfree.parallel.hbll_tree.partitioned: this rank's share of each round

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
            return linear_cross_entropy(h, head.weight.detach(), hb, rep, keep_logit_grad=True)
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

    def generation_model(self) -> nn.Module:
        """The model `chainfree generate` samples from: the trained chain itself (the wrapped model, whose
        blocks read the stacked weights) for eval_path 'chain'; this tree for 'tree' (no recurrent state:
        sampled by re-running the causal forward, see chainfree.generate)."""
        return self.model if self.cfg.eval_path == "chain" else self

    @property
    def max_context(self) -> int:
        """Longest sequence the forward accepts (model.seq_len of a language model; 0 = no limit)."""
        return getattr(getattr(self.model, "cfg", None), "seq_len", 0)


def _frozen(norm: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's final LayerNorm with detached parameters: a readout that trains nothing of the model."""
    if not isinstance(norm, nn.LayerNorm):
        raise ConfigError(f"HBLL expects the model's final norm to be nn.LayerNorm, got {type(norm).__name__}")

    def apply(z: torch.Tensor) -> torch.Tensor:
        w = norm.weight.detach() if norm.weight is not None else None
        b = norm.bias.detach() if norm.bias is not None else None
        return F.layer_norm(z, norm.normalized_shape, w, b, norm.eps)

    return apply


class FlatTree(nn.Module):
    """The model cut into blocks of `block_size` layers, each block with a readout (but the last, which
    uses the model's head): the flat block-local baseline's structure. Forward = the plain model."""

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

    def generation_model(self) -> nn.Module:
        """The model `chainfree generate` samples from: the wrapped model itself."""
        return self.model


# --------------------------------------------------------------------------------------- tree over time
class TimeSpec(Protocol):
    """The time tree's settings (chainfree.methods.hbll_rnn.TimeTreeConfig provides them)."""

    chunk: int
    window: int
    shortcut_weight: float


class TimeTree(nn.Module):
    """A CharGRU plus one shortcut GRU per tree node over time chunks."""

    def __init__(self, model: nn.Module, cfg: TimeSpec, seq_len: int) -> None:
        super().__init__()
        if seq_len % cfg.chunk:
            raise ConfigError(f"seq_len={seq_len} must be a multiple of chunk={cfg.chunk}")
        k = seq_len // cfg.chunk
        if k < 2 or k & (k - 1):
            raise ConfigError(f"seq_len / chunk = {k} must be a power of two >= 2; change chunk or seq_len")
        if not 1 <= cfg.window <= cfg.chunk:
            raise ConfigError(f"window={cfg.window} must be in [1, chunk={cfg.chunk}]")
        self.model, self.cfg, self.n_chunks, self.levels = model, cfg, k, int(math.log2(k))
        self.nodes = [(lv, j) for lv in range(self.levels) for j in range(0, k >> lv, 2)]  # left children
        self.index = {node: i for i, node in enumerate(self.nodes)}
        self.shortcuts = nn.ModuleList(nn.GRU(model.d, model.d, batch_first=True) for _ in self.nodes)
        for sc in self.shortcuts:
            sc.load_state_dict(model.gru.state_dict())

    def generation_model(self) -> nn.Module:
        """The model `chainfree generate` samples from: the recurrent model itself (the tree only trains)."""
        return self.model

    def shortcut(self, node: tuple[int, int], h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """End state of node's span from start state h, reading the span's last `window` characters."""
        lv, j = node
        c, w = self.cfg.chunk, self.cfg.window
        end = (j + 1) * (c << lv)
        x = self.model.embed(ids[:, end - w : end]).detach()  # the embedding trains through the leaves
        _, hn = self.shortcuts[self.index[node]](x, h.unsqueeze(0).contiguous())
        return hn.squeeze(0)

    def start_states(self, ids: torch.Tensor) -> tuple[list[torch.Tensor], dict, int]:
        """m_b for every chunk by binary decomposition; returns (states, shortcut outputs, depth)."""
        B, k = ids.shape[0], self.n_chunks
        m: list[torch.Tensor | None] = [ids.new_zeros(B, self.model.d, dtype=torch.float32)] + [None] * (k - 1)
        m[0] = m[0].to(self.model.head.weight.dtype)
        outs = {}
        depth = 0
        for lv in range(self.levels - 1, -1, -1):
            for j in range(0, k >> lv, 2):
                out = self.shortcut((lv, j), m[j << lv], ids)
                outs[(lv, j)] = out
                m[(j + 1) << lv] = out.detach()
            depth += self.cfg.window
        return m, outs, depth  # type: ignore[return-value]

    def step(self, ids: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        c, k, B = self.cfg.chunk, self.n_chunks, ids.shape[0]
        m, sc_out, prefix_depth = self.start_states(ids)
        # all leaves at once: K chunks x B sequences as one batch of independent sequences
        x = ids.reshape(B, k, c).transpose(0, 1).reshape(k * B, c)
        y = targets.reshape(B, k, c).transpose(0, 1).reshape(k * B, c)
        h0 = torch.stack(m).reshape(k * B, -1)
        out, hn = self.model.run(x, h0)
        leaf_ce = self.model.ce(out, y)
        end = hn.reshape(k, B, -1)
        distill = sum(
            (sc - end[((j + 1) << lv) - 1].detach()).pow(2).mean() for (lv, j), sc in sc_out.items()
        ) / max(len(sc_out), 1)
        (leaf_ce + self.cfg.shortcut_weight * distill).backward()
        critical = prefix_depth + c + max(c, self.cfg.window)
        return {"loss": float(leaf_ce.detach()), "critical_path": float(critical),
                "shortcut_mse": float(distill.detach())}
