//! Groups that span simulated hosts: one network namespace per host.
//!
//! Each test starts copies of this test binary as node processes inside the
//! namespaces (`ip netns exec`), filtered to `node_process`, with a scenario
//! name and the environment a launcher sets. The parent kills and reaps
//! every child and deletes every namespace, also when an assertion fails.
//! Without root or `ip`, the tests print why they did not run.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use meshmem::config::HostsConfig;
use meshmem::launch::netns::SimulatedHosts;
use meshmem::transport::tcp::Secret;
use meshmem::transport::TransportKind;
use meshmem::{Config, GlobalAddr, NodeId, Placement, Pool};

const SCENARIO: &str = "MESHMEM_TEST_SCENARIO";
const SECRET: &str = "simulated hosts test secret";
const MASTER_PORT: u16 = 29411;
/// The directory the callback scenario's all-gather goes through.
const GATHER_DIR: &str = "MESHMEM_TEST_GATHER_DIR";

/// Returns why simulated hosts cannot run here, if they cannot.
fn unavailable() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("creating network namespaces needs root");
    }
    let ip = std::process::Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !ip.is_ok_and(|s| s.success()) {
        return Some("`ip` (iproute2) is not installed");
    }
    None
}

/// Kills and reaps the children it holds when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One node's exit and output.
struct Outcome {
    success: bool,
    output: String,
}

/// Runs `scenario` on `nodes` nodes spread over `hosts` simulated hosts
/// (consecutive ranks per host), with `extra(rank)` added to each node's
/// environment, and returns each node's outcome by rank.
fn run_group(scenario: &str, hosts: usize, nodes: usize, mesh: &str, extra: impl Fn(usize) -> Vec<(&'static str, String)>) -> Vec<Outcome> {
    let set = SimulatedHosts::create(hosts).expect("create the simulated hosts");
    let exe = std::env::current_exe().expect("the test binary's path");
    let logs = std::env::temp_dir();
    // Tests of this binary run in parallel, several with the same scenario,
    // so each run gets its own log files.
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let log = |rank: usize| -> PathBuf {
        logs.join(format!("meshmem-hosts-{}-{run}-{scenario}-{rank}.log", std::process::id()))
    };
    let per_host = nodes.div_ceil(hosts);
    let mut children = Children(Vec::new());
    for rank in 0..nodes {
        let host = rank / per_host;
        let file = std::fs::File::create(log(rank)).expect("create a node's log");
        let mut command = set.command(host, &exe);
        command
            .args(["--exact", "node_process", "--nocapture", "--test-threads=1"])
            .env(SCENARIO, scenario)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", nodes.to_string())
            .env("MESHMEM_MESH", mesh)
            .env("MESHMEM_GROUP", format!("hosts-{scenario}-{}-{run}", std::process::id()))
            .env("MESHMEM_PAGE_SIZE", "64K")
            .env("MESHMEM_NODE_CAPACITY", "4M")
            .env("MESHMEM_WINDOW_SIZE", "1G")
            .env("MESHMEM_JOIN_TIMEOUT_MS", "10000")
            .env("MESHMEM_SECRET", SECRET)
            .env("MASTER_ADDR", set.address(0).to_string())
            .env("MASTER_PORT", MASTER_PORT.to_string())
            .env("MESHMEM_HOST_ADDR", set.address(host).to_string())
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("duplicate the log"))
            .stderr(file);
        for (key, value) in extra(rank) {
            // An empty value removes the variable.
            match value.is_empty() {
                true => command.env_remove(key),
                false => command.env(key, value),
            };
        }
        children.0.push(command.spawn().expect("start a node process"));
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut statuses = vec![None; nodes];
    while statuses.iter().any(Option::is_none) && Instant::now() < deadline {
        for (child, status) in children.0.iter_mut().zip(statuses.iter_mut()) {
            if status.is_none() {
                *status = child.try_wait().expect("wait for a node");
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(children);
    drop(set);
    (0..nodes)
        .map(|rank| {
            let output = std::fs::read_to_string(log(rank)).unwrap_or_default();
            let _ = std::fs::remove_file(log(rank));
            Outcome { success: statuses[rank].is_some_and(|s| s.success()), output }
        })
        .collect()
}

fn report(outcomes: &[Outcome]) -> String {
    outcomes.iter().enumerate().map(|(rank, o)| format!("--- node {rank}:\n{}\n", o.output)).collect()
}

/// The body of every node process, selected by `MESHMEM_TEST_SCENARIO`.
#[test]
fn node_process() {
    match std::env::var(SCENARIO).as_deref() {
        Ok("full") => full_node(Pool::join_from_env().expect("join the group across hosts")),
        Ok("callback") => {
            let config = Config::from_env().expect("read the configuration");
            let dir = PathBuf::from(std::env::var(GATHER_DIR).expect("the all-gather directory"));
            let pool = Pool::join_with_allgather(config, |mine| gather_through_files(&dir, mine))
                .unwrap_or_else(|e| panic!("join through the callback failed: {e}"));
            full_node(pool);
        }
        Ok("join") => {
            // Print the error as a caller sees it, not its Debug form.
            let pool = Pool::join_from_env().unwrap_or_else(|e| panic!("join failed: {e}"));
            pool.barrier().unwrap_or_else(|e| panic!("barrier failed: {e}"));
        }
        _ => {}
    }
}

/// Gathers every node's bytes through files in `dir`, which every simulated
/// host can read. Each node writes a file named by its rank, then waits for
/// all of them.
fn gather_through_files(dir: &std::path::Path, mine: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let rank: usize = std::env::var("RANK").map_err(|e| e.to_string())?.parse().map_err(|e| format!("RANK: {e}"))?;
    let size: usize = std::env::var("WORLD_SIZE").map_err(|e| e.to_string())?.parse().map_err(|e| format!("WORLD_SIZE: {e}"))?;
    let partial = dir.join(format!("{rank}.partial"));
    std::fs::write(&partial, mine).map_err(|e| format!("writing {}: {e}", partial.display()))?;
    std::fs::rename(&partial, dir.join(rank.to_string())).map_err(|e| format!("renaming {}: {e}", partial.display()))?;

    let deadline = Instant::now() + Duration::from_secs(20);
    let mut gathered = Vec::with_capacity(size);
    for node in 0..size {
        let path = dir.join(node.to_string());
        while !path.exists() {
            if Instant::now() > deadline {
                return Err(format!("node {node}'s bytes did not appear in {} within 20 s", dir.display()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        gathered.push(std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?);
    }
    Ok(gathered)
}

/// Allocates on every node, reads and writes across hosts, runs remote
/// atomics and a barrier, migrates a page across hosts, and frees.
fn full_node(pool: Pool) {
    pool.install_fault_handler().expect("install the fault handler with nodes on another host");
    let me = pool.node();
    let n = pool.size();
    let host_of = |node: NodeId| node.index() / 2;

    // One slot per node in an allocation homed on each node.
    let mine = pool.alloc_slice::<u64>(n, Placement::Node(me)).expect("allocate on this node");
    let gathered = pool.all_gather(&mine.addr().0.to_le_bytes()).expect("gather the allocations");
    let addrs: Vec<GlobalAddr> =
        gathered.iter().map(|b| GlobalAddr(u64::from_le_bytes(b[..8].try_into().expect("8 bytes")))).collect();
    for (node, &addr) in addrs.iter().enumerate() {
        assert_eq!(pool.home_of(addr).expect("home"), NodeId(node as u16));
    }

    // Same host through raw pointers, other hosts through `write`.
    let value = 1000 + me.0 as u64;
    for (node, &addr) in addrs.iter().enumerate() {
        let slot = addr.add(8 * me.index() as u64);
        if host_of(NodeId(node as u16)) == host_of(me) {
            let ptr = pool.local_ptr(slot, 8).expect("map a same-host page");
            // SAFETY: the slot is mapped, aligned, and written by this node only.
            unsafe { ptr.as_ptr().cast::<u64>().write_volatile(value) };
        } else {
            let err = pool.local_ptr(slot, 8).expect_err("a page on another host cannot be mapped");
            let text = err.to_string();
            assert!(text.contains(&format!("node {node}")), "{text}");
            assert!(text.contains("Pool::read"), "{text}");
            pool.write_slice(slot, &[value]).expect("write across hosts");
        }
    }
    pool.barrier().expect("barrier after the writes");
    for &addr in &addrs {
        let mut back = vec![0u64; n];
        pool.read_slice(addr, &mut back).expect("read every node's slots");
        let expected: Vec<u64> = (0..n as u64).map(|r| 1000 + r).collect();
        assert_eq!(back, expected);
    }

    // Remote atomics on node 0's first slot: everyone adds, then node 3
    // swaps the total.
    pool.barrier().expect("barrier before the atomics");
    pool.fetch_add_u64(addrs[0], 1).expect("fetch_add across hosts");
    pool.barrier().expect("barrier after fetch_add");
    let total = 1000 + n as u64;
    if me.0 == 3 {
        assert_eq!(pool.compare_exchange_u64(addrs[0], total, 7).expect("compare_exchange"), Ok(total));
    }
    pool.barrier().expect("barrier after compare_exchange");
    let mut first = [0u64];
    pool.read_slice(addrs[0], &mut first).expect("read the word");
    assert_eq!(first[0], 7);

    // Node 1 moves a page of its own to node 2, on the other host.
    let page = pool.page_size();
    let moving = if me.0 == 1 {
        let moving = pool.alloc_slice::<u8>(page, Placement::Node(me)).expect("allocate a page");
        pool.write(moving.addr(), &vec![0x5a; page]).expect("fill the page");
        pool.migrate(moving.addr(), page, NodeId(2)).expect("migrate across hosts");
        moving.addr().0
    } else {
        0
    };
    let moving = pool.broadcast(NodeId(1), &moving.to_le_bytes()).expect("broadcast the page");
    let moving = GlobalAddr(u64::from_le_bytes(moving[..8].try_into().expect("8 bytes")));
    assert_eq!(pool.home_of(moving).expect("home after migration"), NodeId(2));
    let mut back = vec![0u8; page];
    pool.read(moving, &mut back).expect("read the migrated page");
    assert!(back.iter().all(|&b| b == 0x5a), "the migrated page lost its bytes");

    // Statistics name the transport of each pair.
    let stats = pool.stats().expect("stats");
    assert_eq!(stats.transport[0][1], TransportKind::Shm);
    assert_eq!(stats.transport[0][2], TransportKind::Tcp);
    assert_eq!(stats.transport[3][2], TransportKind::Shm);
    let split = stats.bytes_by_transport();
    assert!(split.iter().any(|&(k, bytes)| k == TransportKind::Tcp && bytes > 0), "{split:?}");
    assert!(split.iter().any(|&(k, bytes)| k == TransportKind::Shm && bytes > 0), "{split:?}");
    pool.barrier().expect("barrier before the frees");

    if me.0 == 1 {
        pool.free(moving).expect("free the migrated page");
    }
    pool.free(mine.addr()).expect("free this node's allocation");
    pool.barrier().expect("barrier after the frees");
    println!("node {me} done");
}

#[test]
fn group_spans_two_hosts() {
    if let Some(reason) = unavailable() {
        eprintln!("group_spans_two_hosts NOT RUN: {reason}");
        return;
    }
    let outcomes = run_group("full", 2, 4, "2x2x1", |_| Vec::new());
    assert!(outcomes.iter().all(|o| o.success), "{}", report(&outcomes));
    for (rank, outcome) in outcomes.iter().enumerate() {
        assert!(outcome.output.contains(&format!("node {rank} done")), "{}", report(&outcomes));
    }
}

#[test]
fn callback_joins_across_hosts() {
    if let Some(reason) = unavailable() {
        eprintln!("callback_joins_across_hosts NOT RUN: {reason}");
        return;
    }
    let dir = std::env::temp_dir().join(format!("meshmem-hosts-gather-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the all-gather directory");
    let outcomes = run_group("callback", 2, 4, "2x2x1", |_| {
        vec![("MASTER_ADDR", String::new()), ("MASTER_PORT", String::new()), (GATHER_DIR, dir.display().to_string())]
    });
    let _ = std::fs::remove_dir_all(&dir);
    assert!(outcomes.iter().all(|o| o.success), "{}", report(&outcomes));
    for (rank, outcome) in outcomes.iter().enumerate() {
        assert!(outcome.output.contains(&format!("node {rank} done")), "{}", report(&outcomes));
    }
    assert!(!report(&outcomes).contains(SECRET), "a node printed the secret");
}

#[test]
fn wrong_secret_is_rejected() {
    if let Some(reason) = unavailable() {
        eprintln!("wrong_secret_is_rejected NOT RUN: {reason}");
        return;
    }
    let outcomes = run_group("join", 2, 2, "2x1x1", |rank| match rank {
        1 => vec![("MESHMEM_SECRET", "not the group's secret at all".to_string()), ("MESHMEM_JOIN_TIMEOUT_MS", "3000".into())],
        _ => vec![("MESHMEM_JOIN_TIMEOUT_MS", "3000".into())],
    });
    assert!(outcomes.iter().all(|o| !o.success), "{}", report(&outcomes));
    assert!(outcomes[1].output.contains("did not prove the group secret"), "{}", report(&outcomes));
    assert!(outcomes[0].output.contains("did not join"), "{}", report(&outcomes));
    assert!(!report(&outcomes).contains(SECRET), "a node printed the secret");
}

#[test]
fn hosts_disagreeing_on_geometry_fail() {
    if let Some(reason) = unavailable() {
        eprintln!("hosts_disagreeing_on_geometry_fail NOT RUN: {reason}");
        return;
    }
    let cases = [("MESHMEM_MESH", "1x2x1", "mesh"), ("MESHMEM_PAGE_SIZE", "128K", "page size")];
    for (name, value, field) in cases {
        let outcomes = run_group("join", 2, 2, "2x1x1", |rank| match rank {
            1 => vec![(name, value.to_string())],
            _ => Vec::new(),
        });
        assert!(outcomes.iter().all(|o| !o.success), "{}", report(&outcomes));
        for outcome in &outcomes {
            assert!(outcome.output.contains(&format!("disagrees on {field}")), "{}", report(&outcomes));
        }
    }
}

#[test]
fn master_port_in_use_is_reported() {
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
    let master = taken.local_addr().expect("its address");
    let config = Config {
        rank: Some(0),
        size: Some(2),
        page_size: 64 << 10,
        node_capacity: 1 << 20,
        window_size: 1 << 30,
        group: Some(format!("hosts-port-{}", std::process::id())),
        hosts: Some(HostsConfig {
            master: Some(SocketAddr::new(master.ip(), master.port())),
            host_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            secret: Secret::new(SECRET.as_bytes().to_vec()).expect("a valid secret"),
        }),
        ..Config::default()
    };
    let err = Pool::join(config).expect_err("the port is taken").to_string();
    assert!(err.contains(&master.to_string()), "{err}");
    assert!(err.contains("pick a free MASTER_PORT"), "{err}");
}

/// Joins a one-node group that spans hosts, on loopback, through `allgather`.
fn join_alone(allgather: impl FnMut(&[u8]) -> Result<Vec<Vec<u8>>, String>) -> meshmem::Result<Pool> {
    let config = Config {
        rank: Some(0),
        size: Some(1),
        page_size: 64 << 10,
        node_capacity: 1 << 20,
        window_size: 1 << 30,
        group: Some(format!("hosts-alone-{}", std::process::id())),
        hosts: Some(HostsConfig {
            master: None,
            host_addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            secret: Secret::new(SECRET.as_bytes().to_vec()).expect("a valid secret"),
        }),
        ..Config::default()
    };
    Pool::join_with_allgather(config, allgather)
}

#[test]
fn callback_errors_fail_the_join() {
    let err = join_alone(|_| Err("the MPI communicator is gone".into())).expect_err("the callback failed").to_string();
    assert!(err.contains("the all-gather callback failed: the MPI communicator is gone"), "{err}");

    let err = join_alone(|mine| Ok(vec![mine.to_vec(), mine.to_vec()])).expect_err("two descriptors for one node");
    assert!(err.to_string().contains("returned 2 descriptors for a group of 1"), "{err}");

    let err = join_alone(|mine| Ok(vec![mine[..mine.len() / 2].to_vec()])).expect_err("a cut descriptor");
    assert!(err.to_string().contains("node 0's descriptor is malformed"), "{err}");

    let pool = join_alone(|mine| Ok(vec![mine.to_vec()])).expect("join a group of one through the callback");
    pool.barrier().expect("a barrier over the star");
}

#[test]
fn launcher_runs_nodes_on_simulated_hosts() {
    if let Some(reason) = unavailable() {
        eprintln!("launcher_runs_nodes_on_simulated_hosts NOT RUN: {reason}");
        return;
    }
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_meshmem"));
    command.args(["run", "--hosts", "2", "--mesh", "2x2x1"]);
    for setting in [
        "MESHMEM_TEST_SCENARIO=full",
        "MESHMEM_PAGE_SIZE=64K",
        "MESHMEM_NODE_CAPACITY=4M",
        "MESHMEM_WINDOW_SIZE=1G",
        "MESHMEM_JOIN_TIMEOUT_MS=10000",
    ] {
        command.args(["--env", setting]);
    }
    command.arg("--").arg(exe).args(["--exact", "node_process", "--nocapture", "--test-threads=1"]);
    // The launcher stops and reaps its nodes and deletes its namespaces on
    // every exit path; waiting for it reaps it.
    let launcher = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    let launcher = launcher.expect("start the launcher");
    let pid = launcher.id();
    let output = launcher.wait_with_output().expect("wait for the launcher");
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{text}");
    for rank in 0..4 {
        assert!(text.contains(&format!("node {rank} done")), "{text}");
    }
    assert!(text.contains("tcp between the 2 simulated hosts"), "{text}");

    let list = std::process::Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(!list.contains(&format!("mm{pid}-")), "the launcher left namespaces behind: {list}");
}

#[test]
fn launcher_rejects_uneven_hosts() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_meshmem"))
        .args(["run", "--hosts", "3", "--mesh", "2x2x1", "--", "true"])
        .output()
        .expect("run the launcher");
    let text = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{text}");
    assert!(text.contains("do not split evenly over 3 hosts"), "{text}");
}
