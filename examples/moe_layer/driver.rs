//! The distributed run: the same batch as the reference, with weights and
//! KV blocks in a meshmem pool spread over the node processes of a mesh.
//!
//! NOTE: this module is not compiled yet (`main.rs` declares it under
//! `#[cfg(any())]`), because it is written against the pool API that the
//! crate does not export yet. Names may need adjusting when it lands; the
//! calls it makes are listed in `README.md` beside this file.
//!
//! Phases, every node running all of them:
//!
//! 1. Join the pool. Node 0 generates the weights, allocates each tensor
//!    and each expert with `--placement`, writes them, and allocates one
//!    reference count per KV block. It broadcasts the addresses.
//! 2. Sequences are owned round-robin. Each node allocates the KV blocks its
//!    sequences write with `Placement::Nearest(own coordinate)`, which
//!    spills to the next-nearest node when full, and all-gathers their
//!    addresses. Every user of a block adds 1 to its count.
//! 3. Prefill: each node writes its prompt keys and values, waits at a
//!    barrier for the writers of shared blocks, then runs its tokens.
//! 4. Decode: one step per `--steps`, a barrier after each for the timing.
//! 5. Each node writes its final hidden states to pool memory; node 0
//!    gathers them, computes the reference itself and compares bit for bit.
//! 6. Report, then release: each user subtracts 1 from every block's count,
//!    and the node that drops a count to 0 frees the block.

use std::time::Instant;

use meshmem::{Config, GlobalAddr, NodeId, Placement, Pool};

use crate::cli::{Args, PlacementChoice};
use crate::model::{DenseWeights, ExpertSource, ExpertWeights, ModelConfig, Weights};
use crate::prefix::{BlockId, SharingPlan};
use crate::reference::{self, RunOutput, Timings};
use crate::report::{self, NodeHoldings, TrafficSummary};
use crate::sequence::{self, block_values, KvStore, Layer, Workload, KV_BLOCK_TOKENS};

/// Page size assumed when looking up which node homes each page of an
/// allocation for the report: the pool's 2 MiB default.
const REPORT_PAGE_BYTES: u64 = 2 << 20;

/// Returns whether this process was started as a node by a launcher, which
/// sets `RANK`.
pub fn is_node() -> bool {
    std::env::var_os("RANK").is_some()
}

/// Starts `args.mesh.len()` copies of this program as the nodes of a group
/// and waits for them.
pub fn launch(args: &Args) -> meshmem::Result<()> {
    let program = std::env::current_exe()
        .map_err(|e| meshmem::Error::Launch { reason: "cannot find this program".into(), source: Some(e) })?;
    let spec = meshmem::launch::LaunchSpec {
        mesh: args.mesh,
        program,
        args: std::env::args_os().skip(1).collect(),
        ..Default::default()
    };
    meshmem::launch::launch(&spec)
}

/// Maps `--placement` onto the pool's policy for weights written by node 0.
fn placement(choice: PlacementChoice, pool: &Pool) -> meshmem::Result<Placement> {
    Ok(match choice {
        PlacementChoice::Local => Placement::Local,
        PlacementChoice::Node(node) => Placement::Node(node),
        PlacementChoice::Nearest => Placement::Nearest(pool.mesh().coord(pool.node())?),
        PlacementChoice::Balanced => Placement::Balanced,
        PlacementChoice::Interleave => {
            Placement::Interleave { nodes: pool.mesh().nodes().collect(), pages_per_stripe: 1 }
        }
    })
}

/// Addresses of everything node 0 allocates, as broadcast to every node.
struct WeightAddrs {
    dense: Vec<GlobalAddr>,
    experts: Vec<GlobalAddr>,
    /// One `u64` user count per KV block of the plan.
    ref_counts: GlobalAddr,
}

impl WeightAddrs {
    fn encode(&self) -> Vec<u8> {
        let words: Vec<u64> = self
            .dense
            .iter()
            .chain(&self.experts)
            .chain(std::iter::once(&self.ref_counts))
            .map(|a| a.0)
            .collect();
        le_bytes(&words)
    }

    fn decode(bytes: &[u8], experts: usize) -> Option<Self> {
        let words = words(bytes)?;
        let dense_len = 7;
        if words.len() != dense_len + experts + 1 {
            return None;
        }
        Some(WeightAddrs {
            dense: words[..dense_len].iter().map(|&w| GlobalAddr(w)).collect(),
            experts: words[dense_len..dense_len + experts].iter().map(|&w| GlobalAddr(w)).collect(),
            ref_counts: GlobalAddr(words[dense_len + experts]),
        })
    }
}

/// KV blocks in pool memory, read and written through the pool so that
/// every byte is counted by source and destination.
struct PoolKv<'a> {
    pool: &'a Pool,
    blocks: Vec<GlobalAddr>,
    kv_dim: usize,
}

impl KvStore for PoolKv<'_> {
    type Error = meshmem::Error;

    fn write_token(&mut self, block: BlockId, slot: usize, key: &[f32], value: &[f32]) -> meshmem::Result<()> {
        let base = self.blocks[block.index()].0;
        let row = (self.kv_dim * 4) as u64;
        let values_offset = KV_BLOCK_TOKENS as u64 * row;
        self.pool.write_slice(GlobalAddr(base + slot as u64 * row), key)?;
        self.pool.write_slice(GlobalAddr(base + values_offset + slot as u64 * row), value)
    }

    fn read_block(&mut self, block: BlockId, keys: &mut [f32], values: &mut [f32]) -> meshmem::Result<()> {
        let base = self.blocks[block.index()].0;
        let values_offset = (KV_BLOCK_TOKENS * self.kv_dim * 4) as u64;
        self.pool.read_slice(GlobalAddr(base), keys)?;
        self.pool.read_slice(GlobalAddr(base + values_offset), values)
    }
}

/// Experts read from pool memory on first use and kept for the run.
///
/// NOTE: because experts are kept, the traffic report counts each expert
/// once per node that uses it, not once per token routed to it.
struct PoolExperts<'a> {
    pool: &'a Pool,
    cfg: &'a ModelConfig,
    addrs: &'a [GlobalAddr],
    cache: Vec<Option<ExpertWeights>>,
}

impl ExpertSource for PoolExperts<'_> {
    type Error = meshmem::Error;

    fn expert(&mut self, expert: usize) -> meshmem::Result<&ExpertWeights> {
        if self.cache[expert].is_none() {
            let mut data = vec![0.0f32; ExpertWeights::len(self.cfg)];
            self.pool.read_slice(self.addrs[expert], &mut data)?;
            self.cache[expert] = ExpertWeights::from_data(self.cfg, data);
        }
        Ok(self.cache[expert].as_ref().expect("filled above with a buffer of the right length"))
    }
}

/// Runs this node's part of the batch. Node 0 prints the comparison and
/// the report; it returns `Ok(false)` if the results differ.
pub fn run_node(args: &Args, cfg: &ModelConfig, workload: &Workload, plan: &SharingPlan) -> meshmem::Result<bool> {
    // Phase 1: join, and place the weights from node 0.
    let pool = Pool::join(Config::from_env()?)?;
    let me = pool.node();
    let nodes = pool.size();
    let root = NodeId(0);
    let mut addrs_bytes = Vec::new();
    if me == root {
        let weights = Weights::generate(cfg, workload.seed);
        let policy = placement(args.placement, &pool)?;
        let mut dense = Vec::new();
        for (_, tensor) in weights.dense.tensors() {
            let slice = pool.alloc_slice::<f32>(tensor.len(), policy.clone())?;
            pool.write_slice(slice.addr(), tensor)?;
            dense.push(slice.addr());
        }
        let mut experts = Vec::new();
        for expert in &weights.experts {
            let slice = pool.alloc_slice::<f32>(expert.data.len(), policy.clone())?;
            pool.write_slice(slice.addr(), &expert.data)?;
            experts.push(slice.addr());
        }
        let counts = pool.alloc_slice::<u64>(plan.blocks(), Placement::Local)?;
        pool.write_slice(counts.addr(), &vec![0u64; plan.blocks()])?;
        addrs_bytes = WeightAddrs { dense, experts, ref_counts: counts.addr() }.encode();
    }
    let addrs_bytes = pool.broadcast(root, &addrs_bytes)?;
    let addrs = WeightAddrs::decode(&addrs_bytes, cfg.experts).ok_or_else(|| meshmem::Error::Collective {
        op: "broadcast",
        reason: format!("weight addresses of {} bytes do not match {} experts", addrs_bytes.len(), cfg.experts),
        source: None,
    })?;

    let mut dense = DenseWeights::zeroed(cfg);
    for (tensor, &addr) in dense.tensors_mut().into_iter().zip(&addrs.dense) {
        pool.read_slice(addr, tensor)?;
    }

    // Phase 2: KV blocks near their writer's owner, and the user counts.
    let mine: Vec<usize> = (0..workload.sequences.len()).filter(|&s| report::owner(s, nodes) == me).collect();
    let near_me = Placement::Nearest(pool.mesh().coord(me)?);
    let mut my_blocks: Vec<u64> = Vec::new();
    for (block, &writer) in plan.writer.iter().enumerate() {
        if report::owner(writer, nodes) == me {
            let slice = pool.alloc_slice::<f32>(block_values(cfg), near_me.clone())?;
            my_blocks.extend([block as u64, slice.addr().0]);
        }
    }
    let mut block_addrs = vec![GlobalAddr(0); plan.blocks()];
    for bytes in pool.all_gather(&le_bytes(&my_blocks))? {
        let words = words(&bytes).ok_or_else(|| meshmem::Error::Collective {
            op: "all_gather",
            reason: format!("block address list of {} bytes is not whole u64 words", bytes.len()),
            source: None,
        })?;
        for pair in words.chunks_exact(2) {
            block_addrs[pair[0] as usize] = GlobalAddr(pair[1]);
        }
    }
    let count_addr = |block: BlockId| GlobalAddr(addrs.ref_counts.0 + block.0 as u64 * 8);
    for &s in &mine {
        for &block in &plan.sequences[s].table {
            pool.fetch_add_u64(count_addr(block), 1)?;
        }
    }

    // Phase 3: prefill.
    let layer = Layer { cfg, dense: &dense, seed: workload.seed, scale: workload.scale };
    let mut kv = PoolKv { pool: &pool, blocks: block_addrs.clone(), kv_dim: cfg.kv_dim() };
    let mut experts = PoolExperts { pool: &pool, cfg, addrs: &addrs.experts, cache: vec![None; cfg.experts] };
    let mut out = RunOutput {
        hidden_states: vec![Vec::new(); workload.sequences.len()],
        expert_tokens: vec![0; cfg.experts],
        computed_tokens: 0,
        written_prompt_tokens: 0,
    };
    let mut timings = Timings::default();
    let step_error = |e: sequence::StepError<meshmem::Error, meshmem::Error>| match e {
        sequence::StepError::Kv(e) | sequence::StepError::Expert(e) => e,
    };

    let started = Instant::now();
    for &s in &mine {
        out.written_prompt_tokens += sequence::write_prompt_kv(layer, plan, s, &workload.sequences[s], &mut kv)? as u64;
    }
    pool.barrier()?;
    for &s in &mine {
        let (last, computed) = sequence::prefill(layer, plan, s, &workload.sequences[s], &mut kv, &mut experts, &mut out.expert_tokens)
            .map_err(step_error)?;
        out.hidden_states[s] = last;
        out.computed_tokens += computed as u64;
    }
    pool.barrier()?;
    timings.prefill = started.elapsed();

    // Phase 4: decode.
    for step in 0..workload.steps {
        let started = Instant::now();
        for &s in &mine {
            let states = &mut out.hidden_states[s];
            let previous = states[states.len() - cfg.hidden..].to_vec();
            let position = workload.sequences[s].prompt_tokens + step;
            let row = sequence::decode(layer, &plan.sequences[s], position, &previous, &mut kv, &mut experts, &mut out.expert_tokens)
                .map_err(step_error)?;
            states.extend_from_slice(&row);
            out.computed_tokens += 1;
        }
        pool.barrier()?;
        timings.steps.push(started.elapsed());
    }

    // Phase 5: gather the hidden states through pool memory.
    let row_values = (workload.steps + 1) * cfg.hidden;
    let mut my_outputs: Vec<u64> = Vec::new();
    for &s in &mine {
        let slice = pool.alloc_slice::<f32>(row_values, Placement::Local)?;
        pool.write_slice(slice.addr(), &out.hidden_states[s])?;
        my_outputs.extend([s as u64, slice.addr().0]);
    }
    let gathered = pool.all_gather(&le_bytes(&my_outputs))?;
    let mut equal = true;
    if me == root {
        let mut distributed = vec![vec![0.0f32; row_values]; workload.sequences.len()];
        for bytes in &gathered {
            let words = words(bytes).unwrap_or_default();
            for pair in words.chunks_exact(2) {
                pool.read_slice(GlobalAddr(pair[1]), &mut distributed[pair[0] as usize])?;
            }
        }
        let weights = Weights::generate(cfg, workload.seed);
        let (expected, _) = reference::run(cfg, &weights, workload, plan).map_err(|e| meshmem::Error::Collective {
            op: "reference",
            reason: e.to_string(),
            source: None,
        })?;
        let comparison = reference::compare(&expected.hidden_states, &distributed);
        equal = comparison.equal();
        println!("equal: {equal} ({} values compared)", comparison.compared);
        if let Some((seq, index, want, got)) = comparison.first_mismatch {
            println!("first difference: sequence {seq}, value {index}: reference {want:e}, distributed {got:e}");
        }
    }

    // Phase 6: report from node 0, then release the KV blocks.
    // Per node: tokens per expert, then tokens computed, then prompt
    // tokens written.
    let mut counts = out.expert_tokens.clone();
    counts.extend([out.computed_tokens, out.written_prompt_tokens]);
    let all_counts = pool.all_gather(&le_bytes(&counts))?;
    if me == root {
        print_report(&pool, cfg, &addrs, &block_addrs, &all_counts, &timings)?;
    }
    pool.barrier()?;
    for &s in &mine {
        for &block in &plan.sequences[s].table {
            let before = pool.fetch_add_u64(count_addr(block), u64::MAX)?;
            if before == 1 {
                pool.free(block_addrs[block.index()])?;
            }
        }
    }
    pool.barrier()?;
    Ok(equal)
}

fn print_report(
    pool: &Pool,
    cfg: &ModelConfig,
    addrs: &WeightAddrs,
    block_addrs: &[GlobalAddr],
    all_counts: &[Vec<u8>],
    timings: &Timings,
) -> meshmem::Result<()> {
    let mesh = pool.mesh();
    let mut rows: Vec<NodeHoldings> = mesh
        .nodes()
        .map(|node| NodeHoldings { node, coord: mesh.coord(node).map(|c| c.to_string()).unwrap_or_default(), ..Default::default() })
        .collect();

    let dense_lens = DenseWeights::zeroed(cfg).tensors().map(|(_, t)| t.len() as u64 * 4);
    for (&addr, len) in addrs.dense.iter().zip(dense_lens) {
        for (node, bytes) in homes(pool, addr, len)? {
            rows[node.index()].dense_bytes += bytes;
        }
    }
    for (expert, &addr) in addrs.experts.iter().enumerate() {
        for (node, bytes) in homes(pool, addr, cfg.expert_bytes())? {
            let row = &mut rows[node.index()];
            row.expert_bytes += bytes;
            row.experts.push(expert);
        }
    }
    for &addr in block_addrs {
        let node = pool.home_of(addr)?;
        rows[node.index()].kv_blocks += 1;
        rows[node.index()].kv_bytes += report::block_bytes(cfg);
    }
    report::print_holdings(&rows);

    let stats = pool.stats()?;
    let summary = TrafficSummary::from_matrix(&mesh, &stats.traffic).map_err(|reason| meshmem::Error::Collective {
        op: "stats",
        reason,
        source: None,
    })?;
    report::print_traffic(&summary, &stats.traffic);

    let mut totals = vec![0u64; cfg.experts + 2];
    for bytes in all_counts {
        let counts = words(bytes).unwrap_or_default();
        for (total, count) in totals.iter_mut().zip(&counts) {
            *total += count;
        }
    }
    let out = RunOutput {
        hidden_states: Vec::new(),
        expert_tokens: totals[..cfg.experts].to_vec(),
        computed_tokens: totals[cfg.experts],
        written_prompt_tokens: totals[cfg.experts + 1],
    };
    report::print_run("distributed", &out, timings);
    Ok(())
}

/// Encodes `u64` words little-endian for a collective.
fn le_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Decodes little-endian `u64` words from collective output, whose `Vec<u8>`
/// is not aligned for a cast; `None` if the length is not a multiple of 8.
fn words(bytes: &[u8]) -> Option<Vec<u64>> {
    if bytes.len() % 8 != 0 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 8);
    for chunk in bytes.chunks_exact(8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        out.push(u64::from_le_bytes(word));
    }
    Some(out)
}

/// Returns the bytes of `[addr, addr + len)` homed on each node, probing
/// one address per page.
fn homes(pool: &Pool, addr: GlobalAddr, len: u64) -> meshmem::Result<Vec<(NodeId, u64)>> {
    let mut out: Vec<(NodeId, u64)> = Vec::new();
    let mut offset = 0;
    while offset < len {
        let node = pool.home_of(GlobalAddr(addr.0 + offset))?;
        let page_end = ((addr.0 + offset) / REPORT_PAGE_BYTES + 1) * REPORT_PAGE_BYTES - addr.0;
        let bytes = page_end.min(len) - offset;
        match out.iter_mut().find(|(n, _)| *n == node) {
            Some((_, total)) => *total += bytes,
            None => out.push((node, bytes)),
        }
        offset += bytes;
    }
    Ok(out)
}
