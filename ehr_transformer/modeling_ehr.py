"""The EHR transformer: a bidirectional pre-LN transformer over time-stamped clinical events.

Reads bottom-up, as the models of `transformers` do: embeddings -> attention -> layer -> pre-trained base
class -> outputs -> backbone -> heads. Every head holds the same backbone (`self.model`), adds a small head
and computes its loss inside `forward` when labels are given, so the plain `transformers.Trainer` trains it.

This file imports only torch, transformers and its own configuration, so a saved checkpoint folder that
carries a copy of it loads with `trust_remote_code=True` where `ehr_transformer` is not installed.

Shapes: B = batch size, L = events per sequence (padded), H = hidden size, V = vocabulary size,
N = number of masked events in the batch, C = number of labels.
"""

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers import PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput
from transformers.utils.import_utils import is_torchdynamo_compiling
from transformers.utils.output_capturing import capture_outputs

from .configuration_ehr import EHRTransformerConfig


class ContinuousEmbedding(nn.Module):
    """Embeds a continuous quantity (hours, years) as sinusoids at geometric frequencies, then a projection.

    The frequencies span periods from 1 unit to `max_period` units, so both the minutes between two vitals
    and the years between two admissions are resolved. The sinusoids are scaled to unit norm, so that at
    initialisation a time or an age weighs as much in an event's embedding as its code and value do (unscaled,
    the `2 * num_frequencies` sinusoids made time and age ~4x larger than a code embedding, and on the eICU demo
    cohort the classifier then needed many epochs to find the values under them).
    """

    def __init__(self, num_frequencies: int, max_period: float, hidden_size: int):
        super().__init__()
        self.num_frequencies, self.max_period = num_frequencies, max_period
        self.register_buffer("angular_frequencies", self.compute_frequencies(), persistent=False)
        # float32 whatever the default dtype: see `_keep_in_fp32_modules_strict`
        self.proj = nn.Linear(2 * num_frequencies, hidden_size, dtype=torch.float32)

    def compute_frequencies(self) -> torch.Tensor:
        periods = torch.logspace(0, math.log10(self.max_period), self.num_frequencies)  # (F,)
        return 2 * math.pi / periods

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = x.unsqueeze(-1).float() * self.angular_frequencies  # (B, L, F)
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (B, L, 2F)
        features = features / math.sqrt(self.num_frequencies)
        return self.proj(features.to(self.proj.weight.dtype))  # (B, L, H)


class EHRTransformerEmbeddings(nn.Module):
    """Event embedding = code + value (gated by value presence) + time + age, then LayerNorm and dropout.

    The value part is a shared non-linear function of the normalised value plus the value times a per-code
    direction (`code_value_embeddings`), so that a high lactate and a high heart rate need not look alike.
    A NaN time or age (hidden for time reconstruction) adds nothing, as a NaN value does."""

    def __init__(self, config: EHRTransformerConfig):
        super().__init__()
        self.code_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.value_embeddings = nn.Sequential(
            nn.Linear(1, config.hidden_size),
            ACT2FN[config.hidden_activation],
            nn.Linear(config.hidden_size, config.hidden_size),
        )
        self.code_value_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.time_embeddings = ContinuousEmbedding(
            config.num_time_frequencies, config.max_time_hours, config.hidden_size
        )
        self.age_embeddings = ContinuousEmbedding(config.num_time_frequencies, 100.0, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.embedding_dropout)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        values: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        ages: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`inputs_embeds` (`(B, L, H)` or `(N, H)`) replaces the code embedding lookup, as in BERT; `input_ids` then
        only selects each value's per-code direction, so values need them (without values, ids are optional)."""
        if inputs_embeds is None:
            embeddings = self.code_embeddings(input_ids)  # (B, L, H)
        else:
            embeddings = inputs_embeds
        if values is not None:
            if input_ids is None:
                raise ValueError(
                    "values need input_ids beside inputs_embeds: each value is embedded along its code's own "
                    "direction (code_value_embeddings)"
                )
            has_value = ~torch.isnan(values)  # (B, L)
            value_input = torch.where(has_value, values, 0.0).unsqueeze(-1).to(embeddings.dtype)  # (B, L, 1)
            value_embeddings = self.value_embeddings(value_input) + value_input * self.code_value_embeddings(
                input_ids
            )
            embeddings = embeddings + value_embeddings * has_value.unsqueeze(-1)  # (B, L, H)
        for x, embed in ((times, self.time_embeddings), (ages, self.age_embeddings)):
            if x is not None:
                known = ~torch.isnan(x)  # (B, L)
                continuous = embed(torch.where(known, x, 0.0)).to(embeddings.dtype)  # from float32 (see
                # `_keep_in_fp32_modules_strict`) to the model's dtype
                embeddings = embeddings + continuous * known.unsqueeze(-1)  # (B, L, H)
        return self.dropout(self.norm(embeddings))  # (B, L, H)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain attention; `attention_mask` is additive, (B, 1, L, L) or (B, 1, 1, L). Returns (B, L, heads, head_dim)."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, heads, L, L)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, L, heads, head_dim)
    return attn_output, attn_weights


def segment_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    """(B, L) mask of 0 for padding and a segment id > 0 per subject -> (B, 1, L, L): an event attends to the events
    of its own segment only (one subject per row: the padding mask; packed rows: block-diagonal). Boolean (True =
    attend), or additive (0 / dtype's minimum) for eager attention. No data-dependent shape: it traces."""
    segments = attention_mask.long()  # (B, L)
    real_key = segments[:, None, :] != 0  # (B, 1, L)
    # a padding query may look at any real key, and a row without real events at everything (finite, never read)
    same = (segments[:, :, None] == segments[:, None, :]) | (segments[:, :, None] == 0)  # (B, L, L)
    allowed = (same & real_key) | ~real_key.any(dim=-1, keepdim=True)  # (B, L, L)
    allowed = allowed[:, None]  # (B, 1, L, L)
    if not additive:
        return allowed
    return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


# The cost of one more attention call, in units of attention work on one event pair (l^2 for a subject of
# length l), by device type: the length buckets of the sdpa/eager padding-free path trade padded work against
# calls with it (0 = one call per subject). CPU: measured in one process against the earlier per-subject loop on
# the batches of benchmarks/throughput.py (2 cores, hidden 128): 16384 gave 1.08-1.09x on many-short batches and
# 0.93-0.98x on long-tailed ones; 0 gave 0.72-0.79x on many-short. CUDA: a guess (a launch costs more than the
# attention work it saves on short subjects), not yet measured.
BUCKET_CALL_COST = {"cpu": 16384, "cuda": 262144}
# Extra cost of a bucket of unequal lengths (a key padding mask, gathered rows), as a share of its padded work.
BUCKET_MASK_COST = 0.0


def length_buckets(
    lengths: list[int], call_cost: float, mask_cost: float = BUCKET_MASK_COST
) -> list[list[int]]:
    """Groups of subjects (indices into `lengths`) of similar length, for batched attention: the partition of the
    subjects sorted by length that minimises padded attention work (each group padded to its longest, `b * m^2`,
    times `1 + mask_cost` where its lengths differ) plus `call_cost` per group; a dynamic program over the
    distinct lengths, computed once per batch on the host.
    """
    by_length = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    distinct = sorted(set(lengths), reverse=True)  # u_0 > u_1 > ...
    if len(distinct) > 512:  # keep the program small: round lengths up to 512 levels
        step = distinct[0] / 512
        distinct = sorted({math.ceil(math.ceil(n / step) * step) for n in lengths}, reverse=True)
    counts = [0] * len(distinct)
    level = {}
    k = 0
    for i in by_length:
        while k + 1 < len(distinct) and lengths[i] <= distinct[k + 1]:
            k += 1
        counts[k] += 1
        level[i] = k
    # best[j]: least cost of the groups covering levels < j; first[j]: where the last of those groups starts
    best, first = [0.0] + [math.inf] * len(distinct), [0] * (len(distinct) + 1)
    for end in range(1, len(distinct) + 1):
        members = 0
        for start in range(end - 1, -1, -1):
            members += counts[start]
            work = members * distinct[start] ** 2 * (1 + mask_cost if start < end - 1 else 1)
            cost = best[start] + work + call_cost
            if cost < best[end]:
                best[end], first[end] = cost, start
    cuts, end = [], len(distinct)
    while end > 0:
        cuts.append(first[end])
        end = first[end]
    cuts = sorted(cuts)  # the first level of each group
    groups = [[] for _ in cuts]
    g = 0
    for i in by_length:
        while g + 1 < len(cuts) and level[i] >= cuts[g + 1]:
            g += 1
        groups[g].append(i)
    return groups


@dataclass
class Unpadding:
    """Where the N real events of a padded (B, L) batch sit, and which subject each belongs to. Every per-event layer
    (embeddings, projections, feed-forward, norms) runs on (N, H) and skips the padding; attention runs over each
    subject's own events as one batched variable-length operation (see `varlen_attention`).

    A subject is a run of equal non-zero `attention_mask` values in a row: 1 everywhere for one subject per row, or
    1, 2, 3, ... for several subjects packed into a row (sequence packing); attention never crosses subjects.
    Built once per batch (the only host synchronisation of the forward pass) and shared by every layer."""

    indices: torch.Tensor  # (N,) positions of real events in the flattened (B * L) batch
    batch_size: int
    seq_len: int
    cu_seqlens: torch.Tensor  # (S + 1,) int32, start of each of the S subjects in the N events, then N
    max_seqlen: int  # longest subject
    identity: bool  # no padding and one subject per row: unpad and pad are reshapes
    buckets: list[tuple]  # see `from_mask`
    order: torch.Tensor | None  # (N,) inverse of the bucket concatenation order; None if it is the identity
    block_mask: object | None = None  # FlexAttention's BlockMask, built on first use

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, bucketed: bool = True) -> "Unpadding":
        """Subjects are grouped into a few buckets of similar length (`length_buckets`), so that attention is a
        handful of batched calls with little padding, and no call per subject. A bucket is
        `(source, (b, m), slots, key_mask)`: `source` selects b * m rows of the N events (a slice where the bucket
        is b consecutive subjects of length m, else an index tensor, a subject's first event standing in where it
        is shorter than m), `slots` `(n_b,)` are the real ones among them and `key_mask` `(b, 1, 1, m)` masks the
        others (both None for a slice). Without `bucketed` (flash, flex) no bucket is planned."""
        batch_size, seq_len = attention_mask.shape
        flat = attention_mask.reshape(-1)  # (B * L,)
        indices = flat.nonzero(as_tuple=True)[0]  # (N,)
        n = indices.numel()
        segment, row = flat[indices], torch.div(indices, seq_len, rounding_mode="floor")  # (N,), (N,)
        is_start = torch.ones(n, dtype=torch.bool, device=flat.device)
        is_start[1:] = (segment[1:] != segment[:-1]) | (row[1:] != row[:-1])
        starts = is_start.nonzero(as_tuple=True)[0]  # (S,)
        cu_seqlens = torch.cat([starts, starts.new_tensor([n])]).to(torch.int32)  # (S + 1,)
        lengths = cu_seqlens.diff()  # (S,)
        lengths_host = lengths.tolist()
        max_seqlen = max(lengths_host, default=0)
        identity = n == batch_size * seq_len and len(lengths_host) == batch_size
        buckets, order = [], None
        if identity:
            buckets.append((slice(0, n), (batch_size, seq_len), None, None))  # the (B, L) batch itself
        elif n and bucketed:  # flash and flex kernels take the packed events as they are
            device = flat.device
            starts_host = [0]
            for length in lengths_host[:-1]:
                starts_host.append(starts_host[-1] + length)
            positions = []
            call_cost = BUCKET_CALL_COST.get(device.type, BUCKET_CALL_COST["cuda"])
            if call_cost:
                groups = [sorted(g) for g in length_buckets(lengths_host, call_cost, BUCKET_MASK_COST)]
            else:
                groups = [[i] for i in range(len(lengths_host))]
            for group in groups:
                m = max(lengths_host[i] for i in group)
                if all(lengths_host[i] == m for i in group) and group[-1] - group[0] == len(group) - 1:
                    start = starts_host[group[0]]  # consecutive subjects of one length: a view
                    buckets.append((slice(start, start + len(group) * m), (len(group), m), None, None))
                    positions.append(torch.arange(start, start + len(group) * m, device=device))
                    continue
                subjects = torch.tensor(group, device=device)  # (b,)
                offsets = torch.arange(m, device=device)  # (m,)
                valid = offsets[None, :] < lengths[subjects][:, None]  # (b, m)
                gather = starts[subjects][:, None] + torch.where(valid, offsets[None, :], 0)  # (b, m)
                slots = valid.flatten().nonzero(as_tuple=True)[0]  # (n_b,) real slots among the b * m
                buckets.append((gather.flatten(), (len(group), m), slots, valid[:, None, None, :]))
                positions.append(gather.flatten()[slots])
            positions = torch.cat(positions)  # (N,) bucket order -> event
            if not torch.equal(positions, torch.arange(n, device=device)):
                order = torch.empty_like(positions).index_copy_(0, positions, torch.arange(n, device=device))
        return cls(indices, batch_size, seq_len, cu_seqlens, max_seqlen, identity, buckets, order)

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (N, ...)"""
        flat = x.reshape(self.batch_size * self.seq_len, *x.shape[2:])
        return flat if self.identity else flat.index_select(0, self.indices)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, L, ...), zeros at padding."""
        if not self.identity:
            x = x.new_zeros(self.batch_size * self.seq_len, *x.shape[1:]).index_copy(0, self.indices, x)
        return x.view(self.batch_size, self.seq_len, *x.shape[1:])

    def get_block_mask(self, device: torch.device):
        """FlexAttention's block mask over the N packed events: attention within a subject only."""
        if self.block_mask is None:
            from torch.nn.attention.flex_attention import create_block_mask

            n = int(self.cu_seqlens[-1])
            subject = torch.zeros(n, dtype=torch.int32, device=device)
            subject[self.cu_seqlens[1:-1].long()] = 1
            subject = subject.cumsum(0)  # (N,) subject of each event

            def same_subject(b, h, q_idx, kv_idx):
                return subject[q_idx] == subject[kv_idx]

            self.block_mask = create_block_mask(same_subject, None, None, n, n, device=device)
        return self.block_mask


def varlen_attention(
    module: nn.Module,
    qkv: torch.Tensor,
    unpadding: Unpadding,
    attention_interface: Callable,
    implementation: str,
    dropout: float,
    **kwargs,
) -> torch.Tensor:
    """Attention of each subject over its own events, for all subjects at once: `qkv` `(N, 3, heads, d)` ->
    `(N, heads * d)`. No host synchronisation (the plan is in `unpadding`), and a loop over buckets at most.

    - `flash_attention_*` (and kernels of the same interface): the varlen kernel on the packed events with
      `cu_seqlens`, as `transformers` runs packed sequences;
    - `flex_attention`: FlexAttention over the packed events with a block-diagonal block mask;
    - anything else (`sdpa`, `eager`, ...): the subjects in length buckets, each one batched call of the
      attention function with a key padding mask (see `Unpadding.from_mask` and `BUCKET_CALL_COST`).
    """
    n, _, heads, head_dim = qkv.shape
    scaling = head_dim**-0.5
    if "flash" in implementation or "flex" in implementation:
        packed = qkv.permute(1, 2, 0, 3).unsqueeze(1)  # (3, 1, heads, N, d): one row of N events
        query, key, value = packed.unbind(0)  # each (1, heads, N, d)
        if "flex" in implementation:
            mask, extra = unpadding.get_block_mask(qkv.device), {}
        else:
            mask = None
            extra = dict(
                cu_seq_lens_q=unpadding.cu_seqlens,
                cu_seq_lens_k=unpadding.cu_seqlens,
                max_length_q=unpadding.max_seqlen,
                max_length_k=unpadding.max_seqlen,
            )
        out, _ = attention_interface(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, **extra, **kwargs
        )
        return out.reshape(n, heads * head_dim)  # (N, H)
    additive = implementation == "eager"
    outputs = []
    for source, (b, m), slots, key_mask in unpadding.buckets:
        # index_select rather than indexing: its backward (index_add) is the fast one on CPU
        rows = (
            qkv[source] if isinstance(source, slice) else qkv.index_select(0, source)
        )  # (b * m, 3, heads, d)
        if key_mask is not None and additive:
            key_mask = torch.zeros((), dtype=qkv.dtype, device=qkv.device).masked_fill(
                ~key_mask, torch.finfo(qkv.dtype).min
            )
        query, key, value = (
            rows.view(b, m, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )  # (b, heads, m, d)
        out, _ = attention_interface(
            module, query, key, value, key_mask, dropout=dropout, scaling=scaling, **kwargs
        )  # (b, m, heads, d)
        out = out.reshape(b * m, heads * head_dim)  # (b * m, H)
        outputs.append(out if slots is None else out.index_select(0, slots))  # (n_b, H)
    out = torch.cat(outputs) if len(outputs) > 1 else outputs[0]  # (N, H), in bucket order
    return out if unpadding.order is None else out.index_select(0, unpadding.order)


class EHRTransformerAttention(nn.Module):
    """Multi-head self-attention dispatched through `ALL_ATTENTION_FUNCTIONS` (eager, sdpa, flash, flex): on the
    padded batch with a mask, or, with `unpadding`, as one variable-length operation over the real events."""

    def __init__(self, config: EHRTransformerConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = False
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj.is_residual_projection = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        unpadding: Unpadding | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        qkv = self.qkv(hidden_states)  # (B, L, 3H), or (N, 3H) with unpadding
        implementation = self.config._attn_implementation or "eager"
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            implementation, eager_attention_forward
        )
        dropout = self.config.attention_dropout if self.training else 0.0
        if unpadding is not None:
            qkv = qkv.view(qkv.shape[0], 3, -1, self.head_dim)  # (N, 3, heads, d)
            out = varlen_attention(
                self, qkv, unpadding, attention_interface, implementation, dropout, **kwargs
            )
            return self.out_proj(out), None  # (N, H)
        batch_size, seq_len, _ = qkv.shape
        qkv = qkv.view(batch_size, seq_len, 3, -1, self.head_dim)  # (B, L, 3, heads, d)
        query, key, value = qkv.transpose(1, 3).unbind(dim=2)  # each (B, heads, L, d)
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask, dropout=dropout, scaling=self.head_dim**-0.5, **kwargs
        )
        attn_output = attn_output.reshape(batch_size, seq_len, -1)  # (B, L, H)
        return self.out_proj(attn_output), attn_weights


class EHRTransformerMLP(nn.Module):
    def __init__(self, config: EHRTransformerConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_activation]
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.down.is_residual_projection = True

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(hidden_states)))


class EHRTransformerLayer(GradientCheckpointingLayer):
    """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x)). With `unpadding` it runs on the (N, H) real events; given
    a padded (B, L, H) input then (as when hidden states are collected), it unpads it and pads its output, so that
    the collected (B, L, H) hidden states lie on the autograd path."""

    def __init__(self, config: EHRTransformerConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = EHRTransformerAttention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = EHRTransformerMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        unpadding: Unpadding | None = None,
        **kwargs,
    ) -> torch.Tensor:
        repad = unpadding is not None and hidden_states.dim() == 3
        if repad:
            hidden_states = unpadding.unpad(hidden_states)  # (N, H)
        attn_output, _ = self.attn(self.attn_norm(hidden_states), attention_mask, unpadding, **kwargs)
        hidden_states = hidden_states + self.dropout(attn_output)  # (B, L, H) or (N, H)
        hidden_states = hidden_states + self.dropout(
            self.mlp(self.mlp_norm(hidden_states))
        )  # (B, L, H) or (N, H)
        return unpadding.pad(hidden_states) if repad else hidden_states


class EHRTransformerPredictionHead(nn.Module):
    """dense -> activation -> LayerNorm: the shared first stage of the masked-event and classification heads."""

    def __init__(self, config: EHRTransformerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_activation]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(hidden_states)))


class EHRTransformerPreTrainedModel(PreTrainedModel):
    config_class = EHRTransformerConfig
    config: EHRTransformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["EHRTransformerEmbeddings", "EHRTransformerLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Sinusoids of hours over 10 years need more mantissa bits than half precision has: time and age embeddings
    # stay in float32 when the model is loaded in float16 or bfloat16 ("strict").
    _keep_in_fp32_modules_strict = ["time_embeddings", "age_embeddings"]
    _can_record_outputs = {"hidden_states": EHRTransformerLayer, "attentions": EHRTransformerAttention}
    # Losses are means over this process's targets; the Trainer must not rescale them by `num_items_in_batch`
    # (it would multiply them by the number of processes under data parallelism).
    accepts_loss_kwargs = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; a folder that holds an ensemble (`config.ensemble_size > 1`) loads as
        [`EHRTransformerEnsembleForSequenceClassification`] when a classifier is asked for (so the Auto class and
        the pipeline take either kind of folder) and is refused, in one sentence, by every other class."""
        config = kwargs.get("config")
        if isinstance(config, PretrainedConfig):  # also the class of a trust_remote_code load
            size = getattr(config, "ensemble_size", 1)
        else:
            path = Path(config or pretrained_model_name_or_path)
            path = path / "config.json" if path.is_dir() else path
            size = json.loads(path.read_text()).get("ensemble_size", 1) if path.is_file() else 1
        if size > 1 and cls is not EHRTransformerEnsembleForSequenceClassification:
            if cls is not EHRTransformerForSequenceClassification:
                raise ValueError(
                    f"{pretrained_model_name_or_path} holds an ensemble of {size} fine-tuned classifiers, which "
                    f"{cls.__name__} cannot load: load it with AutoModelForSequenceClassification, or start from "
                    "a pretrained or a single fine-tuned checkpoint"
                )
            return EHRTransformerEnsembleForSequenceClassification.from_pretrained(
                pretrained_model_name_or_path, *args, **kwargs
            )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Whichever head saves the folder, every Auto class loads it (also under `trust_remote_code`).
        self.config.auto_map = {
            "AutoConfig": "configuration_ehr.EHRTransformerConfig",
            "AutoModel": "modeling_ehr.EHRTransformerModel",
            "AutoModelForMaskedLM": "modeling_ehr.EHRTransformerForMaskedEventModeling",
            "AutoModelForSequenceClassification": "modeling_ehr.EHRTransformerForSequenceClassification",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """Resize every per-code table: the code embeddings (and the tied decoder, as in `transformers`) and the
        per-code value directions `code_value_embeddings`, so new codes may carry values, and the model saves and
        reloads at its new size."""
        embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        table = self.base_model.embeddings
        vocab_size = embeddings.weight.shape[0]
        if table.code_value_embeddings.weight.shape[0] != vocab_size:
            resized = self._get_resized_embeddings(
                table.code_value_embeddings, vocab_size, mean_resizing=mean_resizing
            )
            resized.padding_idx = table.code_value_embeddings.padding_idx
            table.code_value_embeddings = resized
        return embeddings

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        # Residual output projections (marked `is_residual_projection`) get std / sqrt(2 * layers), so the
        # residual stream's variance stays flat with depth.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                std = std / math.sqrt(2.0 * self.config.num_hidden_layers)
            init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.padding_idx is not None:
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(
            module, ContinuousEmbedding
        ):  # a non-persistent buffer: rebuilt after `from_pretrained`
            init.copy_(module.angular_frequencies, module.compute_frequencies())


def output_flags(output_hidden_states, output_attentions) -> dict:
    """The `output_*` flags a head passes on to its backbone: only those set, so unset ones fall back to the config."""
    flags = {"output_hidden_states": output_hidden_states, "output_attentions": output_attentions}
    return {name: value for name, value in flags.items() if value is not None}


@dataclass
class EHRTransformerModelOutput(ModelOutput):
    """
    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(B, L, H)`): final (normalised) event representations.
        pooler_output (`torch.FloatTensor` of shape `(B, H)`): the sequence summary (`config.classifier_pooling`).
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): the embeddings and each layer's output, `(B, L, H)`.
        attentions (`tuple(torch.FloatTensor)`, *optional*): each layer's attention weights `(B, heads, L, L)`
            (eager attention only).
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MaskedEventModelingOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): the objectives' losses weighted by
            [`EHRTransformerForMaskedEventModeling.loss_weights`] (the static weights), summed.
        logits (`torch.FloatTensor`): code logits, `(N, V)` at the masked positions when
            `config.sparse_prediction` and labels are given, else `(B, L, V)`.
        code_loss (`torch.FloatTensor` of shape `()`, *optional*): cross entropy of the masked codes.
        value_loss (`torch.FloatTensor` of shape `()`, *optional*): mean squared error of the hidden normalised
            values, when `value_labels` are given.
        time_loss (`torch.FloatTensor` of shape `()`, *optional*): mean squared error of the hidden log1p time
            gaps, when `time_labels` are given.
        feature_loss (`torch.FloatTensor` of shape `()`, *optional*): mean squared error between the predicted and
            the EMA teacher's features at the masked positions, when the teacher inputs are given.
        value_predictions (`torch.FloatTensor` of shape `(M,)`, *optional*): predicted values at the M positions
            whose value was hidden.
        time_predictions (`torch.FloatTensor` of shape `(T,)`, *optional*): predicted log1p time gaps at the T
            positions whose time was hidden.
        hidden_states, attentions: as in [`EHRTransformerModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    code_loss: torch.FloatTensor | None = None
    value_loss: torch.FloatTensor | None = None
    time_loss: torch.FloatTensor | None = None
    feature_loss: torch.FloatTensor | None = None
    value_predictions: torch.FloatTensor | None = None
    time_predictions: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class EHRSequenceClassifierOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): MSE, cross entropy or BCE (`config.problem_type`);
            with `config.task_names`, the mean of the task losses over the tasks labelled in the batch.
        logits (`torch.FloatTensor` of shape `(B, C)`): divided by `config.temperature` in eval mode (with
            `config.task_types`, `C = T` tasks and only the binary tasks' logits are divided).
        task_losses (`torch.FloatTensor` of shape `(T,)`, *optional*): multitask only, each task's loss (BCE or
            MSE over its non-NaN labels); NaN for a task without any label in the batch. For loss balancing.
        pooler_output (`torch.FloatTensor` of shape `(B, H)`): the pooled sequence summary, for feature use.
        hidden_states, attentions: as in [`EHRTransformerModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    task_losses: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


class EHRTransformerModel(EHRTransformerPreTrainedModel):
    """The backbone: event embeddings and a stack of pre-LN transformer blocks, returning hidden states and a
    pooled vector."""

    def __init__(self, config: EHRTransformerConfig):
        super().__init__(config)
        self.embeddings = EHRTransformerEmbeddings(config)
        self.layers = nn.ModuleList([EHRTransformerLayer(config, i) for i in range(config.num_hidden_layers)])
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.code_embeddings

    def set_input_embeddings(self, value: nn.Embedding):
        self.embeddings.code_embeddings = value

    def pool(self, last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, L, H) -> (B, H): the `[CLS]` position, or the mean or maximum over real events."""
        if self.config.classifier_pooling == "cls":
            return last_hidden_state[:, 0]
        if self.config.classifier_pooling == "max":
            if attention_mask is not None:
                padding = (attention_mask == 0).unsqueeze(-1)  # (B, L, 1)
                last_hidden_state = last_hidden_state.masked_fill(
                    padding, torch.finfo(last_hidden_state.dtype).min
                )
            return last_hidden_state.amax(dim=1)
        if attention_mask is None:
            return last_hidden_state.mean(dim=1)
        weights = (attention_mask != 0).unsqueeze(-1).to(last_hidden_state.dtype)  # (B, L, 1)
        return (last_hidden_state * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def padded_mask(self, attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
        """The attention mask of the padded path, which honours packed rows (see `forward`) and traces: per-segment
        `(B, 1, L, L)` for eager, sdpa and attention backends, a per-segment block mask for flex attention; flash
        kernels get the `transformers` padding mask (one subject per row: flash takes packed rows unpadded only)."""
        if attention_mask is None:
            return None
        implementation = self.config._attn_implementation or "eager"
        if "flex" in implementation:
            from torch.nn.attention.flex_attention import create_block_mask

            segments = attention_mask.long()  # (B, L)

            def same_segment(b, h, q_idx, kv_idx):
                return (segments[b, q_idx] == segments[b, kv_idx]) & (segments[b, kv_idx] != 0)

            batch_size, seq_len = segments.shape
            return create_block_mask(same_segment, batch_size, None, seq_len, seq_len, device=segments.device)
        if "flash" in implementation:
            return create_bidirectional_mask(
                config=self.config, inputs_embeds=like, attention_mask=attention_mask
            )
        return segment_attention_mask(attention_mask, like.dtype, additive=implementation == "eager")

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        ages: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> EHRTransformerModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): event code ids from [`EHREventTokenizer`].
            attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): 1 for real events, 0 for padding; for
                sequence packing, 1, 2, 3, ... for the first, second, third subject of a row (attention never
                crosses subjects; pooled outputs then mix the subjects of a row, so pack for pretraining only).
            values (`torch.FloatTensor` of shape `(B, L)`, *optional*): normalised numeric values, NaN where
                an event has none.
            times (`torch.FloatTensor` of shape `(B, L)`, *optional*): hours since the sequence start.
            ages (`torch.FloatTensor` of shape `(B, L)`, *optional*): the subject's age in years at each event.
            inputs_embeds (`torch.FloatTensor` of shape `(B, L, H)`, *optional*): code embeddings in place of the
                lookup of `input_ids` (for embedding-level attributions). Unlike BERT, `input_ids` may be given
                beside them: values need them, to be embedded along their codes' directions.
            output_hidden_states, output_attentions, return_dict: as in `transformers` (collected by hooks; the
                hidden states are the embeddings and each layer's output, `(B, L, H)`, on the autograd path).

        With `config.unpad_inputs` every per-event layer runs on the real events only and attention is one
        variable-length operation (`varlen_attention`); returning attention weights, or tracing (`torch.export`,
        `torch.compile`), runs the padded batch with a mask instead: the same outputs, to floating-point tolerance.
        """
        if input_ids is None and inputs_embeds is None:
            raise ValueError("give input_ids or inputs_embeds")
        output_hidden_states = kwargs.get("output_hidden_states", self.config.output_hidden_states)
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        for name in ("output_hidden_states", "output_attentions", "return_dict"):
            kwargs.pop(name, None)
        shape_source = input_ids if input_ids is not None else inputs_embeds
        batch_size, seq_len = shape_source.shape[:2]
        unpadding = None
        # tracing takes the padded path, which has no data-dependent shapes; flash kernels take no segment mask,
        # so they stay padding-free (and a compiled graph breaks around `Unpadding.from_mask`)
        implementation = self.config._attn_implementation or "eager"
        flash = "flash" in implementation
        if (
            self.config.unpad_inputs
            and attention_mask is not None
            and not output_attentions
            and (flash or not is_torchdynamo_compiling())
        ):
            unpadding = Unpadding.from_mask(attention_mask, bucketed=not (flash or "flex" in implementation))
            input_ids, values, times, ages, inputs_embeds = (
                None if x is None else unpadding.unpad(x)
                for x in (input_ids, values, times, ages, inputs_embeds)
            )  # each (N,) or (N, H)
        hidden_states = self.embeddings(
            input_ids, values=values, times=times, ages=ages, inputs_embeds=inputs_embeds
        )  # (B, L, H) | (N, H)
        mask = None
        if unpadding is None:
            mask = self.padded_mask(attention_mask, hidden_states.new_empty(0).expand(batch_size, seq_len, 0))
        elif output_hidden_states:
            # the layers then take and give (B, L, H): the collected hidden states lie on the autograd path
            hidden_states = unpadding.pad(hidden_states)  # (B, L, H)
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, unpadding, **kwargs)  # (B, L, H) or (N, H)
        hidden_states = self.final_norm(hidden_states)
        if unpadding is not None and hidden_states.dim() == 2:
            hidden_states = unpadding.pad(hidden_states)  # (B, L, H), zeros at padding
        elif attention_mask is not None and (unpadding is None or not unpadding.identity):
            real = (attention_mask != 0).unsqueeze(-1).to(hidden_states.dtype)  # (B, L, 1)
            hidden_states = hidden_states * real  # (B, L, H), the same zeros at padding
        pooled = self.pool(hidden_states, attention_mask)  # (B, H)
        return EHRTransformerModelOutput(last_hidden_state=hidden_states, pooler_output=pooled)


class EHRTransformerForMaskedEventModeling(EHRTransformerPreTrainedModel):
    """The backbone with one head per pretraining objective of `config.pretraining_objectives`:

    - "code": BERT's masked language modeling over events (a code decoder tied to the code embeddings);
    - "value": the normalised value of events whose value was hidden (MAE-style regression);
    - "time": the log1p hours since the previous event, for events whose time (and age) was hidden;
    - "feature": at the masked positions, the features of an exponential-moving-average teacher that saw the
      unmasked sequence (data2vec): the mean of its top `config.feature_target_layers` layer outputs, each
      layer-normed. The teacher is attached with `set_feature_teacher` (`ehr_transformer.pretraining.
      EMATeacherCallback` does it and updates it) and kept out of the module tree: it is not in `state_dict`,
      never saved, moved by `.to()` or trained.

    Pretrain it with [`DataCollatorForMaskedEventModeling`]; `loss` weighs the objectives by `loss_weights()`,
    `ehr_transformer.pretraining.PretrainingTrainer` balances them by a learned strategy instead."""

    _tied_weights_keys = {"decoder.weight": "model.embeddings.code_embeddings.weight"}

    def __init__(self, config: EHRTransformerConfig):
        super().__init__(config)
        objectives = config.pretraining_objectives
        self.model = EHRTransformerModel(config)
        self.head = EHRTransformerPredictionHead(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        self.value_head = EHRTransformerPredictionHead(config) if "value" in objectives else None
        self.value_decoder = nn.Linear(config.hidden_size, 1) if "value" in objectives else None
        self.time_head = EHRTransformerPredictionHead(config) if "time" in objectives else None
        self.time_decoder = nn.Linear(config.hidden_size, 1) if "time" in objectives else None
        self.feature_head = (
            nn.Linear(config.hidden_size, config.hidden_size) if "feature" in objectives else None
        )
        self.__dict__["feature_teacher"] = None  # not a submodule: see `set_feature_teacher`
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.decoder

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.decoder = new_embeddings

    def set_feature_teacher(self, teacher: EHRTransformerModel | None) -> None:
        """Attach the "feature" objective's teacher (a frozen backbone) without registering it as a submodule,
        so that it is not in `state_dict()`, `parameters()` or a saved checkpoint. (`model.feature_teacher = x`
        would register it.)"""
        self.__dict__["feature_teacher"] = teacher

    def loss_weights(self) -> dict[str, float]:
        """Static weight of each objective: `config.objective_weights`, else 1."""
        weights = {name: 1.0 for name in self.config.pretraining_objectives}
        return {**weights, **{k: float(v) for k, v in (self.config.objective_weights or {}).items()}}

    @staticmethod
    def regress(head: nn.Module, decoder: nn.Linear, hidden_states: torch.Tensor, targets: torch.Tensor):
        """Predictions `(M,)` at the M positions where `targets` `(B, L)` is not NaN, and their MSE (None if M = 0)."""
        is_target = ~torch.isnan(targets)  # (B, L)
        predictions = decoder(head(hidden_states[is_target])).squeeze(-1)  # (M,)
        if not is_target.any():
            return predictions, None
        return predictions, nn.functional.mse_loss(predictions.float(), targets[is_target].float())

    @torch.no_grad()
    def feature_targets(self, input_ids, attention_mask, values, times, ages) -> torch.Tensor:
        """`(B, L, H)`: the teacher's mean of its top `config.feature_target_layers` layer outputs, each layer-normed."""
        if self.feature_teacher is None:
            raise ValueError(
                'the "feature" objective needs an EMA teacher: train with ehr_transformer.pretraining.PretrainingTrainer '
                "or add its EMATeacherCallback to the Trainer (or call model.set_feature_teacher)"
            )
        outputs = self.feature_teacher(
            input_ids, attention_mask, values=values, times=times, ages=ages, output_hidden_states=True
        )
        top = outputs.hidden_states[1:][-self.config.feature_target_layers :]  # K x (B, L, H), layer outputs
        return torch.stack([nn.functional.layer_norm(h.float(), h.shape[-1:]) for h in top]).mean(dim=0)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        ages: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        value_labels: torch.Tensor | None = None,
        time_labels: torch.Tensor | None = None,
        teacher_input_ids: torch.LongTensor | None = None,
        teacher_values: torch.Tensor | None = None,
        teacher_times: torch.Tensor | None = None,
        teacher_ages: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedEventModelingOutput | tuple:
        r"""
        Args:
            input_ids, attention_mask, values, times, ages, inputs_embeds: as in [`EHRTransformerModel.forward`], `(B, L)`; the
                collator's corrupted view (masked codes, hidden values, NaN times and ages where time is hidden).
            labels (`torch.LongTensor` of shape `(B, L)`, *optional*): the original code at masked positions,
                -100 elsewhere.
            value_labels (`torch.FloatTensor` of shape `(B, L)`, *optional*): the hidden normalised value where
                a value was hidden from the input, NaN elsewhere.
            time_labels (`torch.FloatTensor` of shape `(B, L)`, *optional*): log1p of the hours since the previous
                event where the time was hidden from the input, NaN elsewhere.
            teacher_input_ids, teacher_values, teacher_times, teacher_ages (`(B, L)`, *optional*): the unmasked
                sequence, seen only by the "feature" objective's teacher.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids,
            attention_mask,
            values=values,
            times=times,
            ages=ages,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **output_flags(output_hidden_states, output_attentions),
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, L, H)
        code_states, code_labels = hidden_states, labels
        if self.config.sparse_prediction and labels is not None:
            is_masked = labels != -100  # (B, L)
            code_states, code_labels = hidden_states[is_masked], labels[is_masked]  # (N, H), (N,)
        logits = self.decoder(self.head(code_states))  # (N, V) or (B, L, V)

        losses, value_predictions, time_predictions = {}, None, None
        if labels is not None and "code" in self.config.pretraining_objectives:
            losses["code"] = nn.functional.cross_entropy(
                logits.view(-1, logits.shape[-1]).float(), code_labels.reshape(-1), ignore_index=-100
            )
        if value_labels is not None and self.value_head is not None:
            value_predictions, losses["value"] = self.regress(
                self.value_head, self.value_decoder, hidden_states, value_labels
            )  # (M,), ()
        if time_labels is not None and self.time_head is not None:
            time_predictions, losses["time"] = self.regress(
                self.time_head, self.time_decoder, hidden_states, time_labels
            )  # (T,), ()
        if teacher_input_ids is not None and self.feature_head is not None and labels is not None:
            is_masked = labels != -100  # (B, L)
            targets = self.feature_targets(
                teacher_input_ids, attention_mask, teacher_values, teacher_times, teacher_ages
            )  # (B, L, H)
            predictions = self.feature_head(hidden_states[is_masked])  # (N, H)
            if len(predictions):
                losses["feature"] = nn.functional.mse_loss(predictions.float(), targets[is_masked])  # ()
        losses = {name: value for name, value in losses.items() if value is not None}
        weights = self.loss_weights()
        loss = sum(weights[name] * value for name, value in losses.items()) if losses else None

        output = MaskedEventModelingOutput(
            loss=loss,
            logits=logits,
            **{f"{name}_loss": value for name, value in losses.items()},
            value_predictions=value_predictions,
            time_predictions=time_predictions,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


class EHRTransformerForSequenceClassification(EHRTransformerPreTrainedModel):
    """The backbone with a pooled classification / regression head: in-hospital mortality (binary,
    `num_labels=1` with `problem_type="multi_label_classification"`), a multi-class outcome, several binary
    outcomes at once, or a regression target such as length of stay, as chosen by `config.problem_type`.

    Multitask (`config.task_names` / `config.task_types`): T tasks share the backbone and the pooled head; each
    task has its own output row of `classifier` (a `(T, H)` weight), so the logits are `(B, T)` and a single-task
    checkpoint's layout is unchanged. The loss is the mean over tasks of BCE ("binary") or MSE ("regression"),
    each over the task's non-NaN labels; `task_losses` gives them one by one.

    `config.classifier_head` chooses what lies between the pooled vector and `classifier`: the dense + activation
    + LayerNorm `head` ("mlp"), or nothing ("linear": `head` is an identity without weights, so the logits are
    affine in the pooled output, as for a linear probe on frozen features)."""

    def __init__(self, config: EHRTransformerConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = EHRTransformerModel(config)
        self.head = EHRTransformerPredictionHead(config) if config.classifier_head == "mlp" else nn.Identity()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def binary_task_mask(self) -> torch.Tensor:
        """`(C,)` bool, True for the binary outputs: the tasks of type "binary" of a multitask config, else every
        output of a `"multi_label_classification"` head (each one a binary outcome)."""
        if self.config.task_types is None:
            is_binary = self.config.problem_type == "multi_label_classification"
            return torch.full((self.config.num_labels,), is_binary, dtype=torch.bool)
        return torch.tensor([t == "binary" for t in self.config.task_types], dtype=torch.bool)

    def regression_scaling(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(C,)` shift and scale of each output (`config.regression_target_scale`; 0 and 1 for outputs that are not
        regression targets), on `logits`' device and dtype."""
        stats = self.config.regression_target_scale
        regression = ~self.binary_task_mask() if self.config.task_types is not None else None
        if stats is None or (regression is None and self.config.problem_type != "regression"):
            return logits.new_zeros(self.num_labels), logits.new_ones(self.num_labels)
        shift, scale = logits.new_tensor(stats).T  # (C,) each
        if regression is not None:
            regression = regression.to(logits.device)
            shift, scale = torch.where(regression, shift, 0.0), torch.where(regression, scale, 1.0)
        return shift, scale

    def multitask_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over tasks of BCE (binary) / MSE (regression) on each task's non-NaN labels, and the `(T,)` task
        losses (NaN for a task with no label here; not detached, for loss balancing). A batch with no label at all gives a zero loss that still
        reaches every logit, so distributed backward passes stay in step."""
        num_tasks = len(self.config.task_names)
        if labels.dim() == 1 and num_tasks == 1:
            labels = labels.unsqueeze(-1)
        if labels.shape != logits.shape:
            raise ValueError(
                f"multitask labels must have shape (B, T) = {tuple(logits.shape)} for tasks "
                f"{self.config.task_names}, got {tuple(labels.shape)}"
            )
        logits, labels = logits.float(), labels.to(logits.device, torch.float32)  # (B, T)
        present = ~torch.isnan(labels)  # (B, T)
        targets = torch.where(present, labels, torch.zeros_like(labels))  # (B, T)
        binary = self.binary_task_mask().to(logits.device).expand_as(logits)  # (B, T)
        _, scale = self.regression_scaling(logits)  # (T,)
        per_label = torch.where(
            binary,
            nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none"),
            ((logits - targets) / scale) ** 2,
        )  # (B, T)
        counts = present.sum(dim=0)  # (T,)
        sums = (per_label * present).sum(dim=0)  # (T,)
        task_losses = sums / counts.clamp(min=1)  # (T,)
        labelled = counts > 0  # (T,)
        if labelled.any():
            loss = task_losses[labelled].mean()
        else:
            loss = (logits * 0.0).sum()
        task_losses = torch.where(labelled, task_losses, torch.full_like(task_losses, float("nan")))
        return loss, task_losses

    def apply_temperature(self, logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """In eval mode, `(B, C)` logits divided by `temperature` (with `config.task_types`, only the binary tasks'
        logits); unchanged in training mode or at temperature 1."""
        if self.training or temperature == 1.0:
            return logits
        if self.config.task_types is None:
            return logits / temperature
        binary = self.binary_task_mask().to(logits.device)  # (T,)
        return torch.where(binary, logits / temperature, logits)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The loss of `(B, C)` output logits (after the regression scaling) against `labels` (as in `forward`),
        and the `(T,)` task losses of a multitask config (else None)."""
        if self.config.task_names is not None:
            return self.multitask_loss(logits, labels)
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":  # in units of the target's scale
            _, scale = self.regression_scaling(logits)
            return MSELoss()(logits / scale, labels.to(logits.dtype).view_as(logits) / scale), None
        if self.config.problem_type == "single_label_classification":
            return CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1)), None
        return BCEWithLogitsLoss()(logits, labels.to(logits.dtype).view_as(logits)), None

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        ages: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> EHRSequenceClassifierOutput | tuple:
        r"""
        Args:
            input_ids, attention_mask, values, times, ages, inputs_embeds: as in [`EHRTransformerModel.forward`], `(B, L)`.
            labels (`torch.Tensor`, *optional*): `(B,)` float targets for regression or one binary outcome,
                `(B,)` long class ids for single-label classification, `(B, C)` floats for multi-label;
                with `config.task_names`, `(B, T)` floats, NaN where a task has no label.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids,
            attention_mask,
            values=values,
            times=times,
            ages=ages,
            inputs_embeds=inputs_embeds,
            return_dict=True,
            **output_flags(output_hidden_states, output_attentions),
            **kwargs,
        )
        pooled = outputs.pooler_output  # (B, H)
        logits = self.classifier(self.dropout(self.head(pooled)))  # (B, C); head = identity if "linear"
        shift, scale = self.regression_scaling(logits)  # (C,) each; 0 and 1 for non-regression outputs
        logits = self.apply_temperature(shift + scale * logits, self.config.temperature)

        loss, task_losses = self.loss(logits, labels) if labels is not None else (None, None)
        output = EHRSequenceClassifierOutput(
            loss=loss,
            logits=logits,
            task_losses=task_losses,
            pooler_output=pooled,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()


class EHRTransformerEnsembleForSequenceClassification(EHRTransformerPreTrainedModel):
    """`config.ensemble_size` classifiers of one config that answer as one: the members' probabilities are averaged
    (sigmoid of binary outputs, softmax of a multi-class output) and regression outputs averaged, returned as logits
    (log-odds, log-probabilities) so that every reader of [`EHRTransformerForSequenceClassification`]'s outputs reads
    these the same way. `finetune --ensemble K` trains the members cross-fitted: each on the training subjects less
    one K-th, stopped early on that K-th. Averaging networks that stopped on different subjects removes most of the
    variance a single early stop on few events of the outcome carries.

    `EHRTransformerForSequenceClassification.from_pretrained` and `AutoModelForSequenceClassification.from_pretrained`
    of an ensemble folder return this class."""

    def __init__(self, config: EHRTransformerConfig):
        super().__init__(config)
        # each network as its own folder held it; the temperature divides the combined logits, once (`forward`)
        network = copy.deepcopy(config)
        network.ensemble_size, network.temperature = 1, 1.0
        self.members = nn.ModuleList(
            EHRTransformerForSequenceClassification(network) for _ in range(config.ensemble_size)
        )
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
        times: torch.Tensor | None = None,
        ages: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> EHRSequenceClassifierOutput | tuple:
        r"""
        Args:
            input_ids, attention_mask, values, times, ages, labels: as in
                [`EHRTransformerForSequenceClassification.forward`], `(B, L)`.

        Returns the combined `(B, C)` logits, the loss of those against `labels`, and the mean of the members'
        `(B, H)` pooled outputs."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        inputs = dict(attention_mask=attention_mask, values=values, times=times, ages=ages, **kwargs)
        outputs = [member(input_ids, return_dict=True, **inputs) for member in self.members]
        logits = torch.stack([o.logits.float() for o in outputs])  # (K, B, C)
        first = self.members[0]
        binary = first.binary_task_mask().to(logits.device)  # (C,)
        if self.config.problem_type == "single_label_classification":
            combined = torch.logsumexp(logits.log_softmax(-1), dim=0) - math.log(len(self.members))
        else:
            p = torch.sigmoid(logits).mean(0).clamp(1e-7, 1 - 1e-7)  # (B, C)
            combined = torch.where(binary, torch.log(p) - torch.log1p(-p), logits.mean(0))
        # the ensemble's calibration (eval mode), applied as one network applies its own
        combined = first.apply_temperature(combined, self.config.temperature)
        loss, task_losses = first.loss(combined, labels) if labels is not None else (None, None)
        output = EHRSequenceClassifierOutput(
            loss=loss,
            logits=combined,
            task_losses=task_losses,
            pooler_output=torch.stack([o.pooler_output for o in outputs]).mean(0),
        )
        return output if return_dict else output.to_tuple()


__all__ = [
    "EHRTransformerPreTrainedModel",
    "EHRTransformerModel",
    "EHRTransformerForMaskedEventModeling",
    "EHRTransformerForSequenceClassification",
    "EHRTransformerEnsembleForSequenceClassification",
    "EHRTransformerModelOutput",
    "MaskedEventModelingOutput",
    "EHRSequenceClassifierOutput",
]
