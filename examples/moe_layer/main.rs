//! One MoE transformer layer over a batch of requests from the Mooncake
//! conversation trace, with a paged KV cache whose prompt-prefix blocks are
//! shared between requests. The layer runs across the node processes of a
//! meshmem pool and is checked bit for bit against a single-process
//! reference.
//!
//! Started by hand, the program picks a batch from the trace, plans which
//! KV blocks the requests share, sizes each node's pool memory, and starts
//! itself once per node of `--mesh` (8 on a 2x2x2 mesh by default) through
//! `meshmem::launch`. Each node process runs `driver::run_node`; node 0
//! prints the plan, the comparison and the report. See `README.md` beside
//! this file.

mod balance;
mod cli;
mod driver;
mod kernels;
mod model;
mod prefix;
mod reference;
mod report;
mod sequence;
mod trace;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;

use crate::model::ModelConfig;
use crate::prefix::SharingPlan;
use crate::sequence::Workload;
use crate::trace::{Scale, Sequence, TraceError};

/// The trace slice shipped with the example, used when `--trace` is absent.
const DEFAULT_TRACE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/examples/data/mooncake_conversation_slice.jsonl");

/// Reason the program stopped, with its exit status.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// Options that do not fit together; exit status 2, as for clap's own
    /// errors.
    #[error("{0}")]
    Usage(String),

    /// A trace that cannot be used; exit status 2.
    #[error(transparent)]
    Trace(#[from] TraceError),

    /// The run failed; exit status 1.
    #[error("{0}")]
    Run(String),
}

impl Failure {
    fn exit_code(&self) -> ExitCode {
        match self {
            Failure::Usage(_) | Failure::Trace(_) => ExitCode::from(2),
            Failure::Run(_) => ExitCode::FAILURE,
        }
    }
}

fn main() -> ExitCode {
    let args = cli::Args::parse();
    let node = meshmem::launch::is_node_process();
    let result = match node {
        true => run_node(&args),
        false => run_launcher(&args),
    };
    match result {
        Ok(code) => code,
        Err(failure) => {
            match node {
                // The launcher names the node again when it stops the run.
                true => eprintln!("error: node {}: {failure}", node_name()),
                false => eprintln!("error: {failure}"),
            }
            failure.exit_code()
        }
    }
}

/// The batch, its sharing plan and the layer shape, the same in every
/// process because they derive from the options and the trace alone.
struct Prepared {
    cfg: ModelConfig,
    trace_path: PathBuf,
    requests: usize,
    workload: Workload,
    plan: SharingPlan,
}

fn prepare(args: &cli::Args) -> Result<Prepared, Failure> {
    args.check().map_err(Failure::Usage)?;
    let cfg = ModelConfig::from_preset(args.preset);
    let scale = match args.scale {
        Some(scale) => scale,
        None => Scale::new(cfg.default_scale).map_err(Failure::Usage)?,
    };
    let trace_path = args.trace.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_TRACE));
    let (requests, workload) = load_workload(&trace_path, args, scale)?;
    let plan = SharingPlan::build(&workload.sequences, scale, workload.steps, true);
    Ok(Prepared { cfg, trace_path, requests, workload, plan })
}

/// Checks the options and the trace, then starts one node process per node
/// of the mesh and waits for them. Exits 1 when a node fails, naming it.
fn run_launcher(args: &cli::Args) -> Result<ExitCode, Failure> {
    let prepared = prepare(args)?;
    let page = driver::page_size(&prepared.cfg);
    let capacity = args.node_capacity.unwrap_or_else(|| {
        let replicas = args.replicate_hot.is_some() || args.prefetch;
        driver::default_node_capacity(&prepared.cfg, args.placement, args.mesh.len(), &prepared.plan, args.steps, replicas)
    });
    let report = driver::launch(args, capacity, page)
        .map_err(|e| Failure::Run(format!("starting the nodes of mesh {} failed: {e}", args.mesh)))?;
    if report.success() {
        println!();
        println!("{}", report.summary());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("error: {}", report.summary());
        Ok(ExitCode::FAILURE)
    }
}

/// Runs this process's node of the group; node 0 also prints the plan and
/// the report.
fn run_node(args: &cli::Args) -> Result<ExitCode, Failure> {
    let adopted = adopt_launch_environment(args)?;
    let args = &adopted;
    let prepared = prepare(args)?;
    let Prepared { cfg, trace_path, requests, workload, plan } = &prepared;
    let print = || report::print_setup(cfg, trace_path, *requests, workload);
    let setup = driver::Setup { args, cfg, workload, plan, print: &print };
    match driver::run_node(&setup) {
        Ok(true) => Ok(ExitCode::SUCCESS),
        Ok(false) => Ok(ExitCode::FAILURE),
        Err(driver::NodeError::Reported) => Ok(ExitCode::FAILURE),
        Err(e) => Err(Failure::Run(e.to_string())),
    }
}

/// Reconciles the options with the environment of a launcher that is not
/// this example (`meshmem run -- moe_layer ...`): the mesh comes from the
/// launcher, and an explicit `--mesh` that differs is an error; the page
/// size and node capacity the example would choose are set for the pool
/// unless the environment already sets them, and an explicit
/// `--node-capacity` always wins. Every node computes the same values, so
/// they agree when they join.
fn adopt_launch_environment(args: &cli::Args) -> Result<cli::Args, Failure> {
    let mut args = args.clone();
    let explicit = |flag: &str| std::env::args().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
    if let Ok(text) = std::env::var(meshmem::launch::MESH_VAR) {
        let mesh: meshmem::Mesh3d = text
            .parse()
            .map_err(|e| Failure::Usage(format!("the launcher's {} is invalid: {e}", meshmem::launch::MESH_VAR)))?;
        if explicit("--mesh") && mesh != args.mesh {
            return Err(Failure::Usage(format!(
                "--mesh {} differs from the mesh {mesh} the launcher started; drop --mesh, or start the example by itself so that it launches the {} nodes of mesh {}",
                args.mesh,
                args.mesh.len(),
                args.mesh
            )));
        }
        args.mesh = mesh;
    }
    let cfg = ModelConfig::from_preset(args.preset);
    if std::env::var("MESHMEM_PAGE_SIZE").is_err() {
        std::env::set_var("MESHMEM_PAGE_SIZE", driver::page_size(&cfg).to_string());
    }
    if let Some(capacity) = args.node_capacity {
        std::env::set_var("MESHMEM_NODE_CAPACITY", capacity.to_string());
    } else if std::env::var("MESHMEM_NODE_CAPACITY").is_err() {
        let prepared = prepare(&args)?;
        let replicas = args.replicate_hot.is_some() || args.prefetch;
        let capacity = driver::default_node_capacity(&cfg, args.placement, args.mesh.len(), &prepared.plan, args.steps, replicas);
        std::env::set_var("MESHMEM_NODE_CAPACITY", capacity.to_string());
    }
    Ok(args)
}

/// This node's id and coordinate from the launcher's environment, for error
/// messages written before or without a pool.
fn node_name() -> String {
    let rank = std::env::var("RANK").unwrap_or_else(|_| "?".into());
    let coord = rank
        .parse::<u16>()
        .ok()
        .and_then(|r| std::env::var(meshmem::launch::MESH_VAR).ok()?.parse::<meshmem::Mesh3d>().ok()?.coord(meshmem::NodeId(r)).ok());
    match coord {
        Some(coord) => format!("{rank} {coord}"),
        None => rank,
    }
}

/// Reads the trace, picks the batch and scales it. Returns the number of
/// requests in the trace and the workload.
fn load_workload(
    path: &Path,
    args: &cli::Args,
    scale: Scale,
) -> Result<(usize, Workload), Failure> {
    let requests = trace::load(path)?;
    let batch = trace::select_batch(path, &requests, args.batch)?;
    let sequences = batch.iter().map(|r| Sequence::scaled(r, scale)).collect();
    let workload = Workload { seed: args.seed, scale, steps: args.steps, sequences };
    Ok((requests.len(), workload))
}
