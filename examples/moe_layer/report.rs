//! Human-readable output: the run's setup, the sharing plan, what was
//! computed, the weights and KV blocks homed on each node, and the traffic
//! between nodes.

use std::path::Path;
use std::time::Duration;

use meshmem::{LinkModel, Mesh3d, NodeId, TrafficEstimate};

use crate::model::{ModelConfig, F32_BYTES};
use crate::prefix::SharingPlan;
use crate::reference::{RunOutput, Timings};
use crate::sequence::{block_values, Workload};

/// Formats a byte count with a binary unit, such as `1.50 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// Bytes of one KV block of `cfg`.
pub fn block_bytes(cfg: &ModelConfig) -> u64 {
    block_values(cfg) as u64 * F32_BYTES
}

/// Node that owns sequence `index`: sequences go round-robin over the
/// nodes.
pub fn owner(index: usize, nodes: usize) -> NodeId {
    NodeId((index % nodes) as u16)
}

/// Prints the layer shape, the trace and the scale.
pub fn print_setup(cfg: &ModelConfig, trace: &Path, requests: usize, workload: &Workload) {
    println!(
        "preset {}: hidden {}, {} heads ({} KV heads) of {}, {} experts of ffn {}, top-{}",
        cfg.preset, cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.experts, cfg.ffn, cfg.top_k
    );
    println!(
        "weights: {} dense + {} per expert = {} in all",
        format_bytes(cfg.dense_bytes()),
        format_bytes(cfg.expert_bytes()),
        format_bytes(cfg.dense_bytes() + cfg.expert_bytes() * cfg.experts as u64)
    );
    println!(
        "trace {}: {requests} requests, batch of {}",
        trace.display(),
        workload.sequences.len()
    );
    println!(
        "lengths scaled down by {}: a 512-token hash block becomes {} token(s); {} decode steps",
        workload.scale,
        workload.scale.hash_block_tokens(),
        workload.steps
    );
}

/// Prints one row per sequence and the blocks that sharing saved.
pub fn print_plan(cfg: &ModelConfig, workload: &Workload, plan: &SharingPlan, mesh: &Mesh3d) {
    println!();
    println!("{:>4} {:>6} {:>7} {:>7} {:>7} {:>6} {:>5}", "seq", "line", "prompt", "blocks", "reused", "shared", "owner");
    for (index, (seq, blocks)) in workload.sequences.iter().zip(&plan.sequences).enumerate() {
        let shared = blocks.table.iter().filter(|b| plan.ref_counts[b.index()] > 1).count();
        println!(
            "{index:>4} {:>6} {:>7} {:>7} {:>7} {:>6} {:>5}",
            seq.line,
            seq.prompt_tokens,
            blocks.table.len(),
            blocks.reused_blocks,
            shared,
            owner(index, mesh.len())
        );
    }

    let bytes = block_bytes(cfg);
    println!(
        "KV blocks of 16 tokens ({} each): {} without sharing, {} with; \
         {} blocks shared, {} blocks ({}) saved",
        format_bytes(bytes),
        plan.unshared_blocks,
        plan.blocks(),
        plan.shared_blocks(),
        plan.saved_blocks(),
        format_bytes(plan.saved_blocks() as u64 * bytes)
    );
}

/// Prints tokens per expert, times and a checksum of the hidden states.
pub fn print_run(label: &str, out: &RunOutput, timings: &Timings) {
    println!();
    println!(
        "{label}: {} prompt tokens written to the cache, {} tokens run through the layer",
        out.written_prompt_tokens, out.computed_tokens
    );
    print_expert_load(&out.routing.tokens);
    println!("prefill: {}", format_duration(timings.prefill));
    for (step, time) in timings.steps.iter().enumerate() {
        println!("decode step {step}: {}", format_duration(*time));
    }
    println!("hidden-state checksum (FNV-1a of the f32 bits): {:016x}", checksum(&out.hidden_states));
}

fn print_expert_load(expert_tokens: &[u64]) {
    let counts: Vec<String> = expert_tokens.iter().map(u64::to_string).collect();
    let max = expert_tokens.iter().copied().max().unwrap_or(0);
    let mean = expert_tokens.iter().sum::<u64>() as f64 / expert_tokens.len().max(1) as f64;
    let imbalance = if mean > 0.0 { max as f64 / mean } else { 0.0 };
    println!(
        "tokens per expert: [{}]; max {max}, mean {mean:.1}, max/mean {imbalance:.2}",
        counts.join(", ")
    );
}

fn format_duration(time: Duration) -> String {
    format!("{:.3} ms", time.as_secs_f64() * 1e3)
}

/// Returns the FNV-1a hash of the bits of every value, in sequence order,
/// so two runs can be compared by one number.
pub fn checksum(rows: &[Vec<f32>]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for value in rows.iter().flatten() {
        for byte in value.to_bits().to_le_bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    hash
}

/// Weights and KV blocks homed on one node, and the work it did, for the
/// distributed report.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeHoldings {
    pub node: NodeId,
    /// Coordinate as the mesh prints it, such as `(1,0,1)`.
    pub coord: String,
    /// Bytes of frames in use, out of `capacity_bytes`.
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    /// Experts with at least one page homed on this node.
    pub experts: Vec<usize>,
    pub expert_bytes: u64,
    pub dense_bytes: u64,
    pub kv_blocks: usize,
    pub kv_bytes: u64,
    /// KV blocks homed here whose writer's owner is another node.
    pub kv_spilled_in: usize,
    /// Tokens this node ran through the layer.
    pub tokens: u64,
    /// Time this node spent writing and computing, without barriers.
    pub busy: Duration,
}

/// Prints one row per node.
pub fn print_holdings(rows: &[NodeHoldings]) {
    println!();
    println!(
        "{:>4} {:>9} {:>21} {:>10} {:>10} {:>9} {:>7} {:>10} {:>6} {:>10}  experts held",
        "node", "coord", "used / capacity", "dense", "experts", "KV blocks", "spilled", "KV", "tokens", "busy"
    );
    for row in rows {
        let experts: Vec<String> = row.experts.iter().map(usize::to_string).collect();
        println!(
            "{:>4} {:>9} {:>21} {:>10} {:>10} {:>9} {:>7} {:>10} {:>6} {:>10}  [{}]",
            row.node.0,
            row.coord,
            format!("{} / {}", format_bytes(row.used_bytes), format_bytes(row.capacity_bytes)),
            format_bytes(row.dense_bytes),
            format_bytes(row.expert_bytes),
            row.kv_blocks,
            row.kv_spilled_in,
            format_bytes(row.kv_bytes),
            row.tokens,
            format_duration(row.busy),
            experts.join(", ")
        );
    }
    println!("(spilled: KV blocks homed on this node for a sequence another node owns; busy: time writing and computing)");
}

/// Bytes moved, split by whether they crossed nodes, from a traffic matrix
/// `traffic[source][destination]` in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrafficSummary {
    pub local_bytes: u64,
    pub remote_bytes: u64,
    /// Each byte weighted by the hop distance it travelled.
    pub hop_bytes: u64,
}

impl TrafficSummary {
    /// Sums `traffic` over the node pairs of `mesh`. Rows or columns beyond
    /// the mesh are an error naming the first one.
    pub fn from_matrix(mesh: &Mesh3d, traffic: &[Vec<u64>]) -> Result<Self, String> {
        let mut summary = TrafficSummary::default();
        for (source, row) in traffic.iter().enumerate() {
            for (destination, &bytes) in row.iter().enumerate() {
                let (a, b) = (NodeId(source as u16), NodeId(destination as u16));
                let hops = mesh.hops(a, b).map_err(|_| {
                    format!(
                        "traffic from node {source} to node {destination} is outside the mesh {mesh} of {} nodes",
                        mesh.len()
                    )
                })?;
                if source == destination {
                    summary.local_bytes += bytes;
                } else {
                    summary.remote_bytes += bytes;
                }
                summary.hop_bytes += bytes * u64::from(hops);
            }
        }
        Ok(summary)
    }
}

/// Prints the traffic totals of `phase` and the matrix.
pub fn print_traffic(phase: &str, summary: &TrafficSummary, traffic: &[Vec<u64>]) {
    println!();
    println!(
        "pool traffic during {phase} (bytes read and written through the pool): \
         local {}, remote {}, hop-bytes {}",
        format_bytes(summary.local_bytes),
        format_bytes(summary.remote_bytes),
        format_bytes(summary.hop_bytes)
    );
    println!("by source node (row) and home node (column):");
    let header: Vec<String> = (0..traffic.len()).map(|d| format!("{d:>11}")).collect();
    println!("{:>4} {}", "", header.join(" "));
    for (source, row) in traffic.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(|&b| format!("{:>11}", format_bytes(b))).collect();
        println!("{source:>4} {}", cells.join(" "));
    }
}

/// One row of the comparison of the modes: what one run of the layer
/// moved, what it would cost on the mesh, and whether it was right.
#[derive(Clone, Debug, PartialEq)]
pub struct ModeRow {
    pub label: String,
    /// Bytes read or written on a node other than the reader's.
    pub remote_bytes: u64,
    /// The run's traffic routed over the mesh model's links.
    pub estimate: TrafficEstimate,
    /// Prefetches of an expert to a node, over all nodes.
    pub prefetches: u64,
    /// Pairs of an expert and a node holding a replica of it at the end of
    /// the run, made by prefetches or by reads.
    pub replicas: u64,
    /// Bytes of frames holding replicas at the end of the run.
    pub replica_bytes: u64,
    /// Time the nodes spent waiting for background prefetches, summed.
    pub prefetch_wait: Duration,
    /// Node 0's wall time of the prefill and the decode steps.
    pub wall: Duration,
    /// Whether the hidden states equal the reference bit for bit.
    pub equal: bool,
}

/// Prints one row per mode, estimated on the mesh with `model`.
pub fn print_modes(model: LinkModel, steps: usize, rows: &[ModeRow]) {
    println!();
    println!(
        "modes compared, each a run of the prefill and {steps} decode steps; estimated time on the mesh model \
         at {:.0} GB/s per link and direction and {:.0} ns per hop:",
        model.bandwidth / 1e9,
        model.hop_latency * 1e9
    );
    println!(
        "{:<18} {:>11} {:>11} {:>10} {:>20} {:>10} {:>8} {:>14} {:>12}  equal",
        "mode", "remote", "hop-bytes", "est. time", "busiest link", "prefetches", "replicas", "replica memory", "wall"
    );
    for row in rows {
        let busiest = match row.estimate.busiest {
            Some(((from, to), bytes)) => format!("{from}->{to} {}", format_bytes(bytes)),
            None => "-".into(),
        };
        println!(
            "{:<18} {:>11} {:>11} {:>10} {:>20} {:>10} {:>8} {:>14} {:>12}  {}",
            row.label,
            format_bytes(row.remote_bytes),
            format_bytes(row.estimate.hop_bytes),
            format_seconds(row.estimate.seconds),
            busiest,
            row.prefetches,
            row.replicas,
            format_bytes(row.replica_bytes),
            format_duration(row.wall),
            row.equal
        );
    }
    for row in rows.iter().filter(|r| !r.prefetch_wait.is_zero()) {
        println!(
            "{}: the nodes waited {} in all for background copies before their next step",
            row.label,
            format_duration(row.prefetch_wait)
        );
    }
}

/// Formats seconds with the unit that keeps three to four digits.
fn format_seconds(seconds: f64) -> String {
    if seconds >= 1.0 {
        format!("{seconds:.3} s")
    } else if seconds >= 1e-3 {
        format!("{:.3} ms", seconds * 1e3)
    } else {
        format!("{:.1} us", seconds * 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_formatted() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536), "1.50 KiB");
        assert_eq!(format_bytes(3 << 30), "3.00 GiB");
    }

    #[test]
    fn owners_round_robin() {
        let owners: Vec<u16> = (0..5).map(|i| owner(i, 2).0).collect();
        assert_eq!(owners, vec![0, 1, 0, 1, 0]);
    }

    #[test]
    fn checksum_sees_sign_of_zero() {
        assert_ne!(checksum(&[vec![0.0]]), checksum(&[vec![-0.0]]));
        assert_eq!(checksum(&[vec![1.0, 2.0]]), checksum(&[vec![1.0], vec![2.0]]));
    }

    #[test]
    fn seconds_are_formatted() {
        assert_eq!(format_seconds(2.5), "2.500 s");
        assert_eq!(format_seconds(0.0125), "12.500 ms");
        assert_eq!(format_seconds(226.8e-6), "226.8 us");
        assert_eq!(format_seconds(0.0), "0.0 us");
    }

    #[test]
    fn traffic_summary_weights_hops() {
        let mesh: Mesh3d = "2x2x1".parse().unwrap();
        // Node 0 to node 3 is two hops, node 0 to node 1 one.
        let mut traffic = vec![vec![0u64; 4]; 4];
        traffic[0][0] = 100;
        traffic[0][1] = 10;
        traffic[0][3] = 5;
        let summary = TrafficSummary::from_matrix(&mesh, &traffic).unwrap();
        assert_eq!(summary, TrafficSummary { local_bytes: 100, remote_bytes: 15, hop_bytes: 20 });
    }

    #[test]
    fn traffic_outside_mesh_is_rejected() {
        let mesh: Mesh3d = "2".parse().unwrap();
        let traffic = vec![vec![0u64; 3]; 3];
        let message = TrafficSummary::from_matrix(&mesh, &traffic).unwrap_err();
        assert!(message.contains("to node 2 is outside the mesh"), "{message}");
    }
}
