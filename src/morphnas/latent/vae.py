"""The graph VAE that E2NAS searches in: D-VAE (Zhang et al. 2019) on a ``ChoiceTable``.

Spec: methods.md §3 and anchors-2.md §1.1. A genotype is an ops-on-nodes DAG: node ``i`` applies
op ``c`` to the states its α row ``r`` names. The encoder walks the nodes in topological (index)
order, each node's state a GRU update from its op and the gated sum of the states it reads; the
decoder regenerates the nodes in the same order, each as ``p(op) · p(row | op)``, so that its
per-node distribution has exactly the shape of that node's α and E2NAS can use it as relaxed
mixing weights whose gradient reaches ``z`` through the decoder (the [INFERRED] faithful version
of methods.md §3a).

Our reading where D-VAE's NAS-Bench-201 code does not transfer:

* The node *type* is the op column and the *edges* are the row's inputs; D-VAE's edge scoring
  (an MLP of the new vertex's state and each earlier vertex's state) becomes a score per row from
  the query state, the op's embedding and the decoder states of the states the row reads (one per
  input slot, so the ordered pairs of two_input stay ordered).
* The states below node 1 (``s0``; ``c``, ``u``, ``h``) are learned embeddings, indexed by state
  number, so the same modules serve every node count; node positions get a learned embedding
  (D-VAE's ``vid`` one-hot) up to ``MAX_NODES``.
* Graph state = a gated sum over *all* node states (not the last node's, D-VAE's END vertex):
  in these cells a node need not be read by any later node (darts_rnn averages all nodes, and
  two_input ``search`` may leave nodes dangling), so the last node's state would not see them.
* Unidirectional: the gated readout over all nodes already gives every node a direct path to
  ``z``, which is what the backward pass buys D-VAE.

Modules are shared across nodes; shapes and allowed entries come from the table, so a VAE is
trained per table (space, node count, options) and is tied to it by ``table.key``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from morphnas.genotype import CELL_STATE, MAX_NODES
from morphnas.latent.codes import ChoiceTable

NEG = -1e9  # a logit for an entry that cannot be chosen (exp underflows to exactly 0)


@dataclass(frozen=True)
class TrainConfig:
    """How ``train_vae`` trains; defaults measured to reach the acceptance quickly on CPU.

    ``beta`` and ``eps_scale`` are the authors' (β_KL = 0.005, reparameterisation noise ε·0.01);
    the optimiser is faster than their Adam 1e-4 × 100 epochs because our data is unlimited
    (fresh random genotypes each step) and training must finish within a search's start-up:
    Adam 5e-3 with a cosine decay to lr/20 over ``max_steps`` and a gradient-norm clip (1e-2
    did not learn at all on 8-node darts_rnn; 2e-3 took twice the steps). ``threads`` = 1:
    the per-node loop is many small ops, and on 2 busy cores one thread ran a step ~10× faster
    than two. Training always runs on the CPU.
    """

    beta: float = 0.005
    eps_scale: float = 0.01
    lr: float = 5e-3
    batch: int = 128
    max_steps: int = 4000
    eval_every: int = 250
    target: float = 0.995  # held-out exact reconstruction at which training stops
    heldout: int = 1000
    threads: int = 1
    clip: float = 5.0  # gradient-norm clip: a higher learning rate stays stable


class _NodeLayout(nn.Module):
    """Node ``i``'s α viewed as ``(rows, columns)``: which states each row reads, which
    (column, row) cells are allowed, and each table position's (column, row). Buffers only."""

    def __init__(self, table: ChoiceTable, i: int) -> None:
        super().__init__()
        columns, first = table.columns(), table.first_state
        rows = math.prod(table.shapes[i]) // columns
        reads = torch.zeros(rows, table.arity, dtype=torch.long)
        allowed = torch.zeros(columns, rows, dtype=torch.bool)
        pos_col = torch.tensor([e % columns for e in table.entries[i]])
        pos_row = torch.tensor([e // columns for e in table.entries[i]])
        for e, node in zip(table.entries[i], table.nodes_of[i], strict=True):
            reads[e // columns] = torch.tensor([s - first for s in node.inputs])
            allowed[e % columns, e // columns] = True
        self.rows = rows
        self.register_buffer("reads", reads, persistent=False)
        self.register_buffer("allowed", allowed, persistent=False)
        self.register_buffer("op_allowed", allowed.any(1), persistent=False)
        self.register_buffer("pos_col", pos_col, persistent=False)
        self.register_buffer("pos_row", pos_row, persistent=False)
        self.register_buffer("entries", torch.tensor(table.entries[i]), persistent=False)


class GraphVae(nn.Module):
    """D-VAE encoder/decoder over one ``ChoiceTable`` (see the module docstring)."""

    def __init__(self, table: ChoiceTable, *, nz: int = 16, hs: int = 64) -> None:
        super().__init__()
        if table.nodes > MAX_NODES:
            raise ValueError(f"{table.nodes} nodes; the VAE embeds at most {MAX_NODES}")
        self.table, self.nz, self.hs = table, nz, hs
        columns, arity = table.columns(), table.arity
        self.layouts = nn.ModuleList(_NodeLayout(table, i) for i in range(table.nodes))
        # States below node 1, by number -2 (c), -1 (u), 0 (h / s0): rows 0, 1, 2.
        self.pre_states = list(range(table.first_state, 1))
        # Encoder.
        self.enc_op = nn.Embedding(columns, hs)
        self.enc_pos = nn.Embedding(MAX_NODES + 1, hs)
        self.enc_pre = nn.Embedding(1 - CELL_STATE, hs)
        self.enc_sid = nn.Embedding(MAX_NODES + 1 - CELL_STATE, hs)
        self.enc_gate = nn.ModuleList(nn.Linear(hs, hs) for _ in range(arity))
        self.enc_map = nn.ModuleList(nn.Linear(hs, hs, bias=False) for _ in range(arity))
        self.enc_gru = nn.GRUCell(hs, hs)
        self.read_gate = nn.Linear(hs, hs)
        self.read_map = nn.Linear(hs, hs, bias=False)
        self.fc_mu = nn.Linear(hs, nz)
        self.fc_logvar = nn.Linear(hs, nz)
        # Decoder.
        self.fc_z = nn.Linear(nz, hs)
        self.fc_zq = nn.Linear(nz, hs)
        self.dec_op = nn.Embedding(columns, hs)
        self.dec_pos = nn.Embedding(MAX_NODES + 1, hs)
        self.dec_query = nn.Embedding(MAX_NODES + 1, hs)
        self.dec_pre = nn.Embedding(1 - CELL_STATE, hs)
        self.dec_sid = nn.Embedding(MAX_NODES + 1 - CELL_STATE, hs)
        self.dec_slot = nn.ModuleList(nn.Linear(hs, hs, bias=False) for _ in range(arity))
        self.dec_gru = nn.GRUCell(hs, hs)
        self.op_mlp = nn.Sequential(nn.Linear(hs, 2 * hs), nn.ReLU(), nn.Linear(2 * hs, columns))
        self.edge_query = nn.Linear(hs, hs)
        self.edge_op = nn.Embedding(columns, hs)
        self.edge_slot = nn.ModuleList(nn.Linear(hs, hs, bias=False) for _ in range(arity))
        self.edge_out = nn.Sequential(nn.ReLU(), nn.Linear(hs, 1))

    # ---- encoder -------------------------------------------------------------------------------

    def encode(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, nodes]`` positions into ``table.entries`` -> ``(mu, logvar)``, each ``[B, nz]``."""
        batch = positions.shape[0]
        pre = torch.tensor([s - CELL_STATE for s in self.pre_states], device=positions.device)
        states = self.enc_pre(pre).unsqueeze(0).expand(batch, -1, -1)
        nodes = []
        for i, layout in enumerate(self.layouts):
            col, row = layout.pos_col[positions[:, i]], layout.pos_row[positions[:, i]]
            reads = self._gather(self._with_ids(states, self.enc_sid), layout.reads[row])
            message = sum(
                torch.sigmoid(gate(s)) * mapped(s)
                for gate, mapped, s in zip(self.enc_gate, self.enc_map, reads, strict=True)
            )
            x = self.enc_op(col) + self.enc_pos.weight[i + 1]
            h = self.enc_gru(x, message)
            nodes.append(h)
            states = torch.cat([states, h.unsqueeze(1)], 1)
        stack = torch.stack(nodes, 1)
        graph = (torch.sigmoid(self.read_gate(stack)) * self.read_map(stack)).sum(1)
        return self.fc_mu(graph), self.fc_logvar(graph)

    @staticmethod
    def _with_ids(states: Tensor, ids: nn.Embedding) -> Tensor:
        """States ``[B, S, hs]`` plus a learned embedding of their position (D-VAE's ``vid``
        one-hot on each predecessor's state): which state a node reads becomes explicit,
        not something to infer from the state's content."""
        return states + ids.weight[: states.shape[1]]

    @staticmethod
    def _gather(states: Tensor, reads: Tensor) -> list[Tensor]:
        """Per input slot, each sample's state ``[B, hs]``: ``reads`` is ``[B, arity]``."""
        index = reads.unsqueeze(-1).expand(-1, -1, states.shape[-1])
        picked = states.gather(1, index)
        return list(picked.unbind(1))

    # ---- decoder -------------------------------------------------------------------------------

    def _start(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The initial hidden state, the decoder states of the states below node 1, and the
        code's direct term in every node's query.

        Our reading, beyond D-VAE (whose decoder sees z only through the initial state): every
        node's query also gets a projection of ``z``, a skip path that lets a late node read its
        choice from the code without it surviving every GRU update (measured: 4-node
        ``wiring: search`` reached 99.5 % in 1,750 steps instead of 2,250)."""
        h = torch.tanh(self.fc_z(z))
        pre = torch.tensor([s - CELL_STATE for s in self.pre_states], device=z.device)
        states = self.dec_pre(pre).unsqueeze(0).expand(z.shape[0], -1, -1)
        return h, states, self.fc_zq(z)

    def _op_logits(self, i: int, h: Tensor, zq: Tensor) -> tuple[Tensor, Tensor]:
        """Node ``i``'s query state and its op logits ``[B, C]`` (disallowed ops at ``NEG``)."""
        query = h + zq + self.dec_query.weight[i + 1]
        logits = self.op_mlp(query).masked_fill(~self.layouts[i].op_allowed, NEG)
        return query, logits

    def _row_features(self, i: int, states: Tensor) -> Tensor:
        """The slot part of every row's edge score, ``[B, R, hs]``: each slot's projection of
        the states (``[B, S, hs]``, S ≤ nodes + 3) gathered by row, projecting before gathering
        since rows (pairs of states) far outnumber states."""
        reads = self.layouts[i].reads  # [R, arity]
        states = self._with_ids(states, self.dec_sid)
        projected = [slot(states)[:, reads[:, t]] for t, slot in enumerate(self.edge_slot)]
        return torch.stack(projected).sum(0)

    def _absorb(self, i: int, h: Tensor, states: Tensor, col: Tensor, row: Tensor) -> Tensor:
        """The hidden state after node ``i`` chose ``(col, row)``: also that node's state."""
        reads = self._gather(self._with_ids(states, self.dec_sid), self.layouts[i].reads[row])
        x = self.dec_op(col) + self.dec_pos.weight[i + 1]
        for slot, s in zip(self.dec_slot, reads, strict=True):
            x = x + slot(s)
        return self.dec_gru(x, h)

    def log_likelihood(self, z: Tensor, positions: Tensor) -> Tensor:
        """Teacher-forced ``log p(positions | z)``, ``[B]``: per node ``log p(op) + log p(row |
        op)``, every node conditioned on the true earlier choices."""
        h, states, zq = self._start(z)
        total = z.new_zeros(z.shape[0])
        for i, layout in enumerate(self.layouts):
            col, row = layout.pos_col[positions[:, i]], layout.pos_row[positions[:, i]]
            query, op_logits = self._op_logits(i, h, zq)
            total = total + F.log_softmax(op_logits, -1).gather(1, col[:, None]).squeeze(1)
            if layout.rows > 1:
                pre = self.edge_query(query) + self.edge_op(col)  # [B, hs]
                scores = self.edge_out(pre[:, None] + self._row_features(i, states)).squeeze(-1)
                scores = scores.masked_fill(~layout.allowed[col], NEG)
                total = total + F.log_softmax(scores, -1).gather(1, row[:, None]).squeeze(1)
            h = self._absorb(i, h, states, col, row)
            states = torch.cat([states, h.unsqueeze(1)], 1)
        return total

    def _joint(self, i: int, h: Tensor, states: Tensor, zq: Tensor) -> Tensor:
        """Node ``i``'s joint ``p(op) p(row | op)`` over its α, ``[B, R * C]`` in α's flat order
        (row-major, op last), 0 on every disallowed entry."""
        layout = self.layouts[i]
        query, op_logits = self._op_logits(i, h, zq)
        log_op = F.log_softmax(op_logits, -1)  # [B, C]
        if layout.rows > 1:
            pre = self.edge_query(query)[:, None] + self.edge_op.weight[None]  # [B, C, hs]
            rows = self._row_features(i, states)  # [B, R, hs]
            scores = self.edge_out(pre[:, :, None] + rows[:, None]).squeeze(-1)  # [B, C, R]
            scores = scores.masked_fill(~layout.allowed, NEG)
            log_joint = log_op[:, :, None] + F.log_softmax(scores, -1)
        else:
            log_joint = log_op[:, :, None]
        log_joint = log_joint.masked_fill(~layout.allowed, -math.inf)
        return log_joint.exp().transpose(1, 2).reshape(h.shape[0], -1)

    def _decode_batch(
        self, z: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> tuple[list[Tensor], Tensor]:
        """Ancestral decoding of ``[B, nz]``: per node the joint ``[B, R * C]`` and the chosen
        flat entries ``[B, nodes]`` (argmax, or a draw when ``sample``)."""
        h, states, zq = self._start(z)
        probs, chosen = [], []
        columns = self.table.columns()
        for i in range(len(self.layouts)):
            joint = self._joint(i, h, states, zq)
            if sample:
                flat = torch.multinomial(joint.detach(), 1, generator=generator).squeeze(1)
            else:
                flat = joint.detach().argmax(-1)
            probs.append(joint)
            chosen.append(flat)
            h = self._absorb(i, h, states, flat % columns, flat // columns)
            states = torch.cat([states, h.unsqueeze(1)], 1)
        return probs, torch.stack(chosen, 1)

    def node_probs(
        self, z: Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> tuple[list[Tensor], list[int]]:
        """Decode one code ``z`` (``[nz]``) node by node, each node conditioned on the choices
        already made (argmax, or a draw from the node's distribution when ``sample``).

        Returns per node a probability tensor shaped like that node's α (``table.shapes[i]``),
        0 on every ``none``/disallowed entry, summing to 1 and differentiable w.r.t. ``z``; and
        the chosen flat entry per node.
        """
        probs, chosen = self._decode_batch(z.reshape(1, -1), sample=sample, generator=generator)
        shaped = [p.reshape(shape) for p, shape in zip(probs, self.table.shapes, strict=True)]
        return shaped, [int(e) for e in chosen[0]]

    @torch.no_grad()
    def decode(self, z: Tensor) -> list[int]:
        """The argmax flat entry per node of one code ``z`` (deterministic)."""
        return [int(e) for e in self._decode_batch(z.reshape(1, -1))[1][0]]

    @torch.no_grad()
    def decode_many(self, z: Tensor, chunk: int = 500) -> Tensor:
        """Argmax flat entries ``[B, nodes]`` of ``[B, nz]`` codes, in chunks (memory)."""
        return torch.cat([self._decode_batch(part)[1] for part in z.split(chunk)])

    def flat_entries(self, positions: Tensor) -> Tensor:
        """Positions ``[B, nodes]`` -> flat entries ``[B, nodes]``."""
        return torch.stack(
            [layout.entries[positions[:, i]] for i, layout in enumerate(self.layouts)], 1
        )

    @torch.no_grad()
    def reconstruction(self, positions: Tensor) -> float:
        """The fraction of genotypes that ``decode(mu(encode(g)))`` gives back exactly."""
        mu = torch.cat([self.encode(part)[0] for part in positions.split(500)])
        return float((self.decode_many(mu) == self.flat_entries(positions)).all(1).float().mean())


# ---- training ------------------------------------------------------------------------------------


def suggested_nz(table: ChoiceTable) -> int:
    """A latent size for ``table``: about one dimension per bit of the table's size, at least 16,
    rounded up to a multiple of 8.

    Measured, not from the paper (the authors fix nz = 30 for NAS-Bench-201's 14 bits): nz = 16
    reaches 99.5 % held-out reconstruction quickly up to ~30 bits (8-node darts_rnn, 31 bits,
    in ~2,000 steps) but 8-node two_input ``wiring: search`` (56 bits) was at 16 % after
    3,750 steps with nz = 16 and at 82 % with nz = 48; a denser code is slower to learn.
    """
    bits = math.log2(table.size)
    return max(16, 8 * math.ceil(bits / 8))


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` per sample."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)


def heldout_set(table: ChoiceTable, count: int, generator: torch.Generator) -> tuple[Tensor, bool]:
    """The genotypes reconstruction is measured on, and whether they are held out of training.

    Our reading: a table of at most ``2 * count`` genotypes is small enough to learn whole, so
    the figure is over every genotype of it (nothing held out); otherwise ``count`` distinct
    random genotypes that training never sees.
    """
    if table.size <= 2 * count:
        return table.enumerate_all(), False
    seen: set[tuple[int, ...]] = set()
    rows = []
    while len(rows) < count:
        for row in table.sample(count, generator).tolist():
            if tuple(row) not in seen and len(rows) < count:
                seen.add(tuple(row))
                rows.append(row)
    return torch.tensor(rows, dtype=torch.long), True


def heldout_positions(table: ChoiceTable, seed: int, count: int = 1000) -> tuple[Tensor, bool]:
    """``heldout_set`` as ``train_vae(seed=seed)`` draws it (its own generator, not the
    training data's), so a test can measure the same genotypes."""
    return heldout_set(table, count, torch.Generator().manual_seed(seed + 7919))


def _training_batch(
    table: ChoiceTable, batch: int, generator: torch.Generator, excluded: set[tuple[int, ...]]
) -> Tensor:
    """Uniform random genotypes, none of them held out."""
    drawn = table.sample(batch, generator)
    if not excluded:
        return drawn
    keep = [row for row in drawn.tolist() if tuple(row) not in excluded]
    return torch.tensor(keep, dtype=torch.long).reshape(-1, table.nodes)


def train_vae(
    table: ChoiceTable,
    *,
    nz: int = 16,
    hs: int = 64,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    config: TrainConfig | None = None,
) -> tuple[GraphVae, dict]:
    """Train a VAE on ``table`` until held-out exact reconstruction reaches ``config.target`` or
    ``config.max_steps`` run out; deterministic under ``seed`` (the global RNG and thread count
    are restored afterwards). ``progress(step, max_steps, accuracy)`` is called at each check.

    Returns the frozen VAE (eval mode, no gradients) and ``{"accuracy", "seconds", "steps",
    "heldout", "evaluated"}``.
    """
    cfg = config or TrainConfig()
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        torch.set_num_threads(max(1, min(threads, cfg.threads)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = GraphVae(table, nz=nz, hs=hs)
            info = _fit(vae, table, cfg, seed, progress)
    finally:
        torch.set_num_threads(threads)
    info["seconds"] = time.perf_counter() - start
    freeze(vae)
    return vae, info


def _fit(
    vae: GraphVae,
    table: ChoiceTable,
    cfg: TrainConfig,
    seed: int,
    progress: Callable[[int, int, float], None] | None,
) -> dict:
    """The training loop of ``train_vae`` (global RNG already seeded)."""
    data = torch.Generator().manual_seed(seed)
    heldout, held = heldout_positions(table, seed, cfg.heldout)
    excluded = {tuple(row) for row in heldout.tolist()} if held else set()
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.max_steps, cfg.lr / 20)
    accuracy, step = 0.0, 0
    for step in range(1, cfg.max_steps + 1):
        positions = _training_batch(table, cfg.batch, data, excluded)
        mu, logvar = vae.encode(positions)
        noise = torch.randn(mu.shape, generator=data) * cfg.eps_scale
        z = mu + noise * (0.5 * logvar).exp()
        nll = -vae.log_likelihood(z, positions).mean()
        loss = nll + cfg.beta * kl_divergence(mu, logvar).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), cfg.clip)
        optimizer.step()
        schedule.step()
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            vae.eval()
            accuracy = vae.reconstruction(heldout)
            vae.train()
            if progress is not None:
                progress(step, cfg.max_steps, accuracy)
            if accuracy >= cfg.target:
                break
    return {"accuracy": accuracy, "steps": step, "heldout": held, "evaluated": len(heldout)}


def freeze(vae: GraphVae) -> GraphVae:
    """Eval mode and no gradients for the weights: E2NAS differentiates through it w.r.t. z
    only."""
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae
