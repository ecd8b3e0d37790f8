//! One MoE transformer layer over a batch of requests from the Mooncake
//! conversation trace, with a paged KV cache whose prompt-prefix blocks are
//! shared between requests.
//!
//! The program picks a batch from the trace, scales its lengths down, plans
//! which KV blocks the requests share, generates the layer's weights from
//! `--seed`, and runs the prefill and `--steps` decode steps in this
//! process, printing what it computed. See `README.md` beside this file.
//!
//! NOTE: `driver.rs` contains the distributed run over a meshmem pool (8
//! node processes on a 2x2x2 mesh by default, checked bit for bit against
//! this reference). It is not compiled in yet, because the crate does not
//! export the pool API it calls. Until then `--mesh` and `--placement` are
//! checked and reported but do not change the result.

mod cli;
mod kernels;
mod model;
mod prefix;
mod reference;
mod report;
mod sequence;
mod trace;

// The distributed run, kept out of the build until the pool API exists.
// Once it does, `run` calls `driver::launch` when `driver::is_node()` is
// false and `driver::run_node` in each node process.
#[cfg(any())]
mod driver;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use crate::model::{ModelConfig, Weights};
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

    /// The computation failed; exit status 1.
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
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {failure}");
            failure.exit_code()
        }
    }
}

fn run(args: &cli::Args) -> Result<(), Failure> {
    args.check().map_err(Failure::Usage)?;
    let cfg = ModelConfig::from_preset(args.preset);
    let scale = match args.scale {
        Some(scale) => scale,
        None => Scale::new(cfg.default_scale).map_err(Failure::Usage)?,
    };

    let trace_path = args.trace.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_TRACE));
    let (requests, workload) = load_workload(&trace_path, args, scale)?;
    let plan = SharingPlan::build(&workload.sequences, scale, workload.steps, true);
    report::print_setup(&cfg, &trace_path, requests, &workload);
    println!("mesh {}, placement {} (used by the distributed run only)", args.mesh, args.placement);
    report::print_plan(&cfg, &workload, &plan, &args.mesh);

    let started = Instant::now();
    let weights = Weights::generate(&cfg, workload.seed);
    println!();
    println!("weights generated from seed {} in {:.3} s", workload.seed, started.elapsed().as_secs_f64());

    let (out, timings) = reference::run(&cfg, &weights, &workload, &plan)
        .map_err(|e| Failure::Run(format!("reference run failed: {e}")))?;
    report::print_run("reference", &out, &timings);
    let values: usize = out.hidden_states.iter().map(Vec::len).sum();
    println!("{values} hidden-state values computed");
    Ok(())
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
