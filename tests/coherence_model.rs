//! Coherence operations against a model of where each page lives.
//!
//! The test starts copies of this test binary as the node processes of a
//! group, filtered to `node_process`, with the rank, size, mesh and group
//! in the environment as the launcher sets them. Node 0 runs a property
//! test: sequences of allocations, frees, migrations, advice, prefetches
//! and reads, each checked against a model that records every page's home,
//! every allocation's advice, and what each operation must refuse. The
//! other nodes wait in a barrier meanwhile; their service threads serve
//! the migrations' mapping requests. The parent reaps every child, also
//! when an assertion fails.

use std::alloc::Layout;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshmem::{Advice, Config, Error, GlobalAddr, NodeId, Placement, Pool};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};

const SCENARIO: &str = "MESHMEM_TEST_SCENARIO";
const NODES: u16 = 3;
/// Small pages and a small capacity keep a case fast and make a node run
/// out of frames within a few operations.
const PAGE_SIZE: &str = "16K";
const NODE_CAPACITY: &str = "256K";

/// Kills and reaps the children it holds when dropped.
struct Children(Vec<Option<Child>>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in self.0.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `scenario` on a group of `NODES` nodes in a line and returns each
/// node's output.
fn run_group(scenario: &str) -> Vec<Output> {
    let group = format!("test-{scenario}-{}", std::process::id());
    let exe = std::env::current_exe().unwrap();
    let mut children = Children(Vec::new());
    for rank in 0..NODES {
        let child = Command::new(&exe)
            .args(["--exact", "node_process", "--nocapture", "--test-threads=1"])
            .env(SCENARIO, scenario)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", NODES.to_string())
            .env("MESHMEM_MESH", format!("{NODES}x1x1"))
            .env("MESHMEM_GROUP", &group)
            .env("MESHMEM_PAGE_SIZE", PAGE_SIZE)
            .env("MESHMEM_NODE_CAPACITY", NODE_CAPACITY)
            .env("MESHMEM_JOIN_TIMEOUT_MS", "20000")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        children.0.push(Some(child));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut outputs = Vec::new();
    for slot in children.0.iter_mut() {
        let mut child = slot.take().unwrap();
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        outputs.push(child.wait_with_output().unwrap());
    }
    outputs
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[test]
fn coherence_operations_match_the_model() {
    let outputs = run_group("coherence");
    for (rank, output) in outputs.iter().enumerate() {
        assert!(output.status.success(), "node {rank} failed ({}):\n{}", output.status, text(output));
        assert!(text(output).contains("scenario done"), "node {rank} did not finish:\n{}", text(output));
    }
    assert!(text(&outputs[0]).contains("model passed"), "node 0 did not run the model:\n{}", text(&outputs[0]));
}

/// The body of every node process; a no-op in the ordinary test run.
#[test]
fn node_process() {
    let Ok(scenario) = std::env::var(SCENARIO) else { return };
    assert_eq!(scenario, "coherence", "unknown scenario");
    let pool = Arc::new(Pool::join(Config::from_env().unwrap()).unwrap());
    pool.barrier().unwrap();
    if pool.node() == NodeId(0) {
        run_model(&pool);
    }
    pool.barrier().unwrap();
    println!("scenario done");
}

/// One operation; `which` picks a live allocation (modulo their number).
#[derive(Clone, Debug)]
enum Op {
    Alloc { pages: usize, node: u16 },
    Free { which: usize },
    Migrate { which: usize, node: u16 },
    AdviseReadMostly { which: usize },
    UnadviseReadMostly { which: usize },
    AdvisePreferred { which: usize, node: u16 },
    Prefetch { which: usize, node: u16 },
    Read { which: usize },
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0..NODES;
    prop_oneof![
        3 => (1usize..=4, node.clone()).prop_map(|(pages, node)| Op::Alloc { pages, node }),
        1 => any::<usize>().prop_map(|which| Op::Free { which }),
        3 => (any::<usize>(), node.clone()).prop_map(|(which, node)| Op::Migrate { which, node }),
        1 => any::<usize>().prop_map(|which| Op::AdviseReadMostly { which }),
        1 => any::<usize>().prop_map(|which| Op::UnadviseReadMostly { which }),
        1 => (any::<usize>(), node.clone()).prop_map(|(which, node)| Op::AdvisePreferred { which, node }),
        2 => (any::<usize>(), node).prop_map(|(which, node)| Op::Prefetch { which, node }),
        2 => any::<usize>().prop_map(|which| Op::Read { which }),
    ]
}

/// The model's record of one allocation.
#[derive(Clone, Debug)]
struct Allocation {
    addr: GlobalAddr,
    /// The home of each page.
    homes: Vec<u16>,
    read_mostly: bool,
    /// The preferred location of each page.
    preferred: Vec<Option<u16>>,
    /// The value written at the start of each page when it was allocated.
    tag: u64,
}

impl Allocation {
    fn len(&self, page: usize) -> usize {
        self.homes.len() * page
    }

    fn page_addr(&self, page: usize, index: usize) -> GlobalAddr {
        self.addr.add((index * page) as u64)
    }
}

/// The live allocations of the running case.
struct Model {
    allocations: Vec<Allocation>,
    next_tag: u64,
}

impl Model {
    fn pick(&self, which: usize) -> Option<usize> {
        (!self.allocations.is_empty()).then(|| which % self.allocations.len())
    }

    fn pages_on(&self, node: u16) -> u64 {
        self.allocations.iter().flat_map(|a| &a.homes).filter(|&&h| h == node).count() as u64
    }
}

/// Frames not in use on `node`.
fn free_frames(pool: &Pool, node: u16) -> u64 {
    let stats = pool.stats().unwrap();
    let n = &stats.nodes[node as usize];
    n.frames_total - n.frames_used
}

/// Runs the property test on node 0.
fn run_model(pool: &Arc<Pool>) {
    let page = pool.page_size();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 24,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    // Allocations a failed case left behind; the next case frees them first,
    // so that a shrinking run starts from an empty pool.
    let leftovers = std::cell::RefCell::new(Vec::<Allocation>::new());
    let outcome = runner.run(&prop::collection::vec(op(), 1..=25), |ops| {
        for alloc in leftovers.borrow_mut().drain(..) {
            pool.free(alloc.addr).ok();
        }
        let mut model = Model { allocations: Vec::new(), next_tag: 1 };
        let result = run_case(pool, page, &mut model, &ops);
        if result.is_err() {
            leftovers.borrow_mut().append(&mut model.allocations);
            return result;
        }
        for alloc in model.allocations.drain(..) {
            pool.free(alloc.addr).map_err(|e| TestCaseError::fail(format!("freeing {} at the end: {e}", alloc.addr)))?;
        }
        check(pool, page, &model)
    });
    if let Err(e) = outcome {
        panic!("{e}");
    }
    let stats = pool.stats().unwrap();
    let moved: u64 = stats.nodes.iter().map(|n| n.bytes_remote).sum();
    println!("model passed: 24 cases, {moved} bytes moved between nodes");
}

fn run_case(pool: &Arc<Pool>, page: usize, model: &mut Model, ops: &[Op]) -> Result<(), TestCaseError> {
    check(pool, page, model)?;
    for (step, op) in ops.iter().enumerate() {
        apply(pool, page, model, op).map_err(|e| TestCaseError::fail(format!("step {step} {op:?}: {e}")))?;
        check(pool, page, model).map_err(|e| TestCaseError::fail(format!("after step {step} {op:?}: {e}")))?;
    }
    Ok(())
}

/// Fails with `what` unless `condition` holds.
fn ensure(condition: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if condition {
        Ok(())
    } else {
        Err(what())
    }
}

/// Carries out `op` on the pool and on the model, checking the outcome the
/// model predicts.
fn apply(pool: &Arc<Pool>, page: usize, model: &mut Model, op: &Op) -> Result<(), String> {
    match *op {
        Op::Alloc { pages, node } => {
            let free = free_frames(pool, node);
            let layout = Layout::from_size_align(pages * page, page).unwrap();
            match pool.alloc(layout, Placement::Node(NodeId(node)), Advice::None) {
                Ok(alloc) => {
                    ensure(pages as u64 <= free, || format!("allocated {pages} pages on node {node} with {free} free"))?;
                    let tag = model.next_tag;
                    model.next_tag += 1;
                    for i in 0..pages {
                        pool.write(alloc.addr.add((i * page) as u64), &(tag << 8 | i as u64).to_le_bytes())
                            .map_err(|e| format!("writing the tag: {e}"))?;
                    }
                    model.allocations.push(Allocation {
                        addr: alloc.addr,
                        homes: vec![node; pages],
                        read_mostly: false,
                        // A new allocation starts without advice, even at
                        // the address of a freed one that had some.
                        preferred: vec![None; pages],
                        tag,
                    });
                }
                Err(Error::OutOfMemory { node: n, .. }) => {
                    ensure(pages as u64 > free && n == NodeId(node), || {
                        format!("out of memory on node {n} for {pages} pages with {free} free on node {node}")
                    })?;
                }
                Err(e) => return Err(format!("alloc: {e}")),
            }
        }
        Op::Free { which } => {
            let Some(i) = model.pick(which) else { return Ok(()) };
            let alloc = model.allocations.remove(i);
            pool.free(alloc.addr).map_err(|e| format!("free: {e}"))?;
            // A second free fails and changes nothing.
            ensure(pool.free(alloc.addr).is_err(), || format!("freeing {} twice succeeded", alloc.addr))?;
        }
        Op::Migrate { which, node } => {
            let Some(i) = model.pick(which) else { return Ok(()) };
            let outcome = pool.migrate(model.allocations[i].addr, model.allocations[i].len(page), NodeId(node));
            expect_migration(pool, &mut model.allocations[i], node, outcome)?;
        }
        Op::AdviseReadMostly { which } => {
            let Some(i) = model.pick(which) else { return Ok(()) };
            let a = &mut model.allocations[i];
            pool.advise(a.addr, a.len(page), Advice::ReadMostly).map_err(|e| format!("advise: {e}"))?;
            a.read_mostly = true;
        }
        Op::UnadviseReadMostly { which } => {
            let Some(i) = model.pick(which) else { return Ok(()) };
            let a = &mut model.allocations[i];
            match pool.unadvise(a.addr, a.len(page), Advice::ReadMostly) {
                Ok(()) => ensure(a.read_mostly, || "unsetting ReadMostly that was never set succeeded".into())?,
                Err(Error::InvalidAddress { reason, .. }) => {
                    ensure(!a.read_mostly && reason.contains("nothing to unset"), || format!("unadvise failed: {reason}"))?
                }
                Err(e) => return Err(format!("unadvise: {e}")),
            }
            a.read_mostly = false;
        }
        Op::AdvisePreferred { which, node } => {
            let Some(i) = model.pick(which) else { return Ok(()) };
            let a = &mut model.allocations[i];
            // Setting the advice records it first, then migrates; the
            // advice stays when the migration fails.
            let outcome = pool.advise(a.addr, a.len(page), Advice::PreferredLocation(NodeId(node)));
            a.preferred.iter_mut().for_each(|p| *p = Some(node));
            expect_migration(pool, a, node, outcome)?;
        }
        Op::Prefetch { which, node } => {
            let Some(i) = model.pick(which) else { return Ok(()) };
            let a = &mut model.allocations[i];
            let mut handle = pool.prefetch(a.addr, a.len(page), NodeId(node)).map_err(|e| format!("prefetch: {e}"))?;
            let outcome = handle.wait();
            if a.read_mostly {
                // Replication stops quietly when the node runs out of frames.
                outcome.map_err(|e| format!("replicating: {e}"))?;
            } else {
                expect_migration(pool, a, node, outcome)?;
            }
            match handle.wait() {
                Err(Error::InvalidConfig { name: "prefetch", .. }) => {}
                other => return Err(format!("waiting twice for a prefetch returned {other:?}")),
            }
        }
        Op::Read { which } => {
            let Some(i) = model.pick(which) else { return Ok(()) };
            let a = &model.allocations[i];
            let mut bytes = vec![0u8; a.len(page)];
            pool.read(a.addr, &mut bytes).map_err(|e| format!("read: {e}"))?;
            for index in 0..a.homes.len() {
                let word = u64::from_le_bytes(bytes[index * page..index * page + 8].try_into().unwrap());
                ensure(word == a.tag << 8 | index as u64, || format!("page {index} of {} holds {word:#x}", a.addr))?;
            }
        }
    }
    Ok(())
}

/// Checks the outcome of moving `a` to `node` (a migration, a prefetch or
/// a preferred location) and updates the model. The move must fail with the
/// documented error, and change nothing, when a page prefers another node
/// or `node` lacks frames for the pages that move.
fn expect_migration(pool: &Pool, a: &mut Allocation, node: u16, outcome: meshmem::Result<()>) -> Result<(), String> {
    let moving = a.homes.iter().filter(|&&h| h != node).count() as u64;
    let blocked = a.preferred.iter().any(|p| p.is_some_and(|p| p != node));
    // The frames free before the operation: those free now, less any the
    // move took.
    let free_now = free_frames(pool, node);
    match outcome {
        Ok(()) => {
            ensure(!blocked, || format!("moved pages preferring node {:?} to node {node}", a.preferred))?;
            a.homes.iter_mut().for_each(|h| *h = node);
        }
        Err(Error::InvalidAddress { reason, .. }) if blocked => {
            ensure(reason.contains("PreferredLocation"), || format!("refusal does not name the advice: {reason}"))?;
        }
        Err(Error::OutOfMemory { node: n, requested, free }) => {
            ensure(!blocked && n == NodeId(node) && free < moving && free == free_now, || {
                format!("out of memory on node {n} ({requested} bytes, {free} frames free, {free_now} now) moving {moving} pages to node {node}")
            })?;
            ensure(requested == moving * pool.page_size() as u64, || format!("requested {requested} bytes for {moving} pages"))?;
        }
        Err(e) => return Err(format!("moving to node {node}: {e}")),
    }
    Ok(())
}

/// Checks the pool against the model: every page's home, every
/// allocation's advice, the frame maps, and the frames in use.
fn check(pool: &Pool, page: usize, model: &Model) -> Result<(), TestCaseError> {
    for a in &model.allocations {
        for (index, &home) in a.homes.iter().enumerate() {
            let at = a.page_addr(page, index);
            let found = pool.home_of(at).map_err(|e| TestCaseError::fail(format!("home_of({at}): {e}")))?;
            prop_assert_eq!(found, NodeId(home), "home of page {} of {}", index, a.addr);
            let advice = pool.advice(at).map_err(|e| TestCaseError::fail(format!("advice({at}): {e}")))?;
            prop_assert_eq!(advice.read_mostly, a.read_mostly, "read-mostly of {}", at);
            prop_assert_eq!(advice.preferred_location, a.preferred[index].map(NodeId), "preferred location of {}", at);
            prop_assert!(advice.accessed_by.is_empty() && !advice.streaming, "unexpected advice {:?} at {}", advice, at);
        }
    }
    pool.validate().map_err(|e| TestCaseError::fail(format!("validate: {e}")))?;
    let stats = pool.stats().map_err(|e| TestCaseError::fail(format!("stats: {e}")))?;
    for node in 0..NODES {
        let n = &stats.nodes[node as usize];
        let replicas = n.replica_bytes / page as u64;
        prop_assert_eq!(
            n.frames_used,
            model.pages_on(node) + replicas,
            "frames used on node {} (model pages {}, replicas {})",
            node,
            model.pages_on(node),
            replicas
        );
    }
    Ok(())
}
