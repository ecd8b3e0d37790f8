//! Starting one process per node of a mesh on this host and supervising
//! them, as `torchrun` or `mpirun` do.
//!
//! # Lifecycle
//!
//! 1. Check the spec: the program must resolve to an executable file. A bad
//!    spec returns an error before any process starts.
//! 2. Install the SIGINT and SIGTERM handlers (see `signals`), then start
//!    node 0, 1, … in order. Each node gets the environment of
//!    [`node_environment`] on top of the launcher's and the spec's.
//! 3. Watch: reap every node that exits. The first node that exits non-zero
//!    or is killed by a signal stops the run. SIGINT or SIGTERM sent to the
//!    launcher stops it too, and is forwarded to the nodes unchanged.
//! 4. Stop: signal every node, wait up to `grace`, then send SIGKILL.
//! 5. Clean up: reap every node, stop whatever the nodes left behind in their
//!    process groups, and wait for their output to drain.
//!
//! # Processes
//!
//! Each node runs in its own process group, so that stopping a node stops
//! what it started too (a shell's `sleep &`). Ctrl-C in a terminal therefore
//! reaches only the launcher, which forwards it. A node's stdin is
//! `/dev/null`, because a background process group that reads the terminal
//! would be stopped by SIGTTIN.
//!
//! Every node sets `PR_SET_PDEATHSIG` to SIGKILL before `exec`, so the
//! kernel kills the node when the launcher dies, even by SIGKILL. The
//! kernel sends that signal when the thread that started the node exits,
//! which is why [`launch`] starts and waits in the calling thread.
//!
//! NOTE: processes that a node starts do not inherit that setting. When the
//! launcher is killed with SIGKILL, a node's own children outlive it;
//! when it is stopped any other way, they are stopped with their node.

mod exit;
pub mod netns;
mod output;
mod signals;

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::topology::{Coord, Mesh3d, NodeId};

pub use exit::{signal_name, NodeExit};
use output::{line_prefix, OutputCopiers, Stream};
use signals::SignalPipe;

/// Default time between SIGTERM and SIGKILL when nodes are stopped.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// How often the supervisor checks its nodes for an exit. A signal to the
/// launcher wakes it at once; only node exits wait for the tick.
const TICK: Duration = Duration::from_millis(10);

/// How long to wait for node output to drain after every node has exited.
const OUTPUT_DRAIN: Duration = Duration::from_secs(1);

/// The environment variable that carries the group id.
pub const GROUP_VAR: &str = "MESHMEM_GROUP";

/// The environment variable that carries the mesh, as `Mesh3d` displays it.
pub const MESH_VAR: &str = "MESHMEM_MESH";

/// The program, arguments, environment and stop policy of a launch.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    /// The mesh; one process is started per node.
    pub mesh: Mesh3d,
    /// The node program: a path, or a name looked up in `PATH`.
    pub program: PathBuf,
    /// Arguments passed to every node.
    pub args: Vec<OsString>,
    /// Variables set for every node. They override both the launcher's
    /// environment and the variables of [`node_environment`].
    pub env: Vec<(OsString, OsString)>,
    /// Time between SIGTERM (or the forwarded signal) and SIGKILL.
    pub grace: Duration,
    /// Whether node output is copied line by line with a `[node N (x,y,z)] `
    /// prefix. When false, nodes write straight to the launcher's stdout and
    /// stderr.
    pub prefix_output: bool,
    /// Number of simulated hosts that the nodes are spread over, consecutive
    /// ranks per host. With 1, every node runs on this host. More than 1
    /// needs root (see [`netns`]).
    pub hosts: usize,
}

impl LaunchSpec {
    /// Returns a spec with no arguments, no extra environment,
    /// [`DEFAULT_GRACE`] and prefixed output.
    pub fn new(mesh: Mesh3d, program: impl Into<PathBuf>) -> Self {
        LaunchSpec {
            mesh,
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            grace: DEFAULT_GRACE,
            prefix_output: true,
            hosts: 1,
        }
    }
}

/// The outcome of one node.
#[derive(Clone, Debug)]
pub struct NodeReport {
    pub node: NodeId,
    pub coord: Coord,
    pub pid: u32,
    pub exit: NodeExit,
}

/// The reason a run was stopped before every node finished on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// This node exited non-zero or was killed, and the others were stopped.
    NodeFailed(NodeId),
    /// The launcher received this signal and forwarded it to the nodes.
    Signal(i32),
}

/// The outcome of a run in which every node was started and reaped.
#[derive(Clone, Debug)]
pub struct LaunchReport {
    pub mesh: Mesh3d,
    /// The group id that the nodes saw in `MESHMEM_GROUP`.
    pub group: String,
    /// One entry per node, in node order.
    pub nodes: Vec<NodeReport>,
    /// The reason the run was stopped, or `None` when no one stopped it.
    pub cause: Option<StopCause>,
    /// Wall time from the first start to the last reap.
    pub elapsed: Duration,
}

impl LaunchReport {
    /// Checks whether every node exited with code 0.
    pub fn success(&self) -> bool {
        self.cause.is_none() && self.nodes.iter().all(|n| n.exit.success())
    }

    /// Returns the node that stopped the run, or else the first node that
    /// did not exit 0.
    pub fn failed_node(&self) -> Option<&NodeReport> {
        match self.cause {
            Some(StopCause::NodeFailed(node)) => self.nodes.iter().find(|n| n.node == node),
            Some(StopCause::Signal(_)) => None,
            None => self.nodes.iter().find(|n| !n.exit.success()),
        }
    }

    /// Returns the report when every node exited 0, or the error that names
    /// the node or signal that ended the run.
    pub fn into_result(self) -> Result<Self> {
        if let Some(StopCause::Signal(signal)) = self.cause {
            return Err(Error::Interrupted { signal });
        }
        match self.failed_node() {
            Some(n) => Err(Error::NodeFailed { node: n.node, coord: n.coord, exit: n.exit }),
            None if self.success() => Ok(self),
            // Only a report built by hand can name a node it does not list.
            None => Err(Error::Launch {
                reason: format!("the report names a failed node that is not among its {} nodes", self.nodes.len()),
                source: None,
            }),
        }
    }

    /// Formats one line that describes how the run ended and how long it took,
    /// such as `8 nodes of mesh 2x2x2 exited 0 in 1.20 s`.
    pub fn summary(&self) -> String {
        let nodes = self.nodes.len();
        let seconds = self.elapsed.as_secs_f64();
        let mesh = self.mesh;
        if let Some(StopCause::Signal(signal)) = self.cause {
            let signal = signal_name(signal);
            return format!("received {signal}; stopped all {nodes} nodes of mesh {mesh} after {seconds:.2} s");
        }
        match self.failed_node() {
            None if self.success() => format!("{nodes} nodes of mesh {mesh} exited 0 in {seconds:.2} s"),
            None => format!("{nodes} nodes of mesh {mesh} did not all exit 0; the run took {seconds:.2} s"),
            Some(failed) => {
                let others = nodes.saturating_sub(1);
                let noun = if others == 1 { "node" } else { "nodes" };
                format!(
                    "node {} {} {}; stopped the other {others} {noun} of mesh {mesh} after {seconds:.2} s",
                    failed.node, failed.coord, failed.exit,
                )
            }
        }
    }
}

/// Starts one process per node of `spec.mesh`, waits for all of them, and
/// returns `Ok` only if every node exited with code 0.
///
/// A node that fails, or SIGINT or SIGTERM sent to the launcher, stops the
/// others as the module docs describe. The error then names the node and how
/// it ended, or the signal. Use [`supervise`] to get the report in either
/// case.
pub fn launch(spec: &LaunchSpec) -> Result<LaunchReport> {
    supervise(spec)?.into_result()
}

/// Starts and supervises the nodes like [`launch`], but returns the report
/// whenever every node was started and reaped, however they ended.
///
/// Errors: an invalid spec (nothing is started), a node that could not be
/// started (the nodes started before it are stopped and reaped), or failure
/// to set up signal handling.
pub fn supervise(spec: &LaunchSpec) -> Result<LaunchReport> {
    let program = resolve_program(&spec.program, spec_path(spec).as_deref())?;
    let group = new_group_id();
    // Created before any node starts and dropped on every return below,
    // which deletes the namespaces once every node has been reaped.
    let hosts = simulated_hosts(spec)?;
    let master_port = match spec.env.iter().any(|(k, _)| k == "MASTER_PORT") {
        true => None,
        false if hosts.is_some() => Some(HOSTS_MASTER_PORT),
        false => free_loopback_port(),
    };
    tracing::info!(mesh = %spec.mesh, %group, program = %program.display(), hosts = spec.hosts, "starting nodes");

    let signals = SignalPipe::install()?;
    let started = Instant::now();
    let mut copiers = OutputCopiers::new();
    let mut nodes = Vec::with_capacity(spec.mesh.len());
    for node in spec.mesh.nodes() {
        let mut env = node_environment(&spec.mesh, &group, node, master_port);
        let namespace = match &hosts {
            Some((set, secret)) => {
                let host = host_of(spec, node);
                let per_host = spec.mesh.len() / spec.hosts;
                for (key, value) in [
                    ("LOCAL_RANK", (node.index() % per_host).to_string()),
                    ("LOCAL_WORLD_SIZE", per_host.to_string()),
                    ("GROUP_RANK", host.to_string()),
                    ("GROUP_WORLD_SIZE", spec.hosts.to_string()),
                    ("MASTER_ADDR", set.address(0).to_string()),
                    ("MESHMEM_HOST_ADDR", set.address(host).to_string()),
                    ("MESHMEM_SECRET", secret.clone()),
                ] {
                    env.retain(|(k, _)| *k != key);
                    env.push((key, value));
                }
                Some(set.namespace(host))
            }
            None => None,
        };
        match start_node(spec, &program, env, node, namespace.as_deref(), &mut copiers) {
            Ok(running) => nodes.push(running),
            Err(e) => {
                stop(&mut nodes, Signal::SIGTERM, spec.grace, &signals);
                copiers.finish(OUTPUT_DRAIN);
                return Err(e);
            }
        }
    }

    let cause = watch(&mut nodes, spec.grace, &signals);
    clean_up_groups(&nodes, spec.grace);
    let elapsed = started.elapsed();
    drop(signals);

    let still_open = copiers.finish(OUTPUT_DRAIN);
    if still_open > 0 {
        tracing::warn!(%group, still_open, "node output streams are still open after every node exited, because a process that a node started outside its process group keeps them open");
    }

    let nodes = nodes
        .into_iter()
        .map(|n| NodeReport { node: n.node, coord: n.coord, pid: n.child.id(), exit: n.exit.unwrap_or(NodeExit::Lost) })
        .collect();
    Ok(LaunchReport { mesh: spec.mesh, group, nodes, cause, elapsed })
}

/// Checks whether a launcher started this process: `RANK` and
/// `MESHMEM_GROUP` are both set and not empty.
pub fn is_node_process() -> bool {
    let set = |name| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    set("RANK") && set(GROUP_VAR)
}

/// Returns the variables a launcher sets for `node`: those `torchrun` sets
/// for a single host (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
/// `GROUP_RANK`, `GROUP_WORLD_SIZE`, and `MASTER_ADDR` with `MASTER_PORT`
/// when a port is given) and meshmem's `MESHMEM_MESH` and `MESHMEM_GROUP`.
pub fn node_environment(
    mesh: &Mesh3d,
    group: &str,
    node: NodeId,
    master_port: Option<u16>,
) -> Vec<(&'static str, String)> {
    let world = mesh.len().to_string();
    let rank = node.to_string();
    let mut env = vec![
        ("RANK", rank.clone()),
        ("WORLD_SIZE", world.clone()),
        // Every node runs on this host, so local and global ranks agree.
        ("LOCAL_RANK", rank),
        ("LOCAL_WORLD_SIZE", world),
        ("GROUP_RANK", "0".to_string()),
        ("GROUP_WORLD_SIZE", "1".to_string()),
        (MESH_VAR, mesh.to_string()),
        (GROUP_VAR, group.to_string()),
    ];
    if let Some(port) = master_port {
        env.push(("MASTER_ADDR", "127.0.0.1".to_string()));
        env.push(("MASTER_PORT", port.to_string()));
    }
    env
}

/// Returns a group id unique to this run on this host: the launcher's pid
/// and the time in nanoseconds, in hex, such as `mm-1f3a-17c2e5d8a9b40000`.
/// It is short enough to name an abstract Unix socket (107 bytes at most).
pub fn new_group_id() -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("mm-{:x}-{:x}", std::process::id(), nanos as u64)
}

/// Resolves `program` as `execvp` would: a name with a `/` is a path, any
/// other name is looked up in `path` (the `PATH` the nodes will get). The
/// result must be a file with an execute bit set.
pub fn resolve_program(program: &Path, path: Option<&OsStr>) -> Result<PathBuf> {
    let text = program.display().to_string();
    let invalid = |reason: String| Error::InvalidConfig { name: "program", value: text.clone(), reason };

    if program.as_os_str().is_empty() {
        return Err(invalid("the program name is empty; give the program to run on every node".into()));
    }
    if program.as_os_str().as_bytes().contains(&b'/') {
        return match check_executable(program) {
            Ok(()) => Ok(program.to_path_buf()),
            Err(reason) => Err(invalid(reason)),
        };
    }

    let path = path.unwrap_or_default();
    for dir in std::env::split_paths(path) {
        // An empty PATH entry means the current directory, as in execvp.
        let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
        let candidate = dir.join(program);
        if check_executable(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(invalid(format!(
        "not found in PATH ({}); give a path such as `./{text}` or install it",
        path.to_string_lossy()
    )))
}

fn check_executable(path: &Path) -> std::result::Result<(), String> {
    let meta = fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => "no such file; check the path".to_string(),
        _ => format!("cannot read its metadata: {e}"),
    })?;
    if !meta.is_file() {
        return Err("not a regular file; give the program to run, not a directory".into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("not executable; run `chmod +x {}` or run it through its interpreter", path.display()));
    }
    Ok(())
}

/// Returns the `PATH` the nodes will see: the spec's when it sets one.
fn spec_path(spec: &LaunchSpec) -> Option<OsString> {
    match spec.env.iter().rev().find(|(k, _)| k == "PATH") {
        Some((_, v)) => Some(v.clone()),
        None => std::env::var_os("PATH"),
    }
}

/// Returns a loopback port that was free a moment ago, as `torchrun` picks
/// `MASTER_PORT`. Another process may take it before a node binds it.
fn free_loopback_port() -> Option<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).ok()?;
    listener.local_addr().ok().map(|a| a.port())
}

/// A started node.
struct RunningNode {
    node: NodeId,
    coord: Coord,
    child: Child,
    /// Set once the node has been reaped.
    exit: Option<NodeExit>,
}

impl RunningNode {
    /// Returns the node's process group, whose id is the node's pid.
    fn group(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Sends `signal` to the node's process group. A group that is gone
    /// (ESRCH) needs no signal.
    fn signal_group(&self, signal: Signal) {
        match nix::sys::signal::killpg(self.group(), signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => tracing::warn!(node = %self.node, pgid = %self.group(), %signal, error = %e, "failed to signal a node's process group"),
        }
    }

    /// Reaps the node if it has exited, and returns whether it had.
    fn try_reap(&mut self) -> bool {
        if self.exit.is_some() {
            return true;
        }
        match self.child.try_wait() {
            Ok(Some(status)) => self.exit = Some(status.into()),
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!(node = %self.node, pid = self.child.id(), error = %e, "failed to reap a node");
                self.exit = Some(NodeExit::Lost);
            }
        }
        true
    }
}

/// `MASTER_PORT` of a run over simulated hosts: node 0's namespace is new
/// and empty, so any port is free there.
const HOSTS_MASTER_PORT: u16 = 29500;

/// Creates the simulated hosts of `spec` and the group's secret, or `None`
/// when every node runs on this host.
fn simulated_hosts(spec: &LaunchSpec) -> Result<Option<(netns::SimulatedHosts, String)>> {
    if spec.hosts <= 1 {
        return Ok(None);
    }
    let nodes = spec.mesh.len();
    if nodes % spec.hosts != 0 {
        return Err(Error::InvalidConfig {
            name: "--hosts",
            value: spec.hosts.to_string(),
            reason: format!("the mesh {} has {nodes} nodes, which do not split evenly over {} hosts", spec.mesh, spec.hosts),
        });
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::Launch {
            reason: format!(
                "--hosts {} creates network namespaces, which needs root; run as root or drop --hosts",
                spec.hosts
            ),
            source: None,
        });
    }
    // The secret travels in hex, in the nodes' environment only.
    #[cfg(feature = "tcp")]
    let secret = crate::transport::tcp::Secret::generate()?.to_hex();
    #[cfg(not(feature = "tcp"))]
    return Err(Error::Launch { reason: "--hosts needs a build with the `tcp` feature".into(), source: None });
    #[cfg(feature = "tcp")]
    Ok(Some((netns::SimulatedHosts::create(spec.hosts)?, secret)))
}

/// Returns the simulated host of `node`: consecutive ranks share a host.
fn host_of(spec: &LaunchSpec, node: NodeId) -> usize {
    node.index() / (spec.mesh.len() / spec.hosts.max(1)).max(1)
}

/// Describes the transports that a run of `spec` used, as the pool selects
/// them for its hosts unless `MESHMEM_TRANSPORT` forces one.
pub fn transports_used(spec: &LaunchSpec) -> String {
    let forced = spec
        .env
        .iter()
        .find(|(k, _)| k == crate::transport::select::TRANSPORT_ENV)
        .map(|(_, v)| v.to_string_lossy().into_owned())
        .or_else(|| std::env::var(crate::transport::select::TRANSPORT_ENV).ok())
        .filter(|v| !v.is_empty() && v != "auto");
    match (spec.hosts, forced) {
        (_, Some(kind)) => format!("{kind} between distinct nodes (forced by MESHMEM_TRANSPORT)"),
        (0 | 1, None) => "shm between every pair of nodes".to_string(),
        (hosts, None) => format!("shm between nodes of one host, tcp between the {hosts} simulated hosts"),
    }
}

fn start_node(
    spec: &LaunchSpec,
    program: &Path,
    env: Vec<(&'static str, String)>,
    node: NodeId,
    namespace: Option<&str>,
    copiers: &mut OutputCopiers,
) -> Result<RunningNode> {
    let coord = spec.mesh.coord(node)?;
    // In a simulated host, `ip netns exec` enters the namespace and execs
    // the program, so the child's pid is the node's.
    let mut command = match namespace {
        Some(namespace) => {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", namespace]).arg(program);
            command
        }
        None => {
            let mut command = Command::new(program);
            command.arg0(&spec.program);
            command
        }
    };
    command
        .args(&spec.args)
        .envs(env)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .process_group(0);
    if spec.prefix_output {
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
    }

    let launcher = nix::unistd::getpid();
    // SAFETY: the closure runs between fork and exec, so it may only make
    // async-signal-safe calls and must not allocate: prctl and getppid are
    // plain system calls, and `from_raw_os_error` builds an error without
    // allocating.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The launcher may have died before prctl ran, and then no signal
            // will come: the node has been reparented, so give up.
            if libc::getppid() != launcher.as_raw() {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }

    let mut child = command.spawn().map_err(|source| Error::Spawn {
        node,
        coord,
        program: spec.program.clone(),
        source,
    })?;
    tracing::debug!(%node, %coord, pid = child.id(), "started node");

    let prefix = line_prefix(node, coord);
    let streams = [
        (child.stdout.take().map(|s| Box::new(s) as Box<dyn io::Read + Send>), Stream::Stdout),
        (child.stderr.take().map(|s| Box::new(s) as Box<dyn io::Read + Send>), Stream::Stderr),
    ];
    let mut running = RunningNode { node, coord, child, exit: None };
    for (source, stream) in streams {
        let Some(source) = source else { continue };
        if let Err(e) = copiers.copy(source, stream, prefix.clone()) {
            // The node is ours to stop: its output has nowhere to go.
            running.signal_group(Signal::SIGKILL);
            let _ = running.child.wait();
            return Err(Error::Launch {
                reason: format!("cannot start a thread to copy the output of node {node} {coord}; lower the number of nodes or raise the thread limit"),
                source: Some(e),
            });
        }
    }
    Ok(running)
}

/// Waits until every node has been reaped, stopping the others when one
/// fails or the launcher receives a stop signal. Returns what stopped the
/// run, if anything did.
fn watch(nodes: &mut [RunningNode], grace: Duration, signals: &SignalPipe) -> Option<StopCause> {
    let mut cause = None;
    // None until a stop begins, and also when `grace` is too long to add.
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;

    loop {
        // 1. Reap what exited; the first failure stops the others.
        let mut all_reaped = true;
        for i in 0..nodes.len() {
            let was_running = nodes[i].exit.is_none();
            if !nodes[i].try_reap() {
                all_reaped = false;
                continue;
            }
            let exit = nodes[i].exit.unwrap_or(NodeExit::Lost);
            if was_running && cause.is_none() && !exit.success() {
                let (node, coord) = (nodes[i].node, nodes[i].coord);
                tracing::warn!(%node, %coord, %exit, "node failed; stopping the others");
                cause = Some(StopCause::NodeFailed(node));
                signal_all(nodes, Signal::SIGTERM);
                kill_at = deadline_after(grace);
            }
        }
        if all_reaped {
            return cause;
        }

        // 2. Past the grace period, SIGKILL whatever is left.
        if !killed && kill_at.is_some_and(|at| Instant::now() >= at) {
            tracing::warn!(?grace, "nodes still running after the grace period; sending SIGKILL");
            signal_all(nodes, Signal::SIGKILL);
            killed = true;
        }

        // 3. Sleep until the next tick or a signal to the launcher. A second
        //    signal while stopping means the user does not want to wait.
        let Some(received) = signals.wait(TICK) else { continue };
        let signal = Signal::try_from(received).unwrap_or(Signal::SIGTERM);
        if cause.is_none() {
            tracing::warn!(%signal, "launcher received a signal; forwarding it to the nodes");
            cause = Some(StopCause::Signal(received));
            signal_all(nodes, signal);
            kill_at = deadline_after(grace);
        } else if !killed {
            tracing::warn!(%signal, "launcher received another signal while stopping; sending SIGKILL");
            signal_all(nodes, Signal::SIGKILL);
            killed = true;
        }
    }
}

/// Returns when a grace period that starts now ends, or `None` when it is
/// too long to represent, which means SIGKILL is never sent.
fn deadline_after(grace: Duration) -> Option<Instant> {
    Instant::now().checked_add(grace)
}

/// Sends `signal` to the process group of every node, reaped or not, so that
/// what a reaped node left behind is stopped as well.
fn signal_all(nodes: &[RunningNode], signal: Signal) {
    for node in nodes {
        node.signal_group(signal);
    }
}

/// Stops the started nodes, as after a failure, and reaps them.
fn stop(nodes: &mut [RunningNode], signal: Signal, grace: Duration, signals: &SignalPipe) {
    signal_all(nodes, signal);
    let kill_at = deadline_after(grace);
    while !nodes.iter_mut().all(|n| n.try_reap()) {
        if kill_at.is_some_and(|at| Instant::now() >= at) {
            signal_all(nodes, Signal::SIGKILL);
            for node in nodes.iter_mut() {
                if node.exit.is_none() {
                    node.exit = Some(node.child.wait().map_or(NodeExit::Lost, NodeExit::from));
                }
            }
            return;
        }
        signals.wait(TICK);
    }
}

/// Stops processes that reaped nodes left in their process groups (a
/// shell's background job): SIGTERM, then SIGKILL after `grace`.
///
/// Those processes are not children of the launcher, so their new parent
/// (init or a subreaper) reaps them, sometimes late. Zombies waiting for it
/// therefore count as stopped; see [`groups_with_live_members`].
fn clean_up_groups(nodes: &[RunningNode], grace: Duration) {
    let live = groups_with_live_members(nodes);
    if live.is_empty() {
        return;
    }

    let leftovers: Vec<&RunningNode> = nodes.iter().filter(|n| live.contains(&n.group())).collect();
    for node in &leftovers {
        tracing::info!(node = %node.node, pgid = %node.group(), "stopping processes the node left behind");
        node.signal_group(Signal::SIGTERM);
    }
    let kill_at = deadline_after(grace);
    while !groups_with_live_members(&leftovers).is_empty() {
        if kill_at.is_some_and(|at| Instant::now() >= at) {
            for node in &leftovers {
                node.signal_group(Signal::SIGKILL);
            }
            return;
        }
        std::thread::sleep(TICK);
    }
}

/// Returns the process groups of `nodes` that still contain a process that
/// is not a zombie, read from `/proc/*/stat`.
///
/// Where `/proc` cannot be read, falls back to `kill(-pgid, 0)`, which also
/// counts zombies, so the cleanup may then wait out the grace period.
fn groups_with_live_members<N: std::borrow::Borrow<RunningNode>>(nodes: &[N]) -> Vec<Pid> {
    let groups: Vec<Pid> = nodes.iter().map(|n| n.borrow().group()).collect();
    let Ok(entries) = fs::read_dir("/proc") else {
        return groups.into_iter().filter(|g| kill(Pid::from_raw(-g.as_raw()), None).is_ok()).collect();
    };

    let mut live = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.as_bytes().iter().all(u8::is_ascii_digit) {
            continue;
        }
        // A process may exit between read_dir and read; it is then gone.
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else { continue };
        let Some((state, pgid)) = parse_stat_state_and_pgid(&stat) else { continue };
        let pgid = Pid::from_raw(pgid);
        if state != 'Z' && state != 'X' && groups.contains(&pgid) && !live.contains(&pgid) {
            live.push(pgid);
        }
    }
    live
}

/// Returns the state and process group from a `/proc/PID/stat` line:
/// `pid (comm) state ppid pgrp ...`. The command name may contain spaces
/// and parentheses, so fields are counted from the last `)`.
fn parse_stat_state_and_pgid(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgid = fields.next()?.parse().ok()?;
    Some((state, pgid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_map(env: &[(&'static str, String)]) -> std::collections::HashMap<&'static str, String> {
        env.iter().cloned().collect()
    }

    #[test]
    fn stat_line_is_parsed() {
        let line = "4242 (odd) name)) S 1 4240 4240 0 -1 4194560 0 0";
        assert_eq!(parse_stat_state_and_pgid(line), Some(('S', 4240)));
        assert_eq!(parse_stat_state_and_pgid("1 (init) Z 0 1 1"), Some(('Z', 1)));
        assert_eq!(parse_stat_state_and_pgid("garbage"), None);
        assert_eq!(parse_stat_state_and_pgid("1 (x) R 0 notanumber"), None);
    }

    #[test]
    fn environment_matches_torchrun() {
        let mesh: Mesh3d = "2x2x2".parse().unwrap();
        let env = env_map(&node_environment(&mesh, "mm-1-2", NodeId(5), Some(29500)));
        assert_eq!(env["RANK"], "5");
        assert_eq!(env["WORLD_SIZE"], "8");
        assert_eq!(env["LOCAL_RANK"], "5");
        assert_eq!(env["LOCAL_WORLD_SIZE"], "8");
        assert_eq!(env["GROUP_RANK"], "0");
        assert_eq!(env["GROUP_WORLD_SIZE"], "1");
        assert_eq!(env["MASTER_ADDR"], "127.0.0.1");
        assert_eq!(env["MASTER_PORT"], "29500");
        assert_eq!(env["MESHMEM_MESH"], "2x2x2");
        assert_eq!(env["MESHMEM_GROUP"], "mm-1-2");
    }

    #[test]
    fn environment_mesh_parses_back() {
        let torus: Mesh3d = "4x2x1:torus".parse().unwrap();
        let env = env_map(&node_environment(&torus, "g", NodeId(0), None));
        assert_eq!(env["MESHMEM_MESH"].parse::<Mesh3d>().unwrap(), torus);
        assert!(!env.contains_key("MASTER_ADDR"));
        assert!(!env.contains_key("MASTER_PORT"));
    }

    #[test]
    fn group_ids_are_unique_and_short() {
        let a = new_group_id();
        let b = new_group_id();
        assert_ne!(a, b);
        assert!(a.starts_with("mm-"), "{a}");
        assert!(a.len() < 40, "{a}");
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-'), "{a}");
    }

    #[test]
    fn program_is_found_in_path() {
        let path = std::env::var_os("PATH");
        let sh = resolve_program(Path::new("sh"), path.as_deref()).unwrap();
        assert!(sh.ends_with("sh"), "{}", sh.display());
        assert!(resolve_program(Path::new("/bin/sh"), None).is_ok());
    }

    #[test]
    fn missing_program_is_rejected() {
        let err = resolve_program(Path::new("no-such-program-xyz"), Some(OsStr::new("/nonexistent"))).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, Error::InvalidConfig { name: "program", .. }), "{text}");
        assert!(text.contains("`no-such-program-xyz`"), "{text}");
        assert!(text.contains("not found in PATH"), "{text}");

        let err = resolve_program(Path::new("/nonexistent/prog"), None).unwrap_err().to_string();
        assert!(err.contains("`/nonexistent/prog`"), "{err}");
        assert!(err.contains("no such file"), "{err}");

        let err = resolve_program(Path::new(""), None).unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
    }

    #[test]
    fn directory_and_plain_file_are_rejected() {
        let err = resolve_program(Path::new("/"), None).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");

        let file = std::env::temp_dir().join(format!("meshmem-not-exec-{}", std::process::id()));
        fs::write(&file, "echo hi\n").unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        let err = resolve_program(&file, None).unwrap_err().to_string();
        fs::remove_file(&file).unwrap();
        assert!(err.contains("not executable"), "{err}");
        assert!(err.contains("chmod +x"), "{err}");
    }

    fn report(exits: &[NodeExit], cause: Option<StopCause>) -> LaunchReport {
        let mesh = Mesh3d::new([exits.len() as u16, 1, 1], false).unwrap();
        let nodes = exits
            .iter()
            .enumerate()
            .map(|(i, &exit)| {
                let node = NodeId(i as u16);
                NodeReport { node, coord: mesh.coord(node).unwrap(), pid: 100 + i as u32, exit }
            })
            .collect();
        LaunchReport { mesh, group: "g".into(), nodes, cause, elapsed: Duration::from_millis(1500) }
    }

    #[test]
    fn report_of_clean_run_is_ok() {
        let ok = report(&[NodeExit::Code(0), NodeExit::Code(0)], None);
        assert!(ok.success());
        assert_eq!(ok.summary(), "2 nodes of mesh 2x1x1 exited 0 in 1.50 s");
        assert!(ok.into_result().is_ok());
    }

    #[test]
    fn report_names_failed_node() {
        let kill = NodeExit::Signal { signal: libc::SIGKILL, core_dumped: false };
        let term = NodeExit::Signal { signal: libc::SIGTERM, core_dumped: false };
        let failed = report(&[term, kill, term], Some(StopCause::NodeFailed(NodeId(1))));
        assert!(!failed.success());
        assert_eq!(
            failed.summary(),
            "node 1 (1,0,0) was killed by signal SIGKILL; stopped the other 2 nodes of mesh 3x1x1 after 1.50 s"
        );
        let err = failed.into_result().unwrap_err().to_string();
        assert_eq!(err, "node 1 (1,0,0) was killed by signal SIGKILL");
    }

    #[test]
    fn report_names_launcher_signal() {
        let term = NodeExit::Signal { signal: libc::SIGTERM, core_dumped: false };
        let stopped = report(&[term], Some(StopCause::Signal(libc::SIGTERM)));
        assert!(stopped.summary().starts_with("received SIGTERM; stopped all 1 nodes"));
        let err = stopped.into_result().unwrap_err();
        assert!(matches!(err, Error::Interrupted { signal } if signal == libc::SIGTERM));
        assert!(err.to_string().contains("SIGTERM"), "{err}");
    }

    #[test]
    fn report_with_foreign_cause_does_not_panic() {
        let failed = report(&[NodeExit::Code(0)], Some(StopCause::NodeFailed(NodeId(9))));
        assert!(failed.failed_node().is_none());
        assert!(!failed.success());
        assert!(failed.summary().contains("did not all exit 0"), "{}", failed.summary());
        assert!(failed.into_result().is_err());
    }

    #[test]
    fn huge_grace_has_no_deadline() {
        assert!(deadline_after(Duration::MAX).is_none());
        assert!(deadline_after(Duration::from_secs(1)).is_some());
    }
}
