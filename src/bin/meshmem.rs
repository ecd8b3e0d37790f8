//! The `meshmem` command: launch a program on every node of a mesh on this
//! host, or show a mesh's nodes and hop distances.
//!
//! Exit codes of `meshmem run`:
//! - 0: every node exited with code 0.
//! - 1: a node exited non-zero or was killed by a signal; the others were
//!   stopped.
//! - 2: invalid arguments, or the nodes could not be started. Nothing is
//!   left running.
//! - 128 + N: the launcher received signal N (130 for SIGINT, 143 for
//!   SIGTERM) and stopped every node.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use meshmem::launch::{self, LaunchSpec, StopCause};
use meshmem::Mesh3d;

/// Above this many nodes, `meshmem mesh` prints no hop matrix, because its
/// rows would no longer fit a terminal.
const MAX_MATRIX_NODES: usize = 32;

#[derive(Parser)]
#[command(name = "meshmem", version, about = "Pool the memory of a 3D mesh of node processes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start PROGRAM once per node of the mesh and wait for all of them.
    ///
    /// Each node gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
    /// GROUP_RANK, GROUP_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, MESHMEM_MESH
    /// and MESHMEM_GROUP. When a node fails, the others get SIGTERM, then
    /// SIGKILL after the grace period. Exit code: 0 when every node exited 0,
    /// 1 when a node failed, 2 for invalid arguments, 128+N when the
    /// launcher received signal N.
    #[command(arg_required_else_help = true)]
    Run {
        /// Mesh shape: X, XxY or XxYxZ, with `:torus` to wrap (such as 2x2x2).
        #[arg(long, value_parser = parse_mesh)]
        mesh: Mesh3d,

        /// Milliseconds between SIGTERM and SIGKILL when nodes are stopped.
        #[arg(long, value_name = "MS", default_value_t = launch::DEFAULT_GRACE.as_millis() as u64)]
        grace_ms: u64,

        /// Set a variable for every node (repeatable); overrides the launcher's.
        #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
        env: Vec<(OsString, OsString)>,

        /// Pass node output through as is, without the `[node N (x,y,z)] ` prefix.
        #[arg(long)]
        no_prefix: bool,

        /// Spread the nodes over N simulated hosts (network namespaces,
        /// consecutive ranks per host), joined over TCP with a random group
        /// secret. Needs root.
        #[arg(long, value_name = "N", default_value_t = 1)]
        hosts: usize,

        /// The program to run on every node, and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true, value_name = "PROGRAM")]
        command: Vec<OsString>,
    },

    /// Print the nodes of a mesh with their coordinates and hop distances.
    Mesh {
        /// Mesh shape: X, XxY or XxYxZ, with `:torus` to wrap (such as 2x2x2).
        #[arg(value_parser = parse_mesh)]
        mesh: Mesh3d,
    },
}

fn parse_mesh(text: &str) -> Result<Mesh3d, String> {
    text.parse::<Mesh3d>().map_err(|e| e.to_string())
}

fn parse_env(text: &str) -> Result<(OsString, OsString), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.into(), value.into())),
        _ => Err(format!("`{text}` is not KEY=VALUE; write it as NAME=value")),
    }
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    match cli.command {
        Command::Run { mesh, grace_ms, env, no_prefix, hosts, command } => {
            let mut command = command.into_iter();
            // clap requires at least one value, so a program is present.
            let program = PathBuf::from(command.next().unwrap_or_default());
            let spec = LaunchSpec {
                mesh,
                program,
                args: command.collect(),
                env,
                grace: Duration::from_millis(grace_ms),
                prefix_output: !no_prefix,
                hosts,
            };
            run(&spec)
        }
        Command::Mesh { mesh } => {
            print!("{}", mesh_table(&mesh));
            ExitCode::SUCCESS
        }
    }
}

/// Sends logs to stderr, filtered by `MESHMEM_LOG` (such as `debug`), or
/// warnings and errors only when it is unset or invalid.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MESHMEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .init();
}

fn run(spec: &LaunchSpec) -> ExitCode {
    let report = match launch::supervise(spec) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("meshmem: error: {e}");
            return ExitCode::from(2);
        }
    };

    let code = match report.cause {
        None if report.success() => 0,
        None | Some(StopCause::NodeFailed(_)) => 1,
        Some(StopCause::Signal(signal)) => 128 + signal.clamp(0, 127) as u8,
    };
    if let Err(e) = report.clone().into_result() {
        eprintln!("meshmem: error: {e}");
    }
    eprintln!("meshmem: {}", report.summary());
    eprintln!("meshmem: transports: {}", launch::transports_used(spec));
    ExitCode::from(code)
}

/// Formats the nodes of `mesh` with their coordinates and, for small
/// meshes, the hop distance from each node to every other.
fn mesh_table(mesh: &Mesh3d) -> String {
    use std::fmt::Write;

    let nodes: Vec<_> = mesh.nodes().collect();
    let hops = |a, b| mesh.hops(a, b).unwrap_or(u32::MAX);
    let pairs = nodes.iter().flat_map(|&a| nodes.iter().map(move |&b| (a, b)));
    let diameter = pairs.map(|(a, b)| hops(a, b)).max().unwrap_or(0);
    let kind = if mesh.wrap { "torus" } else { "mesh" };

    let mut out = String::new();
    let _ = writeln!(out, "{kind} {mesh}: {} nodes, diameter {diameter} hops", nodes.len());
    let matrix = nodes.len() <= MAX_MATRIX_NODES;
    let width = nodes.len().saturating_sub(1).to_string().len().max(2);
    let _ = write!(out, "{:>4}  {:<17}", "node", "coord");
    if matrix {
        let _ = write!(out, " hops to node");
        for b in &nodes {
            let _ = write!(out, " {:>width$}", b.0);
        }
    }
    out.push('\n');

    for &a in &nodes {
        let coord = mesh.coord(a).map(|c| c.to_string()).unwrap_or_default();
        let _ = write!(out, "{:>4}  {:<17}", a.0, coord);
        if matrix {
            let _ = write!(out, " {:12}", "");
            for &b in &nodes {
                let _ = write!(out, " {:>width$}", hops(a, b));
            }
        }
        out.push('\n');
    }
    if !matrix {
        let _ = writeln!(out, "(hop matrix left out above {MAX_MATRIX_NODES} nodes)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_table_lists_coords_and_hops() {
        let mesh: Mesh3d = "2x2x1".parse().unwrap();
        let table = mesh_table(&mesh);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "mesh 2x2x1: 4 nodes, diameter 2 hops");
        assert!(lines[2].contains("(0,0,0)"), "{table}");
        assert!(lines[2].ends_with(" 0  1  1  2"), "{table}");
        assert!(lines[5].contains("(1,1,0)"), "{table}");
        assert!(lines[5].ends_with(" 2  1  1  0"), "{table}");
    }

    #[test]
    fn mesh_table_skips_matrix_of_large_mesh() {
        let table = mesh_table(&"8x8x1".parse().unwrap());
        assert!(table.contains("hop matrix left out"), "{table}");
        assert_eq!(table.lines().count(), 2 + 64 + 1);
    }

    #[test]
    fn env_pairs_need_a_key() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert_eq!(parse_env("A=").unwrap(), ("A".into(), "".into()));
        assert!(parse_env("=x").unwrap_err().contains("`=x`"));
        assert!(parse_env("novalue").unwrap_err().contains("KEY=VALUE"));
    }

    #[test]
    fn cli_definition_is_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
