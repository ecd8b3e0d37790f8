//! The distributed run: the same batch as the reference, with weights and
//! KV blocks in a meshmem pool spread over the node processes of a mesh.
//!
//! Phases, every node running all of them:
//!
//! 1. Join the pool. Node 0 generates the weights, allocates each dense
//!    tensor and each expert with `--placement`, writes them, and allocates
//!    one reference count per KV block and one load counter per expert and
//!    step. It broadcasts the addresses, and every node reads the dense
//!    weights into its own memory.
//! 2. Sequences are owned round-robin. Each node allocates an output row
//!    buffer per sequence it owns on itself, then, taking turns by node id,
//!    the KV blocks its sequences write with `Placement::Nearest(own
//!    coordinate)`, which spills to the next-nearest node when full. Taking
//!    turns makes the placement the same on every run. The addresses are
//!    all-gathered, and every user of a block adds 1 to its count with a
//!    `fetch_add` on node 0's memory.
//! 3. Prefill: each node writes its prompt keys and values, waits at a
//!    barrier for the writers of shared blocks, then runs its tokens. Each
//!    step routes all of a node's tokens and adds them to the step's load
//!    counters before any expert runs.
//! 4. Decode: one step per `--steps`, a barrier after each for the timing.
//! 5. Each node writes its final hidden states to pool memory; node 0 reads
//!    them, computes the reference itself and compares bit for bit.
//!    Phases 3 to 5 run once more for each mode that `--replicate-hot` and
//!    `--prefetch` add ([`Mode`]), and node 0 prints a table of the modes.
//! 6. Report, then release. Each user subtracts 1 from every block's
//!    count, and the node that drops a count to 0 frees the block. Node 0
//!    frees the weights and checks that only slab pages stay in use.
//!
//! Every weight and cache access goes through `Pool::read_slice` and
//! `Pool::write_slice`, which count bytes by source and destination node.
//! On the shared-memory backend a plain load through a mapped page would
//! move the same bytes without being counted.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytemuck::Pod;
use meshmem::launch::{LaunchReport, LaunchSpec};
use meshmem::pool::Prefetch;
use meshmem::{Advice, Config, GlobalAddr, LinkModel, NodeId, Placement, Pool};

use crate::balance;
use crate::cli::{Args, PlacementChoice};
use crate::model::{DenseWeights, ExpertSource, ExpertWeights, ModelConfig, Routing, Weights, F32_BYTES};
use crate::prefix::{BlockId, SharingPlan, KV_BLOCK_TOKENS};
use crate::reference::{self, Comparison, RunOutput, Timings};
use crate::report::{self, format_bytes, ModeRow, NodeHoldings, TrafficSummary};
use crate::sequence::{self, block_values, KvStore, Layer, Workload};

/// The pool's default page size, the largest this example picks.
const MAX_PAGE_BYTES: u64 = 2 << 20;

/// The smallest page size the pool accepts, the x86-64 base page.
const MIN_PAGE_BYTES: u64 = 4096;

/// Error of one node's run.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A pool call failed; `context` describes what the node was doing.
    #[error("{context}: {source}")]
    Pool {
        context: String,
        #[source]
        source: meshmem::Error,
    },

    /// Data from another node or from pool memory is not what this node
    /// expects.
    #[error("{0}")]
    Invalid(String),

    /// The node failed after joining and has already written its error.
    #[error("the node failed; its error is written above")]
    Reported,
}

/// How long a node whose collective failed waits before it writes its
/// error and exits. A collective fails on every node once one node dies,
/// and the launcher names the first node that exits non-zero and stops the
/// others. The wait lets it name the node that failed first, and is
/// shorter than the launcher's grace period, `meshmem::launch::DEFAULT_GRACE`.
const COLLECTIVE_FAILURE_WAIT: Duration = Duration::from_secs(2);

type Result<T> = std::result::Result<T, NodeError>;

/// Adds what the node was doing to a pool error.
trait Context<T> {
    fn context(self, describe: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for meshmem::Result<T> {
    fn context(self, describe: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| NodeError::Pool { context: describe(), source })
    }
}

/// Returns the page size for `cfg`: the smallest power of two that holds
/// one KV block, from 4 KiB to 2 MiB. Each KV block is then one page, so
/// that `Placement::Nearest` places and spills blocks one by one.
pub fn page_size(cfg: &ModelConfig) -> u64 {
    report::block_bytes(cfg).next_power_of_two().clamp(MIN_PAGE_BYTES, MAX_PAGE_BYTES)
}

/// Returns whether an allocation of `bytes` comes from a slab page rather
/// than whole pages. Slab pages stay in use after their blocks are freed.
fn is_slab_sized(bytes: u64, align: usize, page: u64) -> bool {
    meshmem::alloc::slab::class_of(bytes as usize, align, page).is_some()
}

/// Returns the whole pages an allocation of `bytes` takes; 0 for slab-sized
/// ones, which share pages.
fn whole_pages(bytes: u64, page: u64) -> u64 {
    if is_slab_sized(bytes, std::mem::align_of::<u64>(), page) {
        0
    } else {
        bytes.div_ceil(page)
    }
}

/// Bytes of each dense tensor, in the order of [`DenseWeights::tensors`].
fn dense_tensor_bytes(cfg: &ModelConfig) -> [u64; 7] {
    let (h, q, kv) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
    [h, q * h, kv * h, kv * h, h * q, h, cfg.experts * h].map(|values| values as u64 * F32_BYTES)
}

/// Returns the default node capacity in bytes: the weight pages that
/// `choice` puts on its busiest node, twice an even share of the KV
/// blocks, the reference counts and output rows, and room for slab pages.
/// The total over all nodes holds everything, but a node whose sequences
/// write more than that share of the KV blocks spills to its neighbours.
/// With `replicas`, each node also gets room for a replica of every expert.
pub fn default_node_capacity(
    cfg: &ModelConfig,
    choice: PlacementChoice,
    nodes: usize,
    plan: &SharingPlan,
    steps: usize,
    replicas: bool,
) -> u64 {
    let page = page_size(cfg);
    let nodes = nodes as u64;
    let expert = whole_pages(cfg.expert_bytes(), page);
    let dense = dense_tensor_bytes(cfg).map(|bytes| whole_pages(bytes, page));
    let dense_spread: u64 = dense.iter().map(|p| p.div_ceil(nodes)).sum();
    let experts = cfg.experts as u64;
    let weights = match choice {
        PlacementChoice::ExpertParallel => experts.div_ceil(nodes) * expert + dense_spread,
        PlacementChoice::Interleave | PlacementChoice::Balanced => experts * expert.div_ceil(nodes) + dense_spread,
        PlacementChoice::Local | PlacementChoice::Node(_) | PlacementChoice::Nearest => {
            experts * expert + dense.iter().sum::<u64>()
        }
    };

    let blocks = plan.blocks() as u64;
    let kv = 2 * blocks.div_ceil(nodes) * whole_pages(report::block_bytes(cfg), page).max(1);
    let ref_counts = whole_pages(blocks * 8, page);
    let sequences = plan.sequences.len() as u64;
    let outputs = sequences.div_ceil(nodes) * whole_pages(output_values(cfg, steps) as u64 * F32_BYTES, page);
    // Each node process keeps its own slab pages, on whichever node its
    // small allocations go to: one per process and size class is the most
    // this run creates on one node, plus a few for the size classes.
    let slabs = nodes + 4;
    let replica_room = if replicas { experts * expert } else { 0 };
    (weights + kv + ref_counts + outputs + slabs + replica_room) * page
}

/// Values of one sequence's output: the row of its last prompt token and
/// one row per decode step.
fn output_values(cfg: &ModelConfig, steps: usize) -> usize {
    (steps + 1) * cfg.hidden
}

/// Starts `args.mesh.len()` copies of this program, with the same
/// arguments, as the nodes of a group, and waits for them. Node output goes
/// straight to this process's stdout and stderr, without the launcher's
/// per-line prefix, so that node 0's report reads as one block.
pub fn launch(args: &Args, node_capacity: u64, page: u64) -> meshmem::Result<LaunchReport> {
    let program = std::env::current_exe().map_err(|e| meshmem::Error::Launch {
        reason: "cannot find the path of this program to start it on every node".into(),
        source: Some(e),
    })?;
    let mut spec = LaunchSpec::new(args.mesh, program);
    spec.args = std::env::args_os().skip(1).collect();
    spec.env = vec![
        ("MESHMEM_NODE_CAPACITY".into(), node_capacity.to_string().into()),
        ("MESHMEM_PAGE_SIZE".into(), page.to_string().into()),
    ];
    spec.prefix_output = false;
    meshmem::launch::supervise(&spec)
}

/// Maps `--placement` onto the pool's policy for one weight tensor that
/// node 0 writes; `expert` is the expert's index, `None` for a dense
/// tensor.
fn placement(choice: PlacementChoice, pool: &Pool, expert: Option<usize>) -> Placement {
    let mesh = pool.mesh();
    match choice {
        PlacementChoice::ExpertParallel => match expert {
            Some(e) => Placement::Node(NodeId((e % pool.size()) as u16)),
            None => Placement::interleave_all(&mesh),
        },
        PlacementChoice::Local => Placement::Local,
        PlacementChoice::Node(node) => Placement::Node(node),
        PlacementChoice::Nearest => Placement::Nearest(pool.coord()),
        PlacementChoice::Balanced => Placement::Balanced,
        PlacementChoice::Interleave => Placement::interleave_all(&mesh),
    }
}

/// Allocates through a pool and remembers the slab pages its small
/// allocations landed in, which the allocator keeps after they are freed.
struct Allocator<'a> {
    pool: &'a Pool,
    /// `(home node, page address)` of each slab page used.
    slab_pages: BTreeSet<(u16, u64)>,
}

impl<'a> Allocator<'a> {
    fn new(pool: &'a Pool) -> Self {
        Allocator { pool, slab_pages: BTreeSet::new() }
    }

    fn alloc<T: Pod>(&mut self, len: usize, placement: Placement) -> meshmem::Result<GlobalAddr> {
        let addr = self.pool.alloc_slice::<T>(len, placement)?.addr();
        let page = self.pool.page_size() as u64;
        let bytes = (len * std::mem::size_of::<T>()) as u64;
        if is_slab_sized(bytes, std::mem::align_of::<T>(), page) {
            let home = self.pool.home_of(addr)?;
            self.slab_pages.insert((home.0, addr.0 / page * page));
        }
        Ok(addr)
    }
}

/// Addresses of everything node 0 allocates, as broadcast to every node.
struct WeightAddrs {
    dense: Vec<GlobalAddr>,
    experts: Vec<GlobalAddr>,
    /// One `u64` user count per KV block of the plan.
    ref_counts: GlobalAddr,
    /// One `u64` load counter per expert and step, step-major: the tokens
    /// of the whole batch routed to each expert in the prefill (step 0)
    /// and in each decode step.
    load_counters: GlobalAddr,
}

/// Number of dense tensors, as [`DenseWeights::tensors`] lists them.
const DENSE_TENSORS: usize = 7;

impl WeightAddrs {
    fn encode(&self) -> Vec<u8> {
        let words: Vec<u64> =
            self.dense.iter().chain(&self.experts).chain([&self.ref_counts, &self.load_counters]).map(|a| a.0).collect();
        le_bytes(&words)
    }

    fn decode(bytes: &[u8], experts: usize) -> Result<Self> {
        let words = words(bytes, "weight addresses")?;
        if words.len() != DENSE_TENSORS + experts + 2 {
            return Err(NodeError::Invalid(format!(
                "node 0 broadcast {} weight addresses, expected {} for {DENSE_TENSORS} dense tensors, \
                 {experts} experts, the reference counts and the load counters; every node must run the \
                 same build and options",
                words.len(),
                DENSE_TENSORS + experts + 2
            )));
        }
        let addr = |w: &u64| GlobalAddr(*w);
        Ok(WeightAddrs {
            dense: words[..DENSE_TENSORS].iter().map(addr).collect(),
            experts: words[DENSE_TENSORS..DENSE_TENSORS + experts].iter().map(addr).collect(),
            ref_counts: GlobalAddr(words[DENSE_TENSORS + experts]),
            load_counters: GlobalAddr(words[DENSE_TENSORS + experts + 1]),
        })
    }

    fn count_addr(&self, block: BlockId) -> GlobalAddr {
        self.ref_counts.add(block.0 as u64 * 8)
    }

    /// Address of the load counter of `expert` in `step`, out of `experts`.
    fn load_addr(&self, step: usize, expert: usize, experts: usize) -> GlobalAddr {
        self.load_counters.add(((step * experts + expert) * 8) as u64)
    }
}

/// KV blocks in pool memory, read and written through the pool so that
/// every byte is counted by source and destination.
struct PoolKv<'a> {
    pool: &'a Pool,
    blocks: &'a [GlobalAddr],
    kv_dim: usize,
}

impl PoolKv<'_> {
    /// Bytes of the keys of one block, after which its values start.
    fn keys_bytes(&self) -> u64 {
        (KV_BLOCK_TOKENS * self.kv_dim) as u64 * F32_BYTES
    }
}

impl KvStore for PoolKv<'_> {
    type Error = meshmem::Error;

    fn write_token(&mut self, block: BlockId, slot: usize, key: &[f32], value: &[f32]) -> meshmem::Result<()> {
        let base = self.blocks[block.index()];
        let row = (slot * self.kv_dim) as u64 * F32_BYTES;
        self.pool.write_slice(base.add(row), key)?;
        self.pool.write_slice(base.add(self.keys_bytes() + row), value)
    }

    fn read_block(&mut self, block: BlockId, keys: &mut [f32], values: &mut [f32]) -> meshmem::Result<()> {
        let base = self.blocks[block.index()];
        self.pool.read_slice(base, keys)?;
        self.pool.read_slice(base.add(self.keys_bytes()), values)
    }
}

/// Experts read from pool memory each time a token is routed to them, into
/// one buffer, so that the traffic counts the weight bytes every routed
/// token reads and a node never keeps more than one expert in memory.
struct PoolExperts<'a> {
    pool: &'a Arc<Pool>,
    addrs: &'a [GlobalAddr],
    expert_bytes: usize,
    buffer: ExpertWeights,
    /// Present in the prefetch mode.
    prefetch: Option<Prefetcher>,
}

impl ExpertSource for PoolExperts<'_> {
    type Error = meshmem::Error;

    fn expert(&mut self, expert: usize) -> meshmem::Result<&ExpertWeights> {
        if let Some(prefetch) = &mut self.prefetch {
            prefetch.start(self.pool, self.addrs[expert], self.expert_bytes, expert)?;
        }
        self.pool.read_slice(self.addrs[expert], &mut self.buffer.data)?;
        Ok(&self.buffer)
    }
}

/// Background replication of the experts a node routes to, for the next
/// step, whose routing is predicted to be the current one's. From the
/// first token a node routes to an expert in a run, a [`Prefetch`] copies
/// the expert to the node while the node goes on computing.
/// [`Prefetcher::finish`] waits for the copies before the next step
/// starts. Every expert is read-mostly in this mode, so a prefetch makes a
/// replica and leaves the home where it is.
struct Prefetcher {
    /// Per expert: whether a prefetch was started in this run, or whether
    /// the expert is homed here and needs none.
    requested: Vec<bool>,
    in_flight: Vec<Prefetch>,
    started: u64,
    waited: Duration,
}

impl Prefetcher {
    fn new(local_experts: &[bool]) -> Self {
        Prefetcher { requested: local_experts.to_vec(), in_flight: Vec::new(), started: 0, waited: Duration::ZERO }
    }

    /// Starts copying `expert` to this node unless it was requested before.
    fn start(&mut self, pool: &Arc<Pool>, addr: GlobalAddr, len: usize, expert: usize) -> meshmem::Result<()> {
        if std::mem::replace(&mut self.requested[expert], true) {
            return Ok(());
        }
        self.in_flight.push(pool.prefetch(addr, len, pool.node())?);
        self.started += 1;
        Ok(())
    }

    /// Waits for every copy started in this step.
    fn finish(&mut self) -> meshmem::Result<()> {
        let started = Instant::now();
        for mut handle in self.in_flight.drain(..) {
            handle.wait()?;
        }
        self.waited += started.elapsed();
        Ok(())
    }
}

/// The way a run of the layer reaches expert weights that are homed on
/// other nodes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    /// Every read goes to the expert's home.
    Plain,
    /// In each step, after routing, the experts whose load over the whole
    /// batch exceeds this factor times the mean are made read-mostly. Each
    /// node that routed at least an even share of their tokens prefetches
    /// them before any expert runs. The pool also replicates a read-mostly
    /// page on the first read by any other node.
    ReplicateHot(f64),
    /// Every expert is read-mostly, and each node replicates the experts it
    /// routes to in the background while it computes ([`Prefetcher`]).
    Prefetch,
}

impl Mode {
    /// Returns the plain run, then the modes the options request.
    fn requested(args: &Args) -> Vec<Mode> {
        let mut modes = vec![Mode::Plain];
        modes.extend(args.replicate_hot.map(Mode::ReplicateHot));
        if args.prefetch {
            modes.push(Mode::Prefetch);
        }
        modes
    }

    fn label(&self) -> String {
        match self {
            Mode::Plain => "no replication".into(),
            Mode::ReplicateHot(factor) => format!("replicate-hot {factor}"),
            Mode::Prefetch => "prefetch".into(),
        }
    }
}

/// Inputs that every run of the layer shares, the same in every mode.
struct LayerRun<'a> {
    pool: &'a Arc<Pool>,
    cfg: &'a ModelConfig,
    workload: &'a Workload,
    plan: &'a SharingPlan,
    dense: &'a DenseWeights,
    addrs: &'a WeightAddrs,
    block_addrs: &'a [GlobalAddr],
    /// Sequences this node owns.
    mine: &'a [usize],
    /// Per expert: whether every page of it is homed on this node.
    local_experts: Vec<bool>,
}

/// State that one run of the layer carries from step to step on a node.
struct StepState<'a> {
    kv: PoolKv<'a>,
    experts: PoolExperts<'a>,
    routing: Routing,
    /// Per sequence this node owns, the output rows so far.
    hidden_states: Vec<Vec<f32>>,
    counts: NodeCounts,
    /// Per expert: whether it is read-mostly in this run.
    advised: Vec<bool>,
}

/// Replicas of experts over all nodes, as node 0 counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Replicas {
    /// Pairs of an expert and a node holding a replica of its first page.
    experts: u64,
    /// Bytes of frames holding replicas at the end of the run.
    bytes: u64,
    /// Bytes of frames still holding replicas after the advice was unset.
    left: u64,
}

/// One node's result of one run of the layer.
struct ModeRun {
    hidden_states: Vec<Vec<f32>>,
    counts: NodeCounts,
    timings: Timings,
    /// Node 0 only: the pool traffic of the run, by source and home node.
    traffic: Option<Vec<Vec<u64>>>,
    /// Node 0 only: the replicas at the end of the run.
    replicas: Option<Replicas>,
    /// Wall time of the prefill and the decode steps on this node,
    /// barriers and replication included.
    wall: Duration,
}

impl LayerRun<'_> {
    /// Runs the prefill and the decode steps of this node's sequences in
    /// `mode`, then drops the replicas the mode made.
    ///
    /// 1. Node 0 zeroes the load counters, sets the mode's advice and
    ///    reads the traffic counters.
    /// 2. Every node writes its prompt keys and values, then runs the
    ///    prefill and each decode step ([`LayerRun::step`]), with a barrier
    ///    after each.
    /// 3. Node 0 reads the traffic and replica counters, then unsets the
    ///    read-mostly advice, which drops every replica.
    fn run(&self, mode: Mode) -> Result<ModeRun> {
        let (pool, cfg, workload, plan) = (self.pool, self.cfg, self.workload, self.plan);
        let me = pool.node();
        let root = NodeId(0);
        let advised = vec![mode == Mode::Prefetch; cfg.experts];

        // Step 1.
        let mut traffic_before = None;
        if me == root {
            pool.write_slice(self.addrs.load_counters, &vec![0u64; (workload.steps + 1) * cfg.experts])
                .context(|| "zeroing the expert load counters failed".into())?;
            for e in (0..cfg.experts).filter(|&e| advised[e]) {
                self.set_read_mostly(e, true)?;
            }
            traffic_before = Some(pool.stats().context(|| "reading the traffic counters failed".into())?.traffic);
        }
        pool.barrier().context(|| format!("waiting to start the {} run failed", mode.label()))?;

        // Step 2.
        let layer = Layer { cfg, dense: self.dense, seed: workload.seed, scale: workload.scale };
        let mut kv = PoolKv { pool, blocks: self.block_addrs, kv_dim: cfg.kv_dim() };
        let buffer = ExpertWeights::from_data(cfg, vec![0.0; ExpertWeights::len(cfg)])
            .ok_or_else(|| NodeError::Invalid("an expert buffer of the configured length was rejected".into()))?;
        let experts = PoolExperts {
            pool,
            addrs: &self.addrs.experts,
            expert_bytes: cfg.expert_bytes() as usize,
            buffer,
            prefetch: (mode == Mode::Prefetch).then(|| Prefetcher::new(&self.local_experts)),
        };
        let mut counts = NodeCounts::new(cfg.experts, workload.steps + 1);
        let mut timings = Timings::default();
        let mut busy = Duration::ZERO;

        let started = Instant::now();
        for &s in self.mine {
            let written = sequence::write_prompt_kv(layer, plan, s, &workload.sequences[s], &mut kv)
                .context(|| format!("writing the prompt keys and values of sequence {s} failed"))?;
            counts.written_prompt_tokens += written as u64;
        }
        busy += started.elapsed();
        pool.barrier().context(|| "waiting for the prompt keys and values failed".into())?;
        let computing = Instant::now();
        let hidden_states = vec![Vec::new(); workload.sequences.len()];
        let mut state = StepState { kv, experts, routing: Routing::new(cfg.experts), hidden_states, counts, advised };
        self.step(0, mode, &mut state)?;
        busy += computing.elapsed();
        pool.barrier().context(|| "waiting for the prefill failed".into())?;
        timings.prefill = started.elapsed();

        for step in 0..workload.steps {
            let started = Instant::now();
            self.step(step + 1, mode, &mut state)?;
            busy += started.elapsed();
            pool.barrier().context(|| format!("waiting for decode step {step} failed"))?;
            timings.steps.push(started.elapsed());
        }
        let StepState { experts, hidden_states, mut counts, advised, .. } = state;
        let wall = timings.prefill + timings.steps.iter().sum::<Duration>();
        counts.busy = busy;
        if let Some(prefetch) = &experts.prefetch {
            counts.prefetches = prefetch.started;
            counts.prefetch_wait = prefetch.waited;
        }

        // Step 3.
        let mut replicas = None;
        let mut traffic = None;
        if let Some(before) = traffic_before {
            let stats = pool.stats().context(|| "reading the traffic counters failed".into())?;
            traffic = Some(difference(&stats.traffic, &before));
            let mut copies = 0;
            for (e, &addr) in self.addrs.experts.iter().enumerate() {
                copies += pool
                    .replica_nodes(addr)
                    .context(|| format!("listing the replicas of expert {e} at {addr} failed"))?
                    .len() as u64;
            }
            let bytes = stats.nodes.iter().map(|n| n.replica_bytes).sum();
            for e in (0..cfg.experts).filter(|&e| advised[e]) {
                self.set_read_mostly(e, false)?;
            }
            let left = pool.stats().context(|| "reading the replica counters failed".into())?;
            let left = left.nodes.iter().map(|n| n.replica_bytes).sum();
            replicas = Some(Replicas { experts: copies, bytes, left });
        }
        pool.barrier().context(|| format!("waiting for the replicas of the {} run to be dropped failed", mode.label()))?;
        Ok(ModeRun { hidden_states, counts, timings, traffic, replicas, wall })
    }

    /// Runs `step` (0 for the prefill, `k + 1` for decode step `k`) for
    /// this node's sequences, in two passes as an MoE layer dispatches:
    ///
    /// 1. Attention and the router for every token. The tokens per expert
    ///    go to the step's load counters in pool memory.
    /// 2. In the replicate-hot mode, the hot experts of the step are
    ///    replicated ([`LayerRun::replicate_hot`]).
    /// 3. The experts of every token, in the order of the first pass. In the
    ///    prefetch mode the node then waits for its prefetches.
    fn step(&self, step: usize, mode: Mode, state: &mut StepState<'_>) -> Result<()> {
        let (cfg, workload, plan) = (self.cfg, self.workload, self.plan);
        let layer = Layer { cfg, dense: self.dense, seed: workload.seed, scale: workload.scale };
        let failed = |s: usize, e: meshmem::Error| NodeError::Pool {
            context: format!("{} of sequence {s} failed", if step == 0 { "prefill" } else { "decode" }),
            source: e,
        };

        // 1.
        let before = state.routing.clone();
        let mut routed = Vec::with_capacity(self.mine.len());
        for &s in self.mine {
            let seq = &workload.sequences[s];
            let tokens = match step {
                0 => sequence::prefill_route(layer, plan, s, seq, &mut state.kv, &mut state.routing),
                _ => {
                    let states = &state.hidden_states[s];
                    let previous = &states[states.len() - cfg.hidden..];
                    let position = seq.prompt_tokens + step - 1;
                    sequence::decode_route(layer, &plan.sequences[s], position, previous, &mut state.kv, &mut state.routing)
                        .map(|token| vec![token])
                }
            }
            .map_err(|e| failed(s, e))?;
            state.counts.computed_tokens += tokens.len() as u64;
            routed.push((s, tokens));
        }
        let mine = state.routing.since(&before);
        for (e, &tokens) in mine.tokens.iter().enumerate().filter(|(_, &t)| t > 0) {
            self.pool
                .fetch_add_u64(self.addrs.load_addr(step, e, cfg.experts), tokens)
                .context(|| format!("adding {tokens} tokens to the load counter of expert {e} in step {step} failed"))?;
        }

        // 2.
        if let Mode::ReplicateHot(factor) = mode {
            state.counts.prefetches += self.replicate_hot(step, factor, &mine, &mut state.advised)?;
        }
        state.counts.steps[step] = mine;

        // 3.
        for (s, tokens) in routed {
            let output = sequence::run_experts(tokens, &mut state.experts).map_err(|e| failed(s, e))?;
            match step {
                0 => state.hidden_states[s] = output,
                _ => state.hidden_states[s].extend_from_slice(&output),
            }
        }
        if let Some(prefetch) = &mut state.experts.prefetch {
            prefetch.finish().context(|| format!("waiting for the experts prefetched in step {step} failed"))?;
        }
        Ok(())
    }

    /// Replicates the experts that are hot in `step` and not yet
    /// read-mostly. After a barrier, every node has added its tokens to the
    /// step's load counters, so every node reads the same load and picks
    /// the same experts. Node 0 marks them read-mostly. After a second
    /// barrier, each node that routed at least an even share of an expert's
    /// tokens (`mine`) prefetches it to itself and waits for the copy.
    /// Returns the number of prefetches.
    fn replicate_hot(&self, step: usize, factor: f64, mine: &Routing, advised: &mut [bool]) -> Result<u64> {
        let (pool, experts) = (self.pool, self.cfg.experts);
        pool.barrier().context(|| format!("waiting for the load counters of step {step} failed"))?;
        let mut load = vec![0u64; experts];
        pool.read_slice(self.addrs.load_addr(step, 0, experts), &mut load)
            .context(|| format!("reading the expert load counters of step {step} failed"))?;
        let hot: Vec<usize> = balance::hot_experts(&load, factor).into_iter().filter(|&e| !advised[e]).collect();
        if hot.is_empty() {
            return Ok(0);
        }
        if pool.node() == NodeId(0) {
            for &e in &hot {
                self.set_read_mostly(e, true)?;
            }
        }
        pool.barrier().context(|| format!("waiting for node 0 to mark the hot experts of step {step} failed"))?;
        let mut prefetches = 0;
        for e in hot {
            advised[e] = true;
            if self.local_experts[e] || !balance::is_heavy_user(mine.tokens[e], load[e], pool.size()) {
                continue;
            }
            let addr = self.addrs.experts[e];
            pool.prefetch(addr, self.cfg.expert_bytes() as usize, pool.node())
                .and_then(|mut p| p.wait())
                .context(|| format!("replicating expert {e} at {addr} to this node failed"))?;
            prefetches += 1;
        }
        Ok(prefetches)
    }

    /// Sets or unsets the read-mostly advice on every page of expert `e`.
    /// Unsetting drops its replicas.
    fn set_read_mostly(&self, e: usize, set: bool) -> Result<()> {
        let (addr, len) = (self.addrs.experts[e], self.cfg.expert_bytes() as usize);
        match set {
            true => self.pool.advise(addr, len, Advice::ReadMostly),
            false => self.pool.unadvise(addr, len, Advice::ReadMostly),
        }
        .context(|| format!("{} the read-mostly advice of expert {e} at {addr} failed", if set { "setting" } else { "unsetting" }))
    }
}

/// The options, layer, batch and plan of the run, with the printer of the
/// setup that node 0 writes above its report.
pub struct Setup<'a> {
    pub args: &'a Args,
    pub cfg: &'a ModelConfig,
    pub workload: &'a Workload,
    pub plan: &'a SharingPlan,
    /// Prints the layer and the trace.
    pub print: &'a dyn Fn(),
}

/// Per-node results of one run of the layer, which node 0 gathers.
#[derive(Clone, Debug, Default, PartialEq)]
struct NodeCounts {
    computed_tokens: u64,
    written_prompt_tokens: u64,
    busy: Duration,
    /// Time spent waiting for prefetches before the next step.
    prefetch_wait: Duration,
    /// Prefetches of an expert to this node.
    prefetches: u64,
    /// This node's routing in the prefill (index 0) and each decode step.
    steps: Vec<Routing>,
}

/// Words of [`NodeCounts`] before the per-step routing.
const COUNT_WORDS: usize = 5;

impl NodeCounts {
    /// Zero counts for `steps` steps, the prefill included.
    fn new(experts: usize, steps: usize) -> Self {
        NodeCounts { steps: vec![Routing::new(experts); steps], ..Default::default() }
    }

    /// This node's routing over the whole run.
    fn total(&self, experts: usize) -> Routing {
        let mut total = Routing::new(experts);
        for step in &self.steps {
            for e in 0..experts {
                total.tokens[e] += step.tokens[e];
                total.gate_sums[e] += step.gate_sums[e];
            }
        }
        total
    }

    fn encode(&self) -> Vec<u8> {
        let mut words = vec![
            self.computed_tokens,
            self.written_prompt_tokens,
            self.busy.as_nanos() as u64,
            self.prefetch_wait.as_nanos() as u64,
            self.prefetches,
        ];
        for step in &self.steps {
            words.extend(&step.tokens);
            words.extend(step.gate_sums.iter().map(|g| g.to_bits()));
        }
        le_bytes(&words)
    }

    fn decode(bytes: &[u8], experts: usize, steps: usize) -> Result<Self> {
        let words = words(bytes, "token counts")?;
        let expected = COUNT_WORDS + steps * 2 * experts;
        if words.len() != expected {
            return Err(NodeError::Invalid(format!(
                "a node sent {} words of token counts, expected {expected} for {experts} experts and {steps} steps",
                words.len()
            )));
        }
        let steps = words[COUNT_WORDS..]
            .chunks_exact(2 * experts)
            .map(|step| Routing {
                tokens: step[..experts].to_vec(),
                gate_sums: step[experts..].iter().map(|&bits| f64::from_bits(bits)).collect(),
            })
            .collect();
        Ok(NodeCounts {
            computed_tokens: words[0],
            written_prompt_tokens: words[1],
            busy: Duration::from_nanos(words[2]),
            prefetch_wait: Duration::from_nanos(words[3]),
            prefetches: words[4],
            steps,
        })
    }
}

/// Runs this node's part of the batch. Node 0 prints the comparison and
/// the report; it returns `Ok(false)` if the results differ or pages stay
/// in use after everything was freed.
///
/// An error after joining is written to stderr while the pool is still
/// open, because leaving the group makes the other nodes fail and the
/// launcher may stop this node before it writes anything. That error is
/// returned as [`NodeError::Reported`].
pub fn run_node(setup: &Setup<'_>) -> Result<bool> {
    let pool = Arc::new(Config::from_env().and_then(Pool::join).context(|| "joining the group failed".into())?);
    match run_joined(&pool, setup) {
        Ok(equal) => Ok(equal),
        Err(e) => {
            if matches!(e, NodeError::Pool { source: meshmem::Error::Collective { .. }, .. }) {
                std::thread::sleep(COLLECTIVE_FAILURE_WAIT);
            }
            // One write, so that lines of different nodes do not mix.
            let line = format!("error: node {} {}: {e}\n", pool.node(), pool.coord());
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            Err(NodeError::Reported)
        }
    }
}

fn run_joined(pool: &Arc<Pool>, setup: &Setup<'_>) -> Result<bool> {
    let (args, cfg, workload, plan) = (setup.args, setup.cfg, setup.workload, setup.plan);

    // Phase 1: place the weights from node 0.
    let me = pool.node();
    let nodes = pool.size();
    let root = NodeId(0);
    let mut allocator = Allocator::new(pool);
    let mut weights = None;
    let mut addrs_bytes = Vec::new();
    if me == root {
        (setup.print)();
        println!(
            "mesh {}, weights placed {}, node capacity {}, page size {}",
            pool.mesh(),
            args.placement,
            format_bytes(pool.node_capacity()),
            format_bytes(pool.page_size() as u64)
        );
        report::print_plan(cfg, workload, plan, &pool.mesh());
        let started = Instant::now();
        let generated = Weights::generate(cfg, workload.seed);
        let generated_in = started.elapsed();
        let started = Instant::now();
        let mut dense = Vec::new();
        for (name, tensor) in generated.dense.tensors() {
            let addr = allocator.alloc::<f32>(tensor.len(), placement(args.placement, pool, None)).context(|| {
                format!("placing the dense tensor {name} of {} failed", format_bytes(tensor.len() as u64 * F32_BYTES))
            })?;
            pool.write_slice(addr, tensor).context(|| format!("writing the dense tensor {name} failed"))?;
            dense.push(addr);
        }
        let mut experts = Vec::new();
        for (e, expert) in generated.experts.iter().enumerate() {
            let addr =
                allocator.alloc::<f32>(expert.data.len(), placement(args.placement, pool, Some(e))).context(|| {
                    format!(
                        "placing expert {e} of {} with --placement {} failed; raise --node-capacity",
                        format_bytes(cfg.expert_bytes()),
                        args.placement
                    )
                })?;
            pool.write_slice(addr, &expert.data).context(|| format!("writing expert {e} failed"))?;
            experts.push(addr);
        }
        let ref_counts = allocator
            .alloc::<u64>(plan.blocks(), Placement::Local)
            .context(|| format!("allocating {} KV block reference counts failed", plan.blocks()))?;
        pool.write_slice(ref_counts, &vec![0u64; plan.blocks()])
            .context(|| "zeroing the reference counts failed".into())?;
        // Zeroed by every run of the layer before it starts.
        let load_counters = allocator
            .alloc::<u64>((workload.steps + 1) * cfg.experts, Placement::Local)
            .context(|| format!("allocating {} expert load counters failed", (workload.steps + 1) * cfg.experts))?;
        addrs_bytes = WeightAddrs { dense, experts, ref_counts, load_counters }.encode();
        println!();
        println!(
            "weights generated from seed {} in {:.3} s on node 0, placed and written in {:.3} s",
            workload.seed,
            generated_in.as_secs_f64(),
            started.elapsed().as_secs_f64()
        );
        weights = Some(generated);
    }
    let addrs_bytes = pool.broadcast(root, &addrs_bytes).context(|| "receiving the weight addresses failed".into())?;
    let addrs = WeightAddrs::decode(&addrs_bytes, cfg.experts)?;
    let mut dense = DenseWeights::zeroed(cfg);
    for (tensor, &addr) in dense.tensors_mut().into_iter().zip(&addrs.dense) {
        pool.read_slice(addr, tensor).context(|| format!("reading a dense tensor at {addr} failed"))?;
    }

    // Phase 2: output rows on this node, KV blocks near their writer's
    // owner, and the user counts. Output rows come first, so that KV
    // blocks spilled here from other nodes cannot take their room.
    let mine: Vec<usize> = (0..workload.sequences.len()).filter(|&s| report::owner(s, nodes) == me).collect();
    let row_values = output_values(cfg, workload.steps);
    let mut outputs = Vec::new();
    for &s in &mine {
        let addr = allocator
            .alloc::<f32>(row_values, Placement::Local)
            .context(|| format!("allocating the output rows of sequence {s} failed; raise --node-capacity"))?;
        outputs.push((s, addr));
    }
    pool.barrier().context(|| "waiting for the output rows failed".into())?;

    // The default capacity has room for a replica of every expert. It is
    // held while the KV blocks are placed, so that they spill as in a run
    // without replication, and freed before the runs that replicate.
    let modes = Mode::requested(args);
    let mut replica_room = None;
    if modes.len() > 1 && args.node_capacity.is_none() {
        let page = pool.page_size() as u64;
        let bytes = cfg.experts as u64 * whole_pages(cfg.expert_bytes(), page) * page;
        let room = pool.alloc_slice::<u8>(bytes as usize, Placement::Node(me)).context(|| {
            format!("holding {} for replicas on node {me} failed; raise --node-capacity", format_bytes(bytes))
        })?;
        replica_room = Some(room.addr());
    }

    let near_me = Placement::Nearest(pool.coord());
    let mut my_blocks: Vec<u64> = Vec::new();
    for turn in pool.mesh().nodes() {
        if turn == me {
            for (block, &writer) in plan.writer.iter().enumerate() {
                if report::owner(writer, nodes) == me {
                    let addr = allocator.alloc::<f32>(block_values(cfg), near_me.clone()).context(|| {
                        format!("allocating KV block {block} of sequence {writer} near node {me} failed; raise --node-capacity")
                    })?;
                    my_blocks.extend([block as u64, addr.0]);
                }
            }
        }
        pool.barrier().context(|| format!("waiting for node {turn} to allocate its KV blocks failed"))?;
    }
    if let Some(addr) = replica_room {
        pool.free(addr).context(|| format!("freeing the room held for replicas at {addr} failed"))?;
    }
    let gathered = pool.all_gather(&le_bytes(&my_blocks)).context(|| "exchanging KV block addresses failed".into())?;
    let block_addrs = decode_pairs(&gathered, plan.blocks(), "KV block")?;
    for &s in &mine {
        for &block in &plan.sequences[s].table {
            pool.fetch_add_u64(addrs.count_addr(block), 1)
                .context(|| format!("counting sequence {s} as a user of KV block {} failed", block.0))?;
        }
    }
    pool.barrier().context(|| "waiting for the reference counts failed".into())?;
    if me == root {
        check_ref_counts(pool, cfg, plan, &addrs)?;
    }
    let output_addrs = {
        let pairs: Vec<u64> = outputs.iter().flat_map(|&(s, addr)| [s as u64, addr.0]).collect();
        let gathered = pool.all_gather(&le_bytes(&pairs)).context(|| "exchanging output addresses failed".into())?;
        decode_pairs(&gathered, workload.sequences.len(), "output")?
    };

    // Phases 3 and 4, once per mode: prefill and decode.
    if modes.len() > 1 && is_slab_sized(cfg.expert_bytes(), std::mem::align_of::<f32>(), pool.page_size() as u64) {
        return Err(NodeError::Invalid(format!(
            "an expert of {} is a small block inside a shared page, but replication advice applies to whole \
             pages; run without --replicate-hot and --prefetch",
            format_bytes(cfg.expert_bytes())
        )));
    }
    let mut local_experts = Vec::with_capacity(cfg.experts);
    for &addr in &addrs.experts {
        local_experts.push(homes(pool, addr, cfg.expert_bytes())?.iter().all(|&(node, _)| node == me));
    }
    let runner = LayerRun {
        pool,
        cfg,
        workload,
        plan,
        dense: &dense,
        addrs: &addrs,
        block_addrs: &block_addrs,
        mine: &mine,
        local_experts,
    };
    let mut equal = true;
    let mut expected: Option<Vec<Vec<f32>>> = None;
    let mut first_loads: Option<Vec<Vec<u64>>> = None;
    let mut rows = Vec::new();
    for (index, &mode) in modes.iter().enumerate() {
        let run = runner.run(mode)?;

        // Phase 5: gather the hidden states through pool memory.
        for &(s, addr) in &outputs {
            pool.write_slice(addr, &run.hidden_states[s])
                .context(|| format!("writing the output rows of sequence {s} failed"))?;
        }
        pool.barrier().context(|| "waiting for the output rows failed".into())?;
        let counts = pool.all_gather(&run.counts.encode()).context(|| "exchanging token counts failed".into())?;
        let Some(weights) = &weights else { continue };
        let counts = counts
            .iter()
            .map(|bytes| NodeCounts::decode(bytes, cfg.experts, workload.steps + 1))
            .collect::<Result<Vec<_>>>()?;
        let mut distributed = vec![vec![0.0f32; row_values]; workload.sequences.len()];
        for (s, (&addr, row)) in output_addrs.iter().zip(&mut distributed).enumerate() {
            pool.read_slice(addr, row).context(|| format!("reading the output rows of sequence {s} failed"))?;
        }
        let loads = read_loads(pool, cfg, workload, &addrs)?;
        let routing = total_routing(cfg, &counts);
        let mode_equal = if index == 0 {
            // The first mode is the plain run: print the comparison and
            // the full report, while everything is still allocated.
            let started = Instant::now();
            let (reference_out, _) = reference::run(cfg, weights, workload, plan)
                .map_err(|e| NodeError::Invalid(format!("the reference run on node 0 failed: {e}")))?;
            let reference_time = started.elapsed();
            let comparison = reference::compare(&reference_out.hidden_states, &distributed);
            println!();
            println!("equal: {} ({} values compared)", comparison.equal(), comparison.compared);
            print_mismatch("", &comparison);
            println!("reference computed on node 0 in {:.3} s", reference_time.as_secs_f64());

            let traffic = run.traffic.clone().unwrap_or_default();
            print_report(pool, cfg, plan, &addrs, &block_addrs, &counts, &traffic)?;
            let routing_matches = print_balance(cfg, &loads, &counts, &reference_out.routing.tokens);
            let distributed_out = RunOutput {
                hidden_states: distributed,
                routing,
                computed_tokens: counts.iter().map(|c| c.computed_tokens).sum(),
                written_prompt_tokens: counts.iter().map(|c| c.written_prompt_tokens).sum(),
            };
            report::print_run("distributed", &distributed_out, &run.timings);
            expected = Some(reference_out.hidden_states);
            first_loads = Some(loads);
            comparison.equal() && routing_matches
        } else {
            let expected = expected.as_ref().ok_or_else(|| NodeError::Invalid("the reference output of the first run is missing".into()))?;
            let comparison = reference::compare(expected, &distributed);
            print_mismatch(&format!("{}: ", mode.label()), &comparison);
            // Routing does not depend on where the weights are read from.
            let same_load = first_loads.as_ref() == Some(&loads);
            if !same_load {
                println!("{}: the load counters in pool memory differ from the first run's", mode.label());
            }
            comparison.equal() && same_load
        };
        equal &= mode_equal;
        let left = run.replicas.map_or(0, |r| r.left);
        if left > 0 {
            println!("{}: {} of replicas remain after the read-mostly advice was unset", mode.label(), format_bytes(left));
            equal = false;
        }
        rows.push(mode_row(pool, mode, &run, &counts, mode_equal)?);
    }
    if me == root && modes.len() > 1 {
        report::print_modes(LinkModel::default(), workload.steps, &rows);
        println!("equal in every mode: {equal}");
    }

    // Phase 6b: release. The last user of a KV block frees it.
    pool.barrier().context(|| "waiting for the report failed".into())?;
    for &s in &mine {
        for &block in &plan.sequences[s].table {
            let before = pool
                .fetch_add_u64(addrs.count_addr(block), u64::MAX)
                .context(|| format!("releasing KV block {} from sequence {s} failed", block.0))?;
            if before == 0 {
                return Err(NodeError::Invalid(format!(
                    "KV block {} had no users left when sequence {s} released it",
                    block.0
                )));
            }
            if before == 1 {
                let addr = block_addrs[block.index()];
                pool.free(addr).context(|| format!("freeing KV block {} at {addr} failed", block.0))?;
            }
        }
    }
    for &(s, addr) in &outputs {
        pool.free(addr).context(|| format!("freeing the output rows of sequence {s} failed"))?;
    }
    pool.barrier().context(|| "waiting for the KV blocks to be freed failed".into())?;
    if me == root {
        for (i, &addr) in addrs.dense.iter().chain(&addrs.experts).enumerate() {
            pool.free(addr).context(|| format!("freeing weight tensor {i} at {addr} failed"))?;
        }
        pool.free(addrs.ref_counts).context(|| "freeing the reference counts failed".into())?;
        pool.free(addrs.load_counters).context(|| "freeing the load counters failed".into())?;
    }
    let slab_pages: Vec<u64> = allocator.slab_pages.iter().flat_map(|&(home, page)| [home as u64, page]).collect();
    let slab_pages = pool.all_gather(&le_bytes(&slab_pages)).context(|| "exchanging slab pages failed".into())?;
    if me == root {
        let clean = check_released(pool, &slab_pages)?;
        equal &= clean;
    }
    Ok(equal)
}

/// Prints the first difference and any shape mismatch of `comparison`,
/// each line starting with `prefix`.
fn print_mismatch(prefix: &str, comparison: &Comparison) {
    if let Some((seq, index, want, got)) = comparison.first_mismatch {
        println!(
            "{prefix}first difference: sequence {seq}, value {index}: reference {want:e}, distributed {got:e}; {} values differ",
            comparison.mismatches
        );
    }
    if let Some(shape) = &comparison.shape_mismatch {
        println!("{prefix}shapes differ: {shape}");
    }
}

/// Reads the expert load counters of every step from pool memory.
fn read_loads(pool: &Pool, cfg: &ModelConfig, workload: &Workload, addrs: &WeightAddrs) -> Result<Vec<Vec<u64>>> {
    let mut flat = vec![0u64; (workload.steps + 1) * cfg.experts];
    pool.read_slice(addrs.load_counters, &mut flat).context(|| "reading the expert load counters failed".into())?;
    Ok(flat.chunks_exact(cfg.experts).map(<[u64]>::to_vec).collect())
}

/// Sums the nodes' routing over the whole run.
fn total_routing(cfg: &ModelConfig, counts: &[NodeCounts]) -> Routing {
    let mut total = Routing::new(cfg.experts);
    for node in counts {
        let routing = node.total(cfg.experts);
        for e in 0..cfg.experts {
            total.tokens[e] += routing.tokens[e];
            total.gate_sums[e] += routing.gate_sums[e];
        }
    }
    total
}

/// Prints the load of each expert per step, read from the counters in pool
/// memory, with the global-batch load-balancing loss of each step and of
/// the whole run, and the mean of the per-node losses for contrast.
/// Returns whether the counters agree with the nodes' own counts and with
/// the reference's routing.
fn print_balance(cfg: &ModelConfig, loads: &[Vec<u64>], counts: &[NodeCounts], reference: &[u64]) -> bool {
    let mut whole = Routing::new(cfg.experts);
    let mut agree = true;
    println!();
    println!("expert load of the whole batch, from the counters every node adds to in pool memory:");
    let header: Vec<String> = (0..cfg.experts).map(|e| format!("{:>6}", format!("e{e}"))).collect();
    println!("{:>9} {} {:>7}", "step", header.join(" "), "LBL");
    for (step, load) in loads.iter().enumerate() {
        let mut routing = Routing { tokens: load.clone(), gate_sums: vec![0.0; cfg.experts] };
        let mut own = vec![0u64; cfg.experts];
        for node in counts {
            for e in 0..cfg.experts {
                routing.gate_sums[e] += node.steps[step].gate_sums[e];
                own[e] += node.steps[step].tokens[e];
            }
        }
        agree &= own == *load;
        for e in 0..cfg.experts {
            whole.tokens[e] += routing.tokens[e];
            whole.gate_sums[e] += routing.gate_sums[e];
        }
        let name = if step == 0 { "prefill".to_string() } else { format!("decode {}", step - 1) };
        let cells: Vec<String> = load.iter().map(|c| format!("{c:>6}")).collect();
        println!("{name:>9} {} {:>7}", cells.join(" "), format_loss(balance::load_balancing_loss(&routing, cfg.top_k)));
    }
    let cells: Vec<String> = whole.tokens.iter().map(|c| format!("{c:>6}")).collect();
    println!("{:>9} {} {:>7}", "all", cells.join(" "), format_loss(balance::load_balancing_loss(&whole, cfg.top_k)));

    let per_node: Vec<f64> =
        counts.iter().filter_map(|node| balance::load_balancing_loss(&node.total(cfg.experts), cfg.top_k)).collect();
    let mean = per_node.iter().sum::<f64>() / per_node.len().max(1) as f64;
    println!(
        "LBL: global-batch load-balancing loss N_E * sum_i f_i * P_i over the tokens of every node \
         (1.000 when even, {} at most); the mean of the per-node losses over the whole run is {mean:.3}",
        cfg.experts
    );
    agree &= whole.tokens == reference;
    println!("load counters agree with the nodes' own counts and the reference's routing: {agree}");
    agree
}

fn format_loss(loss: Option<f64>) -> String {
    loss.map_or_else(|| "-".into(), |l| format!("{l:.3}"))
}

/// Returns the comparison row of one mode, from node 0's view of its run
/// and every node's counts.
fn mode_row(pool: &Pool, mode: Mode, run: &ModeRun, counts: &[NodeCounts], equal: bool) -> Result<ModeRow> {
    let traffic = run.traffic.clone().unwrap_or_default();
    let replicas = run.replicas.unwrap_or_default();
    let summary = TrafficSummary::from_matrix(&pool.mesh(), &traffic).map_err(NodeError::Invalid)?;
    let estimate = pool
        .mesh()
        .estimate(&traffic, LinkModel::default())
        .context(|| format!("estimating the traffic of the {} run on the mesh model failed", mode.label()))?;
    Ok(ModeRow {
        label: mode.label(),
        remote_bytes: summary.remote_bytes,
        estimate,
        prefetches: counts.iter().map(|c| c.prefetches).sum(),
        replicas: replicas.experts,
        replica_bytes: replicas.bytes,
        prefetch_wait: counts.iter().map(|c| c.prefetch_wait).sum(),
        wall: run.wall,
        equal,
    })
}

/// Reads the reference counts from pool memory, checks them against the
/// plan, and prints the blocks and bytes that sharing saved.
fn check_ref_counts(pool: &Pool, cfg: &ModelConfig, plan: &SharingPlan, addrs: &WeightAddrs) -> Result<()> {
    let mut counts = vec![0u64; plan.blocks()];
    pool.read_slice(addrs.ref_counts, &mut counts).context(|| "reading the reference counts failed".into())?;
    if let Some((block, (&found, &planned))) =
        counts.iter().zip(&plan.ref_counts).enumerate().find(|(_, (&found, &planned))| found != planned as u64)
    {
        return Err(NodeError::Invalid(format!(
            "KV block {block} has {found} users in pool memory, but the plan gives it {planned}"
        )));
    }
    let shared = counts.iter().filter(|&&c| c > 1).count();
    let saved: u64 = counts.iter().map(|&c| c.saturating_sub(1)).sum();
    println!(
        "reference counts in pool memory: {} KV blocks allocated for {} block-table entries; \
         {shared} blocks shared, {saved} blocks ({}) saved",
        counts.len(),
        counts.iter().sum::<u64>(),
        format_bytes(saved * report::block_bytes(cfg))
    );
    Ok(())
}

/// Checks, after every allocation was freed, that each node's used frames
/// are exactly the slab pages homed there, which the allocator keeps.
/// Prints the result and returns whether it held.
fn check_released(pool: &Pool, slab_pages: &[Vec<u8>]) -> Result<bool> {
    let mut pages = BTreeSet::new();
    for bytes in slab_pages {
        let words = words(bytes, "slab pages")?;
        pages.extend(words.chunks_exact(2).map(|pair| (pair[0], pair[1])));
    }
    let stats = pool.stats().context(|| "reading the frame counts failed".into())?;
    let mut clean = true;
    let mut slab_total = 0;
    for node in &stats.nodes {
        let slabs = pages.iter().filter(|&&(home, _)| home == node.node.0 as u64).count() as u64;
        slab_total += slabs;
        if node.frames_used != slabs {
            clean = false;
            println!(
                "node {} {}: {} frames still in use after freeing everything, {slabs} of them slab pages",
                node.node, node.coord, node.frames_used
            );
        }
    }
    println!();
    if clean {
        println!("after freeing everything: every node's used frames are its slab pages ({slab_total} in all)");
    } else {
        println!("after freeing everything: frames other than slab pages are still in use (listed above)");
    }
    Ok(clean)
}

fn print_report(
    pool: &Pool,
    cfg: &ModelConfig,
    plan: &SharingPlan,
    addrs: &WeightAddrs,
    block_addrs: &[GlobalAddr],
    counts: &[NodeCounts],
    traffic: &[Vec<u64>],
) -> Result<()> {
    let mesh = pool.mesh();
    let stats = pool.stats().context(|| "reading the pool statistics failed".into())?;
    let mut rows: Vec<NodeHoldings> = stats
        .nodes
        .iter()
        .map(|n| NodeHoldings {
            node: n.node,
            coord: n.coord.to_string(),
            used_bytes: n.used_bytes,
            capacity_bytes: n.capacity_bytes,
            ..Default::default()
        })
        .collect();

    for (&addr, bytes) in addrs.dense.iter().zip(dense_tensor_bytes(cfg)) {
        for (node, held) in homes(pool, addr, bytes)? {
            rows[node.index()].dense_bytes += held;
        }
    }
    for (expert, &addr) in addrs.experts.iter().enumerate() {
        for (node, held) in homes(pool, addr, cfg.expert_bytes())? {
            let row = &mut rows[node.index()];
            row.expert_bytes += held;
            row.experts.push(expert);
        }
    }
    let mut spilled = 0;
    for (block, &addr) in block_addrs.iter().enumerate() {
        let home = pool.home_of(addr).context(|| format!("looking up the home of KV block {block} failed"))?;
        let row = &mut rows[home.index()];
        row.kv_blocks += 1;
        row.kv_bytes += report::block_bytes(cfg);
        if report::owner(plan.writer[block], pool.size()) != home {
            row.kv_spilled_in += 1;
            spilled += 1;
        }
    }
    for (row, count) in rows.iter_mut().zip(counts) {
        row.tokens = count.computed_tokens;
        row.busy = count.busy;
    }
    report::print_holdings(&rows);
    println!(
        "KV blocks homed off their owner's node (Nearest spilled them): {spilled} of {}; node capacity {}, page size {}",
        block_addrs.len(),
        format_bytes(pool.node_capacity()),
        format_bytes(pool.page_size() as u64)
    );

    let summary = TrafficSummary::from_matrix(&mesh, traffic).map_err(NodeError::Invalid)?;
    report::print_traffic("prefill and decode", &summary, traffic);

    // On several hosts, split the same bytes by what carried them.
    let kinds = pool.stats().context(|| "reading the pool statistics failed".into())?.transport;
    let (mut within, mut between) = (0u64, 0u64);
    for (row, kinds) in traffic.iter().zip(&kinds) {
        for (&bytes, kind) in row.iter().zip(kinds) {
            match kind {
                meshmem::transport::TransportKind::Shm => within += bytes,
                _ => between += bytes,
            }
        }
    }
    if between > 0 {
        println!(
            "by transport: {} inside hosts (shared memory), {} between hosts",
            format_bytes(within),
            format_bytes(between)
        );
    }
    Ok(())
}

/// Returns `after - before`, element by element.
fn difference(after: &[Vec<u64>], before: &[Vec<u64>]) -> Vec<Vec<u64>> {
    after.iter().zip(before).map(|(a, b)| a.iter().zip(b).map(|(a, b)| a.saturating_sub(*b)).collect()).collect()
}

/// Decodes all-gathered `(index, address)` pairs into one address per
/// index below `len`, checking that each index is given exactly once.
fn decode_pairs(gathered: &[Vec<u8>], len: usize, what: &str) -> Result<Vec<GlobalAddr>> {
    let mut addrs = vec![None; len];
    for (node, bytes) in gathered.iter().enumerate() {
        let words = words(bytes, what)?;
        for pair in words.chunks_exact(2) {
            let slot = usize::try_from(pair[0])
                .ok()
                .and_then(|i| addrs.get_mut(i))
                .ok_or_else(|| NodeError::Invalid(format!("node {node} sent {what} {} of only {len}", pair[0])))?;
            if slot.replace(GlobalAddr(pair[1])).is_some() {
                return Err(NodeError::Invalid(format!(
                    "{what} {} was sent twice; node {node} sent it again",
                    pair[0]
                )));
            }
        }
    }
    addrs
        .into_iter()
        .enumerate()
        .map(|(i, a)| a.ok_or_else(|| NodeError::Invalid(format!("no node sent the address of {what} {i}"))))
        .collect()
}

/// Encodes `u64` words little-endian for a collective.
fn le_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Decodes little-endian `u64` words from collective output, whose `Vec<u8>`
/// is not aligned for a cast.
fn words(bytes: &[u8], what: &str) -> Result<Vec<u64>> {
    if bytes.len() % 8 != 0 {
        return Err(NodeError::Invalid(format!(
            "a node sent {} bytes of {what}, which is not a whole number of 8-byte words",
            bytes.len()
        )));
    }
    Ok(bytes.chunks_exact(8).map(|chunk| u64::from_le_bytes(chunk.try_into().expect("chunks of 8 bytes"))).collect())
}

/// Returns the bytes of `[addr, addr + len)` homed on each node, probing
/// one address per page.
fn homes(pool: &Pool, addr: GlobalAddr, len: u64) -> Result<Vec<(NodeId, u64)>> {
    let page = pool.page_size() as u64;
    let mut out: Vec<(NodeId, u64)> = Vec::new();
    let mut offset = 0;
    while offset < len {
        let at = addr.add(offset);
        let node = pool.home_of(at).context(|| format!("looking up the home of {at} failed"))?;
        let bytes = (page - at.0 % page).min(len - offset);
        match out.iter_mut().find(|(n, _)| *n == node) {
            Some((_, total)) => *total += bytes,
            None => out.push((node, bytes)),
        }
        offset += bytes;
    }
    Ok(out)
}
