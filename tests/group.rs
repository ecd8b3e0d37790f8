//! Groups of real node processes on the shared-memory backend.
//!
//! Each test starts copies of this test binary as node processes, filtered
//! to `node_process`, with the rank, size, mesh and group in the environment
//! as the launcher sets them, and a scenario name saying what to do. The
//! parent reaps every child, also when an assertion fails.

use std::alloc::Layout;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use meshmem::{Advice, Config, Coord, Error, GlobalAddr, GlobalSlice, NodeId, Placement, Pool};

const SCENARIO: &str = "MESHMEM_TEST_SCENARIO";

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

/// Runs `scenario` on a group of `mesh`, with `extra(rank)` added to each
/// node's environment, and returns each node's output.
fn run_group(scenario: &str, mesh: &str, extra: impl Fn(usize) -> Vec<(String, String)>) -> Vec<Output> {
    let nodes: usize = mesh.split('x').map(|d| d.parse::<usize>().unwrap()).product();
    let group = format!("test-{scenario}-{}-{}", std::process::id(), unique());
    let exe = std::env::current_exe().unwrap();
    let mut children = Children(Vec::new());
    for rank in 0..nodes {
        let mut command = Command::new(&exe);
        command
            .args(["--exact", "node_process", "--nocapture", "--test-threads=1"])
            .env(SCENARIO, scenario)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", nodes.to_string())
            .env("MESHMEM_MESH", mesh)
            .env("MESHMEM_GROUP", &group)
            .env("MESHMEM_JOIN_TIMEOUT_MS", "20000")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in extra(rank) {
            command.env(key, value);
        }
        children.0.push(Some(command.spawn().unwrap()));
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

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn assert_all_passed(outputs: &[Output]) {
    if outputs.iter().any(|o| !o.status.success()) {
        for (rank, output) in outputs.iter().enumerate() {
            eprintln!("---- node {rank} ({}):\n{}", output.status, text(output));
        }
    }
    for (rank, output) in outputs.iter().enumerate() {
        assert!(output.status.success(), "node {rank} failed:\n{}", text(output));
        assert!(text(output).contains("scenario done"), "node {rank} did not finish:\n{}", text(output));
    }
}

/// The body of every node process; a no-op in the ordinary test run.
#[test]
fn node_process() {
    let Ok(scenario) = std::env::var(SCENARIO) else { return };
    match scenario.as_str() {
        "exchange" => exchange(),
        "placements" => placements(),
        "join_fails" => join_fails(),
        "die" => die(),
        "pointers" => pointers(),
        "segv" => segv(),
        "quiet" => quiet(),
        "migrate" => migrate(),
        "replicas" => replicas(),
        "replica_store" => replica_store(),
        other => panic!("unknown scenario {other}"),
    }
    println!("scenario done");
}

fn exchange() {
    let pool = Pool::join(Config::from_env().unwrap()).unwrap();
    let me = pool.node();
    let n = pool.size() as u16;
    let next = NodeId((me.0 + 1) % n);

    // Every node fills a slice homed on its neighbour, and a small block.
    let slice: GlobalSlice<u64> = pool.alloc_slice(100_000, Placement::Node(next)).unwrap();
    assert_eq!(pool.home_of(slice.addr()).unwrap(), next);
    let values: Vec<u64> = (0..slice.len() as u64).map(|i| (me.0 as u64) << 32 | i).collect();
    pool.write_slice(slice.addr(), &values).unwrap();
    let small = pool.alloc(Layout::new::<[u64; 2]>(), Placement::Node(next), Advice::None).unwrap();
    pool.write_slice(small.addr, &[me.0 as u64 * 10, 7u64]).unwrap();

    // Node 0 owns a counter that everyone increments remotely.
    let counter = if me.0 == 0 { pool.alloc_slice::<u64>(1, Placement::Local).unwrap().addr() } else { GlobalAddr(0) };
    let counter = GlobalAddr(u64::from_le_bytes(pool.broadcast(NodeId(0), &counter.0.to_le_bytes()).unwrap().try_into().unwrap()));

    let mine = [slice.addr().0, small.addr.0].map(u64::to_le_bytes).concat();
    pool.quiet().unwrap();
    let all = pool.all_gather(&mine).unwrap();
    for _ in 0..100 {
        pool.fetch_add_u64(counter, 1).unwrap();
    }

    for (owner, bytes) in all.iter().enumerate() {
        let words: Vec<u64> = bytes.chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        let (big, little) = (GlobalAddr(words[0]), GlobalAddr(words[1]));

        // Through the API.
        let mut back = vec![0u64; 100_000];
        pool.read_slice(big, &mut back).unwrap();
        assert!(back.iter().enumerate().all(|(i, &v)| v == (owner as u64) << 32 | i as u64), "node {owner}'s slice");

        // Through raw pointers: the global address is the pointer.
        let ptr = pool.local_ptr(big, 100_000 * 8).unwrap();
        assert_eq!(ptr.as_ptr() as u64, big.0);
        // SAFETY: mapped above; its writer finished before the all-gather.
        let raw = unsafe { std::slice::from_raw_parts(big.0 as *const u64, 100_000) };
        assert_eq!(raw[99_999], (owner as u64) << 32 | 99_999);
        pool.local_ptr(little, 16).unwrap();
        // SAFETY: as above.
        let pair = unsafe { std::slice::from_raw_parts(little.0 as *const u64, 2) };
        assert_eq!(pair, [owner as u64 * 10, 7]);
    }

    // A store through a raw pointer is seen by the others after quiet and a barrier.
    let flags: GlobalSlice<u64> = if me.0 == 0 { pool.alloc_slice(n as usize, Placement::Node(NodeId(n - 1))).unwrap() } else { GlobalSlice::from_raw_parts(GlobalAddr(0), 0) };
    let flags_addr = GlobalAddr(u64::from_le_bytes(pool.broadcast(NodeId(0), &flags.addr().0.to_le_bytes()).unwrap().try_into().unwrap()));
    let flag = pool.local_ptr(flags_addr.add(me.0 as u64 * 8), 8).unwrap();
    // SAFETY: each node stores only to its own aligned word of the array.
    unsafe { (flag.as_ptr() as *mut u64).write_volatile(1000 + me.0 as u64) };
    pool.quiet().unwrap();
    pool.barrier().unwrap();
    let mut seen = vec![0u64; n as usize];
    pool.read_slice(flags_addr, &mut seen).unwrap();
    assert_eq!(seen, (0..n as u64).map(|i| 1000 + i).collect::<Vec<_>>());

    let mut total = [0u64];
    pool.barrier().unwrap();
    pool.read_slice(counter, &mut total).unwrap();
    assert_eq!(total[0], 100 * n as u64);

    // Each node frees what its previous neighbour allocated: remote frees.
    let prev = all[((me.0 + n - 1) % n) as usize].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect::<Vec<_>>();
    pool.barrier().unwrap();
    pool.free(GlobalAddr(prev[0])).unwrap();
    pool.free(GlobalAddr(prev[1])).unwrap();
    pool.barrier().unwrap();
    let err = pool.free(GlobalAddr(prev[0])).unwrap_err();
    assert!(matches!(err, Error::DoubleFree { .. }), "{err}");
    if me.0 == 0 {
        pool.free(counter).unwrap();
        pool.free(flags_addr).unwrap();
    }
    pool.barrier().unwrap();

    let stats = pool.stats().unwrap();
    let large_frames: u64 = stats.nodes.iter().map(|s| s.frames_used).sum();
    // Only slab pages stay: one per node for the pairs, one for the counter
    // and one for the flags.
    assert_eq!(large_frames, n as u64 + 2, "frames still used");
    assert!(stats.nodes[me.index()].bytes_remote > 0);
    assert!(stats.hop_bytes > 0);
    pool.validate().unwrap();
    pool.barrier().unwrap();
}

fn placements() {
    let pool = Pool::join(Config::from_env().unwrap()).unwrap();
    let me = pool.node();
    let page = pool.page_size();
    if me.0 == 0 {
        // Interleave stripes pages over the named nodes.
        let nodes = vec![NodeId(1), NodeId(2), NodeId(3)];
        let a = pool.alloc(Layout::from_size_align(6 * page, 8).unwrap(), Placement::Interleave { nodes, pages_per_stripe: 2 }, Advice::None).unwrap();
        let homes: Vec<NodeId> = (0..6).map(|i| pool.home_of(a.addr.add((i * page) as u64)).unwrap()).collect();
        let mut counts = [0; 4];
        for h in &homes {
            counts[h.index()] += 1;
        }
        assert_eq!(counts, [0, 2, 2, 2], "{homes:?}");
        pool.free(a.addr).unwrap();

        // Nearest spills to the next-nearest node when the nearest is full.
        let capacity = (pool.node_capacity() / page as u64) as usize;
        let fill = pool.alloc(Layout::from_size_align(capacity * page, 8).unwrap(), Placement::Node(NodeId(3)), Advice::None).unwrap();
        let near = pool.alloc(Layout::from_size_align(2 * page, 8).unwrap(), Placement::Nearest(Coord::new(1, 1, 0)), Advice::None).unwrap();
        let spill_home = pool.home_of(near.addr).unwrap();
        assert_eq!(pool.mesh().hops(NodeId(3), spill_home).unwrap(), 1, "spilled to {spill_home}");
        let err = pool.alloc(Layout::from_size_align(page, 8).unwrap(), Placement::Node(NodeId(3)), Advice::None).unwrap_err();
        assert!(matches!(err, Error::OutOfMemory { node: NodeId(3), free: 0, .. }), "{err}");
        pool.free(fill.addr).unwrap();
        pool.free(near.addr).unwrap();

        // Balanced goes to the node with the most free frames.
        let hog = pool.alloc(Layout::from_size_align(4 * page, 8).unwrap(), Placement::Node(NodeId(0)), Advice::None).unwrap();
        let b = pool.alloc(Layout::from_size_align(page, 8).unwrap(), Placement::Balanced, Advice::None).unwrap();
        assert_eq!(pool.home_of(b.addr).unwrap(), NodeId(1));
        pool.free(hog.addr).unwrap();
        pool.free(b.addr).unwrap();
        pool.validate().unwrap();
    }
    pool.barrier().unwrap();
}

/// Joins, reports this process's segments, then node 2 kills itself while
/// the others wait for it in a barrier.
fn die() {
    let pool = Pool::join(Config::from_env().unwrap()).unwrap();
    println!("pid={}", std::process::id());
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if target.to_string_lossy().contains("memfd:meshmem-node") {
            let meta = std::fs::metadata(entry.path()).unwrap();
            println!("memfd-ino={}", std::os::unix::fs::MetadataExt::ino(&meta));
        }
    }
    let slice = pool.alloc_slice::<u64>(1024, Placement::Local).unwrap();
    pool.write_slice(slice.addr(), &[7u64; 1024]).unwrap();
    pool.barrier().unwrap();
    if pool.node() == NodeId(2) {
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL).unwrap();
    }
    // The barrier fails once node 2 is gone, or the launcher stops us first.
    let outcome = pool.barrier();
    println!("second barrier: {outcome:?}");
    std::thread::sleep(Duration::from_secs(30));
}

/// An element of a list with one element per node, each homed on its node
/// and linked by plain pointers. Node 0 walks the list with loads only, and
/// the fault handler maps each page on first touch.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Link {
    value: u64,
    next: u64,
}

fn pointers() {
    let pool = Pool::join(Config::from_env().unwrap()).unwrap();
    let me = pool.node();
    let n = pool.size();
    let link: GlobalSlice<Link> = pool.alloc_slice(1, Placement::Local).unwrap();
    let all = pool.all_gather(&link.addr().0.to_le_bytes()).unwrap();
    let addrs: Vec<u64> = all.iter().map(|b| u64::from_le_bytes(b[..8].try_into().unwrap())).collect();
    let next = if me.index() + 1 < n { addrs[me.index() + 1] } else { 0 };
    pool.write_slice(link.addr(), &[Link { value: 100 + me.0 as u64, next }]).unwrap();
    pool.barrier().unwrap();

    if me.0 == 0 {
        pool.install_fault_handler().unwrap();
        let mut sum = 0;
        let mut count = 0;
        let mut at = addrs[0] as *const Link;
        while !at.is_null() {
            // SAFETY: every link is allocated, written before the barrier and
            // not written again; the fault handler maps its page.
            let link = unsafe { at.read_volatile() };
            sum += link.value;
            count += 1;
            at = link.next as *const Link;
        }
        assert_eq!(count, n);
        assert_eq!(sum, (0..n as u64).map(|i| 100 + i).sum::<u64>());
        // A store through a raw pointer into another node's page.
        // SAFETY: the last link is allocated, and no other node writes it now.
        unsafe { (addrs[n - 1] as *mut Link).write_volatile(Link { value: 7, next: 0 }) };
    }
    pool.barrier().unwrap();
    let mut back = [Link { value: 0, next: 0 }];
    pool.read_slice(GlobalAddr(addrs[n - 1]), &mut back).unwrap();
    assert_eq!(back[0].value, 7);
    pool.barrier().unwrap();
}

/// Installs the handler, then touches an address outside any window: the
/// process must die of SIGSEGV as it would without the handler.
fn segv() {
    let pool = Pool::join(Config::from_env().unwrap()).unwrap();
    pool.install_fault_handler().unwrap();
    println!("scenario done");
    let bad = 64 as *const u64;
    // SAFETY: deliberately not safe: the fault must reach the default action.
    let value = unsafe { bad.read_volatile() };
    println!("read {value}");
}

/// Node 1 writes records and then raises a flag after `quiet`; node 2 polls
/// the flag with an atomic and must then see every record. Repeated, with
/// the records homed on a third node.
fn quiet() {
    let pool = Pool::join(Config::from_env().unwrap()).unwrap();
    let me = pool.node();
    const ROUNDS: u64 = 200;
    const WORDS: usize = 4096;
    let shared = if me.0 == 0 {
        let data: GlobalSlice<u64> = pool.alloc_slice(WORDS, Placement::Node(NodeId(3))).unwrap();
        let flag: GlobalSlice<u64> = pool.alloc_slice(1, Placement::Node(NodeId(0))).unwrap();
        [data.addr().0, flag.addr().0]
    } else {
        [0, 0]
    };
    let bytes = pool.broadcast(NodeId(0), &[shared[0].to_le_bytes(), shared[1].to_le_bytes()].concat()).unwrap();
    let data = GlobalAddr(u64::from_le_bytes(bytes[..8].try_into().unwrap()));
    let flag = GlobalAddr(u64::from_le_bytes(bytes[8..].try_into().unwrap()));

    for round in 1..=ROUNDS {
        match me.0 {
            1 => {
                let records: Vec<u64> = (0..WORDS as u64).map(|i| round << 32 | i).collect();
                pool.write_slice(data, &records).unwrap();
                pool.quiet().unwrap();
                pool.fetch_add_u64(flag, 1).unwrap();
            }
            2 => {
                while pool.fetch_add_u64(flag, 0).unwrap() < round {
                    std::hint::spin_loop();
                }
                let mut seen = vec![0u64; WORDS];
                pool.read_slice(data, &mut seen).unwrap();
                for (i, &value) in seen.iter().enumerate() {
                    assert_eq!(value, round << 32 | i as u64, "round {round}, word {i}");
                }
            }
            _ => {}
        }
        // Keep the writer from starting the next round before the reader
        // has checked this one.
        pool.barrier().unwrap();
    }
}

/// Writers on two nodes (one through the API, one through raw pointers with
/// the fault handler) fill checksummed records into a range while another
/// node migrates it back and forth and a fourth reads it. Every record must
/// be intact at the end and every migration must have moved the range.
fn migrate() {
    let pool = Pool::join(Config::from_env().unwrap()).unwrap();
    let me = pool.node();
    let page = pool.page_size();
    const PAGES: usize = 6;
    const RECORDS: usize = 4000;
    const ROUNDS: usize = 6;
    let range = if me.0 == 0 {
        let a = pool.alloc(Layout::from_size_align(PAGES * page, 64).unwrap(), Placement::Node(NodeId(1)), Advice::None).unwrap();
        pool.write(a.addr, &vec![0u8; PAGES * page]).unwrap();
        a.addr.0
    } else {
        0
    };
    let range = GlobalAddr(u64::from_le_bytes(pool.broadcast(NodeId(0), &range.to_le_bytes()).unwrap().try_into().unwrap()));
    let read_mostly = std::env::var("MESHMEM_TEST_READ_MOSTLY").is_ok();
    if read_mostly && me.0 == 0 {
        pool.advise(range, PAGES * page, Advice::ReadMostly).unwrap();
    }
    let record_size = 16u64; // (value, checksum)
    let record = |writer: u64, i: u64| -> [u64; 2] {
        let value = writer << 48 | i;
        [value, value.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xabcd]
    };
    pool.barrier().unwrap();

    match me.0 {
        0 => {
            for round in 0..ROUNDS {
                let target = NodeId([2, 3, 1][round % 3]);
                pool.migrate(range, PAGES * page, target).unwrap();
                for p in 0..PAGES {
                    assert_eq!(pool.home_of(range.add((p * page) as u64)).unwrap(), target);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        1 => {
            // Even records through the API.
            for i in (0..RECORDS as u64).step_by(2) {
                pool.write_slice(range.add(i * record_size), &record(1, i)).unwrap();
            }
        }
        2 if read_mostly => {
            // Read-mostly pages are read-only to raw pointers: odd records
            // go through the API too.
            for i in (1..RECORDS as u64).step_by(2) {
                pool.write_slice(range.add(i * record_size), &record(2, i)).unwrap();
            }
        }
        2 => {
            // Odd records through raw pointers; the fault handler maps pages
            // and waits out migrations.
            pool.install_fault_handler().unwrap();
            for i in (1..RECORDS as u64).step_by(2) {
                let at = range.add(i * record_size).0 as *mut [u64; 2];
                // SAFETY: inside the allocation, aligned, and only this node
                // writes odd records.
                unsafe { at.write_volatile(record(2, i)) };
                if i % 256 == 1 {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
        _ => {
            // Reads during migration (from replicas when read-mostly) see
            // each aligned word either unwritten or with its final value; a
            // record read while it is written may mix the two.
            let mut seen = vec![[0u64; 2]; RECORDS];
            for _ in 0..20 {
                pool.read_slice(range, bytemuck::cast_slice_mut::<[u64; 2], u64>(&mut seen)).unwrap();
                for (i, r) in seen.iter().enumerate() {
                    let writer = if i % 2 == 0 { 1 } else { 2 };
                    let expected = record(writer, i as u64);
                    for w in 0..2 {
                        assert!(r[w] == 0 || r[w] == expected[w], "record {i} word {w}: {:#x}", r[w]);
                    }
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    pool.quiet().unwrap();
    pool.barrier().unwrap();

    let mut all = vec![[0u64; 2]; RECORDS];
    pool.read_slice(range, bytemuck::cast_slice_mut::<[u64; 2], u64>(&mut all)).unwrap();
    for (i, got) in all.iter().enumerate() {
        let writer = if i % 2 == 0 { 1 } else { 2 };
        assert_eq!(*got, record(writer, i as u64), "record {i}");
    }
    pool.barrier().unwrap();
    if me.0 == 0 {
        // Replicas take frames; drop them before filling a node.
        if read_mostly {
            pool.unadvise(range, PAGES * page, Advice::ReadMostly).unwrap();
            assert!(pool.stats().unwrap().nodes.iter().all(|n| n.replica_bytes == 0));
        }
        // Bad input: a node outside the mesh, and a node with two free frames.
        let err = pool.migrate(range, page, NodeId(9)).unwrap_err();
        assert!(matches!(err, Error::NodeOutOfRange { node: 9, .. }), "{err}");
        let hog = pool
            .alloc(Layout::from_size_align(pool.node_capacity() as usize - 2 * page, 8).unwrap(), Placement::Node(NodeId(2)), Advice::None)
            .unwrap();
        let home = pool.home_of(range).unwrap();
        let err = pool.migrate(range, PAGES * page, NodeId(2)).unwrap_err();
        assert!(matches!(err, Error::OutOfMemory { node: NodeId(2), .. }), "{err}");
        assert!(err.to_string().contains(&format!("{} bytes", PAGES * page)), "{err}");
        assert_eq!(pool.home_of(range).unwrap(), home);
        pool.free(hog.addr).unwrap();
        // Preferred location moves the pages and pins them.
        pool.advise(range, PAGES * page, Advice::PreferredLocation(NodeId(3))).unwrap();
        assert_eq!(pool.home_of(range).unwrap(), NodeId(3));
        let err = pool.migrate(range, page, NodeId(1)).unwrap_err();
        assert!(err.to_string().contains("never migrates away"), "{err}");
        pool.free(range).unwrap();
        pool.validate().unwrap();
    }
    pool.barrier().unwrap();
}

/// Read-mostly replication: reads on other nodes create replicas and are
/// then served locally; a write invalidates them before it returns; a
/// prefetch replicates ahead; unsetting the advice drops the replicas.
fn replicas() {
    let pool = std::sync::Arc::new(Pool::join(Config::from_env().unwrap()).unwrap());
    let me = pool.node();
    let page = pool.page_size();
    const PAGES: usize = 4;
    let range = if me.0 == 0 {
        let a = pool.alloc(Layout::from_size_align(PAGES * page, 64).unwrap(), Placement::Node(NodeId(1)), Advice::None).unwrap();
        pool.write_slice(a.addr, &vec![1u64; PAGES * page / 8]).unwrap();
        pool.advise(a.addr, PAGES * page, Advice::ReadMostly).unwrap();
        a.addr.0
    } else {
        0
    };
    let range = GlobalAddr(u64::from_le_bytes(pool.broadcast(NodeId(0), &range.to_le_bytes()).unwrap().try_into().unwrap()));
    let words = PAGES * page / 8;
    let read_all = |expected: u64| {
        let mut seen = vec![0u64; words];
        pool.read_slice(range, &mut seen).unwrap();
        assert!(seen.iter().all(|&w| w == expected), "expected {expected}, saw {:?}", &seen[..4]);
    };
    let from_home = |pool: &Pool| pool.stats().unwrap().traffic[pool.node().index()][1];

    // 1. Node 2 reads twice: the first read copies the pages into a
    //    replica, the second moves no byte from the home.
    if me.0 == 2 {
        read_all(1);
        assert!(pool.replica_nodes(range).unwrap().contains(&NodeId(2)));
        assert_eq!(pool.stats().unwrap().nodes[2].replica_bytes, (PAGES * page) as u64);
        let before = from_home(&pool);
        read_all(1);
        assert_eq!(from_home(&pool), before, "a current replica still read the home");
    }
    pool.barrier().unwrap();

    // 2. Node 3 writes; node 2 must see the new value at once.
    if me.0 == 3 {
        pool.write_slice(range, &vec![2u64; words]).unwrap();
    }
    pool.barrier().unwrap();
    if me.0 == 2 {
        read_all(2);
    }
    pool.barrier().unwrap();

    // 3. A prefetch replicates to node 3 ahead of its reads.
    if me.0 == 0 {
        let mut prefetch = pool.prefetch(range, PAGES * page, NodeId(3)).unwrap();
        prefetch.wait().unwrap();
        let err = prefetch.wait().unwrap_err();
        assert!(err.to_string().contains("already waited"), "{err}");
        assert!(pool.replica_nodes(range).unwrap().contains(&NodeId(3)));
    }
    pool.barrier().unwrap();
    if me.0 == 3 {
        let before = from_home(&pool);
        read_all(2);
        assert_eq!(from_home(&pool), before, "the prefetched replica was not used");
    }
    pool.barrier().unwrap();

    // 4. Unsetting the advice drops every replica, and raw stores work again.
    if me.0 == 0 {
        pool.unadvise(range, PAGES * page, Advice::ReadMostly).unwrap();
        assert!(pool.replica_nodes(range).unwrap().is_empty());
        let stats = pool.stats().unwrap();
        assert!(stats.nodes.iter().all(|n| n.replica_bytes == 0), "{:?}", stats.nodes);
        let err = pool.unadvise(range, PAGES * page, Advice::ReadMostly).unwrap_err();
        assert!(err.to_string().contains("nothing to unset"), "{err}");
    }
    pool.barrier().unwrap();
    if me.0 == 2 {
        let ptr = pool.local_ptr(range, 8).unwrap();
        // SAFETY: mapped, writable again, and only this node writes now.
        unsafe { (ptr.as_ptr() as *mut u64).write_volatile(3) };
    }
    pool.barrier().unwrap();
    if me.0 == 0 {
        let mut first = [0u64];
        pool.read_slice(range, &mut first).unwrap();
        assert_eq!(first[0], 3);
        pool.free(range).unwrap();
        pool.validate().unwrap();
    }
    pool.barrier().unwrap();
}

/// A store through a raw pointer into a read-mostly page must fault.
fn replica_store() {
    let pool = Pool::join(Config::from_env().unwrap()).unwrap();
    let page = pool.page_size();
    let a = pool.alloc(Layout::from_size_align(page, 8).unwrap(), Placement::Local, Advice::ReadMostly).unwrap();
    let ptr = pool.local_ptr(a.addr, 8).unwrap();
    // SAFETY: mapped read-only; the load is allowed.
    let value = unsafe { (ptr.as_ptr() as *const u64).read_volatile() };
    println!("scenario done (read {value})");
    // SAFETY: deliberately not safe: the store must fault.
    unsafe { (ptr.as_ptr() as *mut u64).write_volatile(1) };
    println!("stored");
}

fn join_fails() {
    // Stand in for a library that mapped something where the window goes.
    if let Ok(at) = std::env::var("MESHMEM_TEST_OCCUPY") {
        let at = u64::from_str_radix(at.trim_start_matches("0x"), 16).unwrap();
        // SAFETY: MAP_FIXED_NOREPLACE maps only if the range is free.
        let got = unsafe {
            libc::mmap(at as *mut _, 4096, libc::PROT_READ, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE, -1, 0)
        };
        assert_eq!(got as u64, at, "could not occupy {at:#x}");
    }
    match Pool::join(Config::from_env().unwrap()) {
        Ok(_) => panic!("join succeeded"),
        Err(e) => {
            println!("join error: {e}");
            println!("scenario done");
            std::process::exit(0);
        }
    }
}

#[test]
fn four_nodes_share_memory() {
    assert_all_passed(&run_group("exchange", "2x2x1", |_| vec![]));
}

#[test]
fn eight_nodes_share_memory() {
    assert_all_passed(&run_group("exchange", "2x2x2", |_| vec![]));
}

#[test]
fn placements_across_nodes() {
    let small = |_| vec![("MESHMEM_PAGE_SIZE".into(), "64K".into()), ("MESHMEM_NODE_CAPACITY".into(), "1M".into())];
    assert_all_passed(&run_group("placements", "2x2x1", small));
}

#[test]
fn page_size_mismatch_fails_join() {
    let outputs = run_group("join_fails", "2x1x1", |rank| {
        vec![("MESHMEM_PAGE_SIZE".into(), if rank == 1 { "64K" } else { "2M" }.into())]
    });
    for (rank, output) in outputs.iter().enumerate() {
        let out = text(output);
        assert!(out.contains("join error"), "node {rank}: {out}");
        assert!(out.contains("page size"), "node {rank}: {out}");
        assert!(out.contains("65536"), "node {rank}: {out}");
        assert!(out.contains("2097152"), "node {rank}: {out}");
    }
}

#[test]
fn mesh_mismatch_fails_join() {
    let outputs = run_group("join_fails", "2x2x1", |rank| {
        if rank == 2 { vec![("MESHMEM_MESH".into(), "4x1x1".into())] } else { vec![] }
    });
    for (rank, output) in outputs.iter().enumerate() {
        let out = text(output);
        assert!(out.contains("join error"), "node {rank}: {out}");
        assert!(out.contains("disagrees on mesh"), "node {rank}: {out}");
        assert!(out.contains("4x1x1"), "node {rank}: {out}");
        assert!(out.contains("2x2x1"), "node {rank}: {out}");
    }
}

#[test]
fn occupied_window_base_fails_join() {
    // Node 0 reserves at a fixed base; node 1 already has a mapping there.
    let base = 0x5a00_0000_0000u64;
    let outputs = run_group("join_fails", "2x1x1", |rank| {
        let mut env = vec![
            ("MESHMEM_WINDOW_BASE".into(), format!("{base:#x}")),
            ("MESHMEM_WINDOW_SIZE".into(), "4G".into()),
        ];
        if rank == 1 {
            env.push(("MESHMEM_TEST_OCCUPY".into(), format!("{:#x}", base + (1 << 30))));
        }
        env
    });
    for (rank, output) in outputs.iter().enumerate() {
        let out = text(output);
        assert!(out.contains("join error"), "node {rank}: {out}");
        assert!(out.contains(&format!("{base:#x}")), "node {rank}: {out}");
    }
}

#[test]
fn killed_node_is_reported_and_nothing_is_left() {
    let group = format!("test-die-{}-{}", std::process::id(), unique());
    let shm_before: Vec<_> = std::fs::read_dir("/dev/shm").map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    let mut launcher = Children(vec![Some(
        Command::new(env!("CARGO_BIN_EXE_meshmem"))
            .args(["run", "--mesh", "2x2x1", "--grace-ms", "2000", "--"])
            .arg(std::env::current_exe().unwrap())
            .args(["--exact", "node_process", "--nocapture", "--test-threads=1"])
            .env(SCENARIO, "die")
            .env("MESHMEM_GROUP", &group)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )]);
    let child = launcher.0[0].take().unwrap();
    let started = Instant::now();
    let output = child.wait_with_output().unwrap();
    let out = text(&output);
    assert!(started.elapsed() < Duration::from_secs(20), "the launcher took {:?}:\n{out}", started.elapsed());
    assert!(!output.status.success(), "{out}");
    assert!(out.contains("node 2 (0,1,0)"), "{out}");
    assert!(out.contains("SIGKILL"), "{out}");

    let pids: Vec<i32> = out.lines().filter_map(|l| l.split("pid=").nth(1)).map(|p| p.trim().parse().unwrap()).collect();
    assert_eq!(pids.len(), 4, "{out}");
    let inodes: Vec<u64> = out.lines().filter_map(|l| l.split("memfd-ino=").nth(1)).map(|p| p.trim().parse().unwrap()).collect();
    assert!(inodes.len() >= 4, "{out}");

    for pid in &pids {
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), None).is_ok();
        assert!(!alive, "node process {pid} outlived the run");
    }
    // No process of the run, and no descriptor of its segments, is left.
    for proc_entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let path = proc_entry.path();
        if let Ok(environ) = std::fs::read(path.join("environ")) {
            let needle = format!("MESHMEM_GROUP={group}");
            assert!(!environ.split(|&b| b == 0).any(|v| v == needle.as_bytes()), "{path:?} is still running");
        }
        if let Ok(fds) = std::fs::read_dir(path.join("fd")) {
            for fd in fds.flatten() {
                let target = std::fs::read_link(fd.path()).unwrap_or_default();
                if target.to_string_lossy().contains("memfd:meshmem-node") {
                    if let Ok(meta) = std::fs::metadata(fd.path()) {
                        let ino = std::os::unix::fs::MetadataExt::ino(&meta);
                        assert!(!inodes.contains(&ino), "segment {ino} is still open in {path:?}");
                    }
                }
            }
        }
    }
    let shm_after: Vec<_> = std::fs::read_dir("/dev/shm").map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert_eq!(shm_before, shm_after, "files appeared in /dev/shm");
}

#[test]
fn raw_pointers_follow_links_across_nodes() {
    assert_all_passed(&run_group("pointers", "2x2x1", |_| vec![]));
}

#[test]
fn faults_outside_the_window_still_kill() {
    let outputs = run_group("segv", "1x1x1", |_| vec![]);
    let out = text(&outputs[0]);
    assert!(out.contains("scenario done"), "{out}");
    assert!(!out.contains("read "), "{out}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(outputs[0].status.signal(), Some(libc::SIGSEGV), "{out}");
}

#[test]
fn writes_are_visible_after_quiet_and_flag() {
    assert_all_passed(&run_group("quiet", "2x2x1", |_| vec![]));
}

#[test]
fn migration_loses_no_write() {
    let small = |_| vec![("MESHMEM_PAGE_SIZE".into(), "16K".into()), ("MESHMEM_NODE_CAPACITY".into(), "1M".into())];
    assert_all_passed(&run_group("migrate", "2x2x1", small));
}

#[test]
fn read_mostly_migration_loses_no_write() {
    let env = |_| {
        vec![
            ("MESHMEM_PAGE_SIZE".into(), "16K".into()),
            ("MESHMEM_NODE_CAPACITY".into(), "1M".into()),
            ("MESHMEM_TEST_READ_MOSTLY".into(), "1".into()),
        ]
    };
    assert_all_passed(&run_group("migrate", "2x2x1", env));
}

#[test]
fn replicas_serve_reads_and_invalidate() {
    let small = |_| vec![("MESHMEM_PAGE_SIZE".into(), "16K".into()), ("MESHMEM_NODE_CAPACITY".into(), "1M".into())];
    assert_all_passed(&run_group("replicas", "2x2x1", small));
}

#[test]
fn raw_store_to_read_mostly_page_faults() {
    let outputs = run_group("replica_store", "1x1x1", |_| vec![]);
    let out = text(&outputs[0]);
    assert!(out.contains("scenario done"), "{out}");
    assert!(!out.contains("stored"), "{out}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(outputs[0].status.signal(), Some(libc::SIGSEGV), "{out}");
}
