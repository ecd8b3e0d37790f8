//! The steps of one sequence through the layer, over a paged KV cache that
//! may live anywhere.
//!
//! Both the single-process reference and the distributed run call these
//! functions; they differ only in the [`KvStore`] and
//! [`ExpertSource`](crate::model::ExpertSource) they pass. A sequence goes
//! through three phases:
//!
//! 1. [`write_prompt_kv`] writes the keys and values of the prompt tokens in
//!    the blocks this sequence writes ([`SharingPlan::writes`]).
//! 2. [`prefill`] runs the layer for the tokens of those blocks and for the
//!    last prompt token, reading shared blocks written by other sequences.
//!    Every writer must have finished phase 1 first.
//! 3. [`decode`] appends one token and runs the layer for it, once per step.
//!
//! Phases 2 and 3 also come split in two, the router ([`prefill_route`],
//! [`decode_route`]) and the experts ([`run_experts`]), so that a caller can
//! route every token of a step before any expert runs, as an MoE layer
//! dispatches its tokens. The split gives the same bits.
//!
//! Tokens of reused blocks are not run through the layer again, as with
//! prefix caching in serving engines: their keys and values are already in
//! the cache, and their outputs would be the writer's outputs.

use std::fmt;

use crate::model::{self, Context, DenseWeights, ExpertSource, ModelConfig, Routed, Routing};
use crate::prefix::{BlockId, SequenceBlocks, SharingPlan, KV_BLOCK_TOKENS};
use crate::trace::{Scale, Sequence};

/// The batch to run and how it was derived from the trace.
#[derive(Clone, Debug)]
pub struct Workload {
    pub seed: u64,
    pub scale: Scale,
    pub steps: usize,
    pub sequences: Vec<Sequence>,
}

/// Storage of KV blocks. A block holds `KV_BLOCK_TOKENS` key rows followed
/// by `KV_BLOCK_TOKENS` value rows, each `kv_dim` values wide.
pub trait KvStore {
    type Error;

    /// Writes the key and value rows of the token in `slot` of `block`.
    fn write_token(
        &mut self,
        block: BlockId,
        slot: usize,
        key: &[f32],
        value: &[f32],
    ) -> Result<(), Self::Error>;

    /// Reads all key and value rows of `block`. Each buffer takes
    /// `KV_BLOCK_TOKENS * kv_dim` values.
    fn read_block(
        &mut self,
        block: BlockId,
        keys: &mut [f32],
        values: &mut [f32],
    ) -> Result<(), Self::Error>;
}

/// Values in one KV block: keys and values of `KV_BLOCK_TOKENS` tokens.
pub fn block_values(cfg: &ModelConfig) -> usize {
    2 * KV_BLOCK_TOKENS * cfg.kv_dim()
}

/// A block id beyond the blocks of a [`LocalKvStore`].
#[derive(Debug, thiserror::Error)]
#[error("KV block {block} is beyond the {blocks} blocks of the store")]
pub struct BlockOutOfRange {
    pub block: u32,
    pub blocks: usize,
}

/// KV blocks in ordinary memory, for the reference.
#[derive(Debug)]
pub struct LocalKvStore {
    data: Vec<f32>,
    kv_dim: usize,
}

impl LocalKvStore {
    pub fn new(cfg: &ModelConfig, blocks: usize) -> Self {
        LocalKvStore { data: vec![0.0; blocks * block_values(cfg)], kv_dim: cfg.kv_dim() }
    }

    fn block(&mut self, block: BlockId) -> Result<&mut [f32], BlockOutOfRange> {
        let len = 2 * KV_BLOCK_TOKENS * self.kv_dim;
        let blocks = self.data.len() / len;
        self.data
            .get_mut(block.index() * len..(block.index() + 1) * len)
            .ok_or(BlockOutOfRange { block: block.0, blocks })
    }
}

impl KvStore for LocalKvStore {
    type Error = BlockOutOfRange;

    fn write_token(
        &mut self,
        block: BlockId,
        slot: usize,
        key: &[f32],
        value: &[f32],
    ) -> Result<(), Self::Error> {
        let kv_dim = self.kv_dim;
        let (keys, values) = self.block(block)?.split_at_mut(KV_BLOCK_TOKENS * kv_dim);
        keys[slot * kv_dim..][..kv_dim].copy_from_slice(key);
        values[slot * kv_dim..][..kv_dim].copy_from_slice(value);
        Ok(())
    }

    fn read_block(
        &mut self,
        block: BlockId,
        keys: &mut [f32],
        values: &mut [f32],
    ) -> Result<(), Self::Error> {
        let kv_dim = self.kv_dim;
        let (k, v) = self.block(block)?.split_at(KV_BLOCK_TOKENS * kv_dim);
        keys.copy_from_slice(k);
        values.copy_from_slice(v);
        Ok(())
    }
}

/// A failed step: the KV store or the expert source failed.
#[derive(Debug)]
pub enum StepError<K, X> {
    Kv(K),
    Expert(X),
}

impl<K: fmt::Display, X: fmt::Display> fmt::Display for StepError<K, X> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepError::Kv(e) => write!(f, "KV cache access failed: {e}"),
            StepError::Expert(e) => write!(f, "expert weight access failed: {e}"),
        }
    }
}

impl<K: fmt::Debug + fmt::Display, X: fmt::Debug + fmt::Display> std::error::Error
    for StepError<K, X>
{
}

/// Inputs of every step besides the sequence: the layer's shape and
/// weights, and the seed and scale that fix the prompt tokens.
#[derive(Clone, Copy, Debug)]
pub struct Layer<'a> {
    pub cfg: &'a ModelConfig,
    pub dense: &'a DenseWeights,
    pub seed: u64,
    pub scale: Scale,
}

impl Layer<'_> {
    fn prompt_input(&self, seq: &Sequence, position: usize) -> Vec<f32> {
        let (hash_id, offset) = seq.token_source(position, self.scale.hash_block_tokens());
        model::token_embedding(self.seed, hash_id, offset, self.cfg.hidden)
    }
}

/// Phase 1: writes the keys and values of the prompt tokens that sequence
/// `index` writes. Returns how many tokens it wrote.
pub fn write_prompt_kv<K: KvStore>(
    layer: Layer<'_>,
    plan: &SharingPlan,
    index: usize,
    seq: &Sequence,
    kv: &mut K,
) -> Result<usize, K::Error> {
    let blocks = &plan.sequences[index];
    let mut written = 0;
    for position in 0..seq.prompt_tokens {
        let (block, slot) = blocks.locate(position);
        if !plan.writes(index, block) {
            continue;
        }
        let x = layer.prompt_input(seq, position);
        let (key, value) = model::key_value(layer.cfg, layer.dense, &x);
        kv.write_token(block, slot, &key, &value)?;
        written += 1;
    }
    Ok(written)
}

/// Reads the keys and values of the first `tokens` tokens of a sequence.
pub fn gather<K: KvStore>(
    cfg: &ModelConfig,
    blocks: &SequenceBlocks,
    tokens: usize,
    kv: &mut K,
) -> Result<Context, K::Error> {
    let kv_dim = cfg.kv_dim();
    let mut ctx = Context {
        keys: Vec::with_capacity(tokens * kv_dim),
        values: Vec::with_capacity(tokens * kv_dim),
    };
    let mut keys = vec![0.0; KV_BLOCK_TOKENS * kv_dim];
    let mut values = vec![0.0; KV_BLOCK_TOKENS * kv_dim];

    for (index, &block) in blocks.table.iter().enumerate() {
        let first = index * KV_BLOCK_TOKENS;
        if first >= tokens {
            break;
        }
        kv.read_block(block, &mut keys, &mut values)?;
        let used = (tokens - first).min(KV_BLOCK_TOKENS) * kv_dim;
        ctx.keys.extend_from_slice(&keys[..used]);
        ctx.values.extend_from_slice(&values[..used]);
    }
    Ok(ctx)
}

/// Phase 2: runs the layer for the prompt tokens of the blocks sequence
/// `index` writes and for its last prompt token, whose output it returns.
/// Adds the routed tokens to `routing` and returns the number of
/// tokens run as the second value: [`prefill_route`], then [`run_experts`].
#[allow(clippy::too_many_arguments)]
pub fn prefill<K: KvStore, X: ExpertSource>(
    layer: Layer<'_>,
    plan: &SharingPlan,
    index: usize,
    seq: &Sequence,
    kv: &mut K,
    experts: &mut X,
    routing: &mut Routing,
) -> Result<(Vec<f32>, usize), StepError<K::Error, X::Error>> {
    let routed = prefill_route(layer, plan, index, seq, kv, routing).map_err(StepError::Kv)?;
    let computed = routed.len();
    let output = run_experts(routed, experts).map_err(StepError::Expert)?;
    Ok((output, computed))
}

/// Runs attention and the router for the tokens that [`prefill`] runs,
/// and returns them in position order, ready for their experts.
pub fn prefill_route<K: KvStore>(
    layer: Layer<'_>,
    plan: &SharingPlan,
    index: usize,
    seq: &Sequence,
    kv: &mut K,
    routing: &mut Routing,
) -> Result<Vec<Routed>, K::Error> {
    let blocks = &plan.sequences[index];
    let ctx = gather(layer.cfg, blocks, seq.prompt_tokens, kv)?;
    let last = seq.prompt_tokens - 1;
    let mut routed = Vec::new();

    for position in 0..seq.prompt_tokens {
        let (block, _) = blocks.locate(position);
        if position != last && !plan.writes(index, block) {
            continue;
        }
        let x = layer.prompt_input(seq, position);
        routed.push(model::route(layer.cfg, layer.dense, &ctx, position + 1, &x, routing));
    }
    Ok(routed)
}

/// Runs the experts of routed tokens in order and returns the output of
/// the last one; empty when there is none.
pub fn run_experts<X: ExpertSource>(routed: Vec<Routed>, experts: &mut X) -> Result<Vec<f32>, X::Error> {
    let mut output = Vec::new();
    for token in routed {
        output = model::apply_experts(token, experts)?;
    }
    Ok(output)
}

/// Phase 3: appends the token that follows `previous` (the sequence's last
/// output) at `position`, and returns the layer's output for it:
/// [`decode_route`], then its experts.
pub fn decode<K: KvStore, X: ExpertSource>(
    layer: Layer<'_>,
    blocks: &SequenceBlocks,
    position: usize,
    previous: &[f32],
    kv: &mut K,
    experts: &mut X,
    routing: &mut Routing,
) -> Result<Vec<f32>, StepError<K::Error, X::Error>> {
    let routed = decode_route(layer, blocks, position, previous, kv, routing).map_err(StepError::Kv)?;
    model::apply_experts(routed, experts).map_err(StepError::Expert)
}

/// Writes the key and value of the token that follows `previous` at
/// `position`, and runs attention and the router for it.
pub fn decode_route<K: KvStore>(
    layer: Layer<'_>,
    blocks: &SequenceBlocks,
    position: usize,
    previous: &[f32],
    kv: &mut K,
    routing: &mut Routing,
) -> Result<Routed, K::Error> {
    let x = model::next_input(previous);
    let (key, value) = model::key_value(layer.cfg, layer.dense, &x);
    let (block, slot) = blocks.locate(position);
    kv.write_token(block, slot, &key, &value)?;

    let ctx = gather(layer.cfg, blocks, position + 1, kv)?;
    Ok(model::route(layer.cfg, layer.dense, &ctx, position + 1, &x, routing))
}
