//! Replicated reads and migration, measured between two node processes in
//! one run: reading a replicated page against reading the home page
//! directly, and migrating 1 GiB between the nodes against `memcpy` of
//! 1 GiB in one process.
//!
//! `cargo bench --bench coherence` starts itself as two node processes on
//! the shared-memory backend; node 0 measures and prints the ratios, which
//! BENCHMARKS.md records.

use std::alloc::Layout;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshmem::launch::{self, LaunchSpec};
use meshmem::{Advice, Config, GlobalAddr, Mesh3d, NodeId, Placement, Pool};

const PAGE: usize = 2 << 20;
const MIGRATE_BYTES: usize = 1 << 30;
const READ_BYTES: usize = 1 << 20;

fn main() {
    if launch::is_node_process() {
        node();
        return;
    }
    let mesh: Mesh3d = "2x1x1".parse().expect("a valid mesh");
    let mut spec = LaunchSpec::new(mesh, std::env::current_exe().expect("the benchmark's own path"));
    spec.args = std::env::args_os().skip(1).collect();
    spec.env.push(("MESHMEM_NODE_CAPACITY".into(), "3G".into()));
    spec.grace = Duration::from_secs(5);
    if let Err(e) = launch::launch(&spec) {
        eprintln!("coherence benchmark failed: {e}");
        std::process::exit(1);
    }
}

/// Best of `rounds` timings of `f`, which runs `iterations` times per round.
fn best(rounds: usize, iterations: usize, mut f: impl FnMut()) -> Duration {
    (0..rounds)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..iterations {
                f();
            }
            start.elapsed() / iterations as u32
        })
        .min()
        .expect("at least one round")
}

fn node() {
    let pool = Arc::new(Pool::join(Config::from_env().expect("launcher environment")).expect("join"));
    let me = pool.node();
    let shared = if me.0 == 0 {
        let a = pool
            .alloc(Layout::from_size_align(8 * PAGE, 64).unwrap(), Placement::Node(NodeId(1)), Advice::None)
            .expect("allocate on node 1");
        pool.write(a.addr, &vec![7u8; 8 * PAGE]).expect("fill");
        a.addr.0
    } else {
        0
    };
    let bytes = pool.broadcast(NodeId(0), &shared.to_le_bytes()).expect("broadcast");
    let range = GlobalAddr(u64::from_le_bytes(bytes.try_into().expect("8 bytes")));

    if me.0 == 0 {
        let mut buffer = vec![0u8; READ_BYTES];

        // Reads of 1 MiB from the home on node 1, then from a replica here.
        let home = best(5, 200, || pool.read(range, black_box(&mut buffer)).unwrap());
        pool.advise(range, 8 * PAGE, Advice::ReadMostly).unwrap();
        pool.read(range, &mut buffer).unwrap();
        assert!(pool.replica_nodes(range).unwrap().contains(&NodeId(0)), "no replica was made");
        let replica = best(5, 200, || pool.read(range, black_box(&mut buffer)).unwrap());
        pool.unadvise(range, 8 * PAGE, Advice::ReadMostly).unwrap();
        println!("read 1 MiB: home {home:?}, replica {replica:?}, replica / home time {:.2}", replica.as_secs_f64() / home.as_secs_f64());

        // Migrating 1 GiB from this node to node 1, against memcpy of 1 GiB.
        let big = pool
            .alloc(Layout::from_size_align(MIGRATE_BYTES, 64).unwrap(), Placement::Local, Advice::None)
            .expect("allocate 1 GiB");
        pool.write(big.addr, &vec![3u8; MIGRATE_BYTES]).unwrap();
        // Both sides copy into memory that is already populated, so that
        // page faults of fresh memory do not count: node 1's frames are
        // written once and freed, the memcpy destination is filled first.
        let warm = pool
            .alloc(Layout::from_size_align(MIGRATE_BYTES, 64).unwrap(), Placement::Node(NodeId(1)), Advice::None)
            .expect("allocate 1 GiB on node 1");
        pool.write(warm.addr, &vec![1u8; MIGRATE_BYTES]).unwrap();
        pool.free(warm.addr).unwrap();
        let source = vec![5u8; MIGRATE_BYTES];
        let mut destination = vec![0u8; MIGRATE_BYTES];
        destination.fill(1);
        let start = Instant::now();
        destination.copy_from_slice(black_box(&source));
        black_box(&mut destination);
        let memcpy = start.elapsed();
        drop((source, destination));
        let start = Instant::now();
        pool.migrate(big.addr, MIGRATE_BYTES, NodeId(1)).unwrap();
        let migrate = start.elapsed();
        assert_eq!(pool.home_of(big.addr).unwrap(), NodeId(1));
        let mut check = vec![0u8; 4096];
        pool.read(big.addr.add((MIGRATE_BYTES - 4096) as u64), &mut check).unwrap();
        assert!(check.iter().all(|&b| b == 3), "migrated data differs");
        println!(
            "move 1 GiB: memcpy {memcpy:?}, migrate {migrate:?}, migrate / memcpy time {:.2}",
            migrate.as_secs_f64() / memcpy.as_secs_f64()
        );
        pool.free(big.addr).unwrap();
        pool.free(range).unwrap();
    }
    pool.barrier().expect("final barrier");
}
