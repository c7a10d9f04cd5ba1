"""How token sequences become one forward pass: padded rows, or rows of a prefix tree.

Training and choice scoring both run a set of token sequences through the model and read the
next-token log-probability of some of their tokens (the *targets*): answer tokens in training,
choice tokens in scoring. A layout puts the sequences into rows and says, for every target,
at which ``(row, column)`` its logits are read.

- ``padded_layout``: one sequence per row, right-padded, the usual 2-D attention mask.
- ``shared_prefix_layout``: the tokens all sequences start with run once; each sequence's rest is
  a padded row continuing from their cached keys and values.
- ``tree_layout``: the sequences are merged into a prefix tree (a trie) and its nodes laid out in
  rows, each token attending to its ancestors only, with its depth as position id. Tokens that
  several sequences share at the start (the chat template's header, the system prompt, the
  instruction, an item's prompt before its choices) are computed once. With
  ``share_prefixes=False`` it is plain sequence packing: several sequences per row, positions
  restarted, attention kept inside each. No padding is computed either way, except to even out
  the rows of one forward pass.

Every token sees exactly the tokens it would see alone and has the same position id, so the
logits are those of the padded layout up to floating-point rounding (tests check this).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cl_runner.forward import base_model, forward_selected, is_prompt_learning, virtual_prefix_kind

LAYOUTS = ("auto", "padded", "shared_prefix", "packed", "prefix_tree")  # the names build_layout takes
TREE_ATTENTION = ("sdpa", "eager")  # implementations that take a custom 4-D mask


@dataclass
class Layout:
    """Model inputs for a set of sequences, and where each target is read."""

    input_ids: torch.Tensor  # [rows, width]
    model_inputs: dict[str, torch.Tensor]  # attention_mask (2-D or 4-D), position_ids, prefix_ids (shared prefix)
    read_rows: torch.Tensor  # [targets]: the logits predicting target n sit at (read_rows[n], read_cols[n])
    read_cols: torch.Tensor
    targets: torch.Tensor  # [targets] token ids
    owners: torch.Tensor  # [targets] index of the sequence each target belongs to

    def to(self, device) -> Layout:
        moved = {k: v.to(device) for k, v in self.model_inputs.items()}
        return Layout(self.input_ids.to(device), moved, self.read_rows.to(device), self.read_cols.to(device), self.targets.to(device), self.owners.to(device))


NON_ATTENTION_HINTS = ("mamba", "conv", "linear", "recurrent", "ssm", "rwkv")  # layer kinds that read the whole row in order
_verified: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unsupported_by_config(model, longest: int) -> bool:
    config = model.config
    if (is_prompt_learning(model) and virtual_prefix_kind(model) is None) or getattr(config, "_attn_implementation", None) not in TREE_ATTENTION:
        return True
    if getattr(config, "output_router_logits", False) or _has_non_attention_layers(config):
        return True
    window = getattr(config, "sliding_window", None)
    if window is not None and longest > window:
        return True
    return "position_ids" not in inspect.signature(base_model(model).forward).parameters


def takes_custom_layouts(model, longest: int = 0) -> bool:
    """Whether the configuration allows explicit position ids, custom masks and a KV cache the rows continue."""
    return not _unsupported_by_config(model, longest)


def supports_shared_prefix(model, longest: int = 0) -> bool:
    """Whether a prefix can run once and rows continue it from its cached keys and values (checked like the tree)."""
    # Checkpointed layers drop the cache in training, and the rows would lose their prefix.
    if _unsupported_by_config(model, longest) or getattr(base_model(model), "is_gradient_checkpointing", False):
        return False
    return _verified_once(model, "shared_prefix", lambda seqs, targets: shared_prefix_layout(seqs, targets, 0), first_target=4)


def supports_tree_layout(model, longest: int = 0) -> bool:
    """Whether ``model``'s forward honours a custom 4-D mask and explicit position ids.

    Not for PEFT prompt learning other than prompt tuning, P-tuning and prefix tuning (their
    virtual tokens run once as a KV cache that every row continues), attention kernels
    without custom masks, models without ``position_ids`` (ALiBi), layers that are not
    attention (Mamba, short convolutions: they see the whole row), MoE router losses (counted
    over the row), or sequences longer than a sliding window (a custom mask replaces the
    window's). What the configuration cannot tell is checked once per model: a small prefix
    tree must give the padded layout's logits.
    """
    if _unsupported_by_config(model, longest):
        return False
    return _verified_once(model, "tree", lambda seqs, targets: tree_layout(model, seqs, targets, 0, capacity=64, share_prefixes=True), first_target=1)


def _verified_once(model, kind: str, build, first_target: int) -> bool:
    verdicts = _verified.setdefault(base_model(model), {})
    key = (kind, virtual_prefix_kind(model))  # virtual tokens run through another path: verified on their own
    if key not in verdicts:
        verdicts[key] = _matches_padded(model, build, first_target)
    return verdicts[key]


def _has_non_attention_layers(config) -> bool:
    kinds = []
    for key in ("layer_types", "layers_block_type", "hybrid_override_pattern", "block_types"):
        value = getattr(config, key, None)
        kinds += [str(v).lower() for v in value] if isinstance(value, (list, tuple)) else [str(value).lower()] if value else []
    return any(hint in kind for kind in kinds for hint in NON_ATTENTION_HINTS) or getattr(config, "attn_layer_indices", None) is not None


@torch.no_grad()
def _matches_padded(model, build, first_target: int) -> bool:
    """Run two sequences sharing a prefix padded and in the layout ``build`` makes; use the layout only if the logits agree.

    The logits are compared from ``first_target - 1`` on (a shared prefix is never read; a tree is read everywhere).
    """
    sequences = [[11, 12, 13, 14, 15, 16], [11, 12, 13, 17, 18]]
    targets = [range(first_target, len(s)) for s in sequences]
    was_training = model.training
    model.eval()
    try:
        device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
        results = []
        for laid in (padded_layout(sequences, targets, 0), build(sequences, targets)):
            laid = laid.to(device)
            results.append(forward_selected(model, laid.input_ids, laid.read_rows, laid.read_cols, **laid.model_inputs).logits.float())
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2  # rounding only; a leak across branches is larger
        return bool((results[0] - results[1]).abs().max() <= tolerance * results[0].abs().max() + 1e-6)
    except Exception:  # noqa: BLE001 - a model that cannot take the layout at all is simply not given it
        return False
    finally:
        model.train(was_training)


def _read_spec(columns: Sequence[Sequence[int]], rows: Sequence[int], sequences, target_positions) -> tuple[torch.Tensor, ...]:
    """Target ``i`` of sequence ``s`` is predicted by the logits at the column of token ``i - 1``."""
    read_rows, read_cols, targets, owners = [], [], [], []
    for s, positions in enumerate(target_positions):
        for i in positions:
            read_rows.append(rows[s])
            read_cols.append(columns[s][i - 1])
            targets.append(sequences[s][i])
            owners.append(s)
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return as_long(read_rows), as_long(read_cols), as_long(targets), as_long(owners)


def pad_right(sequences: Sequence[Sequence[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token sequences into one tensor; also return the attention mask (1 = real token)."""
    width = max(len(s) for s in sequences)
    padded = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        padded[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return padded, mask


def padded_layout(sequences: Sequence[Sequence[int]], target_positions: Sequence[Sequence[int]], pad_id: int) -> Layout:
    """One sequence per row, right-padded."""
    input_ids, attention_mask = pad_right(sequences, pad_id)
    columns = [range(len(s)) for s in sequences]
    spec = _read_spec(columns, list(range(len(sequences))), sequences, target_positions)
    return Layout(input_ids, {"attention_mask": attention_mask}, *spec)


def shared_prefix_layout(sequences: Sequence[Sequence[int]], target_positions: Sequence[Sequence[int]], pad_id: int) -> Layout | None:
    """The tokens every sequence starts with, run once; the rest of each sequence, right-padded, continues them.

    The prefix ends before the token that predicts any target, so every logit that is read
    comes from the rows. None when the sequences share no such prefix.
    """
    shared = 0
    while all(len(s) > shared and s[shared] == sequences[0][shared] for s in sequences):
        shared += 1
    first_read = min((min(positions) - 1 for positions in target_positions if len(positions)), default=shared)
    shared = min(shared, first_read, min(len(s) for s in sequences) - 1)
    if shared < 1:
        return None
    suffix_ids, suffix_mask = pad_right([s[shared:] for s in sequences], pad_id)
    rows, width = suffix_ids.shape
    attention_mask = torch.cat([torch.ones((rows, shared), dtype=torch.long), suffix_mask], dim=1)
    position_ids = torch.arange(shared, shared + width).repeat(rows, 1)
    columns = [[i - shared for i in range(len(s))] for s in sequences]  # only columns >= 0 are read
    spec = _read_spec(columns, list(range(rows)), sequences, target_positions)
    prefix_ids = torch.tensor([list(sequences[0][:shared])], dtype=torch.long)
    return Layout(suffix_ids, {"attention_mask": attention_mask, "position_ids": position_ids, "prefix_ids": prefix_ids}, *spec)


class _TreeRow:
    """One row: a trie of token sequences, nodes numbered in insertion order (a parent before its children)."""

    def __init__(self, share_prefixes: bool):
        self.share = share_prefixes
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self.children: dict[tuple[int, int], int] = {}

    def new_nodes(self, seq: Sequence[int]) -> int:
        """How many nodes adding ``seq`` would create."""
        node, depth = -1, 0
        if self.share:
            while depth < len(seq) and (node, seq[depth]) in self.children:
                node, depth = self.children[(node, seq[depth])], depth + 1
        return len(seq) - depth

    def add(self, seq: Sequence[int]) -> list[int]:
        """Insert ``seq``; return the column of each of its tokens."""
        node, columns = -1, []
        for depth, token in enumerate(seq):
            child = self.children.get((node, token)) if self.share else None
            if child is None:
                child = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(node)
                self.depths.append(depth)
                if self.share:
                    self.children[(node, token)] = child
            columns.append(child)
            node = child
        return columns

    def ancestors(self, width: int) -> torch.Tensor:
        """``allowed[q, k]``: k is q itself or one of its ancestors; padding columns see only themselves."""
        allowed = torch.eye(width, dtype=torch.bool)
        for node, parent in enumerate(self.parents):
            if parent >= 0:
                allowed[node] |= allowed[parent]
        return allowed


def attention_mask_4d(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A custom ``[batch, 1, query, key]`` mask in the form the model's attention expects.

    SDPA takes booleans (True = attend); the eager implementation adds the mask to the
    scores, so it needs 0 / a very negative number.
    """
    if attn_implementation == "sdpa":
        return allowed[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def tree_layout(model, sequences: Sequence[Sequence[int]], target_positions: Sequence[Sequence[int]], pad_id: int, *, capacity: int,
                share_prefixes: bool) -> Layout:
    """The sequences as rows of a prefix tree (``share_prefixes``) or plainly packed, at most ``capacity`` tokens per row.

    A longer sequence gets a row of its own. The mask takes the form ``model``'s attention expects.
    """
    rows: list[_TreeRow] = []
    columns, row_of = [], []
    for seq in sequences:
        if not rows or len(rows[-1].tokens) + rows[-1].new_nodes(seq) > capacity:
            rows.append(_TreeRow(share_prefixes))
        columns.append(rows[-1].add(seq))
        row_of.append(len(rows) - 1)
    width = max(len(r.tokens) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        input_ids[r, : len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
        position_ids[r, : len(row.depths)] = torch.tensor(row.depths, dtype=torch.long)
    allowed = torch.stack([row.ancestors(width) for row in rows])
    mask = attention_mask_4d(allowed, model.config._attn_implementation, next(model.parameters()).dtype)
    model_inputs = {"attention_mask": mask, "position_ids": position_ids}
    return Layout(input_ids, model_inputs, *_read_spec(columns, row_of, sequences, target_positions))


# A row of n tokens under a dense custom mask computes n * n attention pairs; on the CPU one pair
# (score, softmax, weighted value, forward and backward, every layer) cost about 1/600 of the
# rest of a token's work in SmolLM2-135M (measured: packed rows of ~860 tokens trained at 0.58x
# the speed of length-grouped padded rows of ~130). The same estimate decides for any model.
ATTENTION_PAIR_COST = 1 / 600
# A shared prefix is a second forward pass (a one-row batch, which uses the matmul units poorly)
# and a copy of its keys and values for every row: about 80 tokens' work in the same
# measurements (single-task batches of the built-in sequence trained 15 % faster as one tree).
SHARED_PREFIX_OVERHEAD = 80


def layout_cost(layout: Layout) -> float:
    """Estimated compute of a layout, in units of one token's non-attention work."""
    rows, width = layout.input_ids.shape
    if "prefix_ids" not in layout.model_inputs:
        return rows * width * (1 + width * ATTENTION_PAIR_COST)
    prefix = layout.model_inputs["prefix_ids"].shape[1]
    return SHARED_PREFIX_OVERHEAD + prefix * (1 + prefix * ATTENTION_PAIR_COST) + rows * width * (1 + (prefix + width) * ATTENTION_PAIR_COST)


def cheapest_layout(model, sequences: Sequence[Sequence[int]], target_positions: Sequence[Sequence[int]], pad_id: int, capacity: int) -> Layout:
    """Of the layouts the model supports, the one estimated cheapest (``layout_cost``).

    - padded rows: always possible;
    - a shared prefix run once, the rest padded: when all sequences start alike (the template,
      the system prompt, a task's instruction) and differ after;
    - a prefix tree: when they share deeper, in groups (an item's prompt across its choices),
      at the price of attention over the whole row, so only for short rows.
    """
    candidates = [padded_layout(sequences, target_positions, pad_id)]
    longest = max(len(s) for s in sequences)
    prefixed = shared_prefix_layout(sequences, target_positions, pad_id)
    if prefixed is not None and supports_shared_prefix(model, longest):
        candidates.append(prefixed)
    if supports_tree_layout(model, longest):
        # Shorter rows share less but pay less attention: try the row size and its halves.
        capacities = sorted({c for c in (capacity, capacity // 2, capacity // 4) if c >= longest} or {capacity})
        candidates += [tree_layout(model, sequences, target_positions, pad_id, capacity=c, share_prefixes=True) for c in capacities]
    return min(candidates, key=layout_cost)


def build_layout(model, name: str, sequences: Sequence[Sequence[int]], target_positions: Sequence[Sequence[int]], pad_id: int, capacity: int) -> Layout:
    """The layout called ``name`` (one of ``LAYOUTS``), or padded rows where ``model`` cannot take it."""
    longest = max(len(s) for s in sequences)
    if name == "auto":
        return cheapest_layout(model, sequences, target_positions, pad_id, capacity)
    laid = None
    if name == "shared_prefix" and supports_shared_prefix(model, longest):
        laid = shared_prefix_layout(sequences, target_positions, pad_id)
    elif name in ("packed", "prefix_tree") and supports_tree_layout(model, longest):
        laid = tree_layout(model, sequences, target_positions, pad_id, capacity=capacity, share_prefixes=name == "prefix_tree")
    return laid or padded_layout(sequences, target_positions, pad_id)
