//! A pool of one node in this process: allocation, access, frees and the
//! errors of bad input.

use std::alloc::Layout;

use meshmem::{Advice, Config, Error, GlobalAddr, NodeId, Placement, Pool};

const PAGE: usize = 64 << 10;

fn pool() -> Pool {
    Pool::join(Config {
        page_size: PAGE,
        node_capacity: 64 * PAGE as u64,
        window_size: 1 << 30,
        ..Config::default()
    })
    .unwrap()
}

#[test]
fn large_alloc_write_read_free() {
    let pool = pool();
    let alloc = pool.alloc(Layout::from_size_align(3 * PAGE + 5, 8).unwrap(), Placement::Local, Advice::None).unwrap();
    assert_eq!(alloc.addr.0 % PAGE as u64, 0);
    let data: Vec<u8> = (0..alloc.size).map(|i| (i * 7) as u8).collect();
    pool.write(alloc.addr, &data).unwrap();
    let mut back = vec![0u8; alloc.size];
    pool.read(alloc.addr, &mut back).unwrap();
    assert_eq!(back, data);

    // The same bytes through the window.
    let ptr = pool.local_ptr(alloc.addr, alloc.size).unwrap();
    assert_eq!(ptr.as_ptr() as u64, alloc.addr.0);
    // SAFETY: the range is mapped and nothing else writes it.
    let view = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), alloc.size) };
    assert_eq!(view, &data[..]);

    assert_eq!(pool.stats().unwrap().nodes[0].frames_used, 4);
    pool.free(alloc.addr).unwrap();
    assert_eq!(pool.stats().unwrap().nodes[0].frames_used, 0);
    pool.validate().unwrap();
}

#[test]
fn small_allocs_are_distinct_and_freeable() {
    let pool = pool();
    let mut addrs = Vec::new();
    for i in 0..1000u64 {
        let a = pool.alloc(Layout::from_size_align(24, 8).unwrap(), Placement::Local, Advice::None).unwrap();
        pool.write(a.addr, &i.to_le_bytes()).unwrap();
        addrs.push(a.addr);
    }
    let mut sorted = addrs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), addrs.len());
    for (i, addr) in addrs.iter().enumerate() {
        let mut word = [0u8; 8];
        pool.read(*addr, &mut word).unwrap();
        assert_eq!(u64::from_le_bytes(word), i as u64);
        assert_eq!(addr.0 % 32, 0);
    }
    for addr in &addrs {
        pool.free(*addr).unwrap();
    }
    let err = pool.free(addrs[3]).unwrap_err();
    assert!(matches!(err, Error::DoubleFree { .. }), "{err}");
}

#[test]
fn double_free_is_rejected_and_changes_nothing() {
    let pool = pool();
    let a = pool.alloc(Layout::from_size_align(PAGE, 8).unwrap(), Placement::Local, Advice::None).unwrap();
    let b = pool.alloc(Layout::from_size_align(PAGE, 8).unwrap(), Placement::Local, Advice::None).unwrap();
    pool.free(a.addr).unwrap();
    let before = pool.stats().unwrap();
    let err = pool.free(a.addr).unwrap_err();
    assert!(matches!(err, Error::DoubleFree { .. }), "{err}");
    assert!(err.to_string().contains(&format!("{:#x}", a.addr.0)), "{err}");
    assert_eq!(pool.stats().unwrap().nodes, before.nodes);
    pool.free(b.addr).unwrap();
}

#[test]
fn foreign_and_interior_frees_are_rejected() {
    let pool = pool();
    let a = pool.alloc(Layout::from_size_align(2 * PAGE, 8).unwrap(), Placement::Local, Advice::None).unwrap();
    let err = pool.free(a.addr.add(PAGE as u64)).unwrap_err();
    assert!(matches!(err, Error::InvalidFree { .. }), "{err}");
    assert!(err.to_string().contains(&format!("starts at {:#x}", a.addr.0)), "{err}");
    let err = pool.free(a.addr.add(8)).unwrap_err();
    assert!(matches!(err, Error::InvalidFree { .. }), "{err}");
    let local = Box::new(5u64);
    let err = pool.free(GlobalAddr(&*local as *const u64 as u64)).unwrap_err();
    assert!(err.to_string().contains("outside this pool's window"), "{err}");
    let (base, len) = pool.window();
    let err = pool.free(base.add(len / 2)).unwrap_err();
    assert!(err.to_string().contains("no allocation covers it"), "{err}");
    let other = self::pool();
    let err = other.free(a.addr).unwrap_err();
    assert!(matches!(err, Error::InvalidFree { .. }), "{err}");
    pool.free(a.addr).unwrap();
}

#[test]
fn bad_layouts_are_rejected() {
    let pool = pool();
    let err = pool.alloc(Layout::from_size_align(0, 8).unwrap(), Placement::Local, Advice::None).unwrap_err();
    assert!(matches!(err, Error::InvalidLayout { size: 0, .. }), "{err}");
    let err = pool.alloc(Layout::from_size_align(8, 2 * PAGE).unwrap(), Placement::Local, Advice::None).unwrap_err();
    assert!(matches!(err, Error::InvalidLayout { .. }), "{err}");
    assert!(err.to_string().contains(&(2 * PAGE).to_string()), "{err}");
    assert_eq!(pool.stats().unwrap().nodes[0].frames_used, 0);
}

#[test]
fn out_of_memory_names_node_request_and_free() {
    let pool = pool();
    let keep = pool.alloc(Layout::from_size_align(60 * PAGE, 8).unwrap(), Placement::Local, Advice::None).unwrap();
    let err = pool.alloc(Layout::from_size_align(8 * PAGE, 8).unwrap(), Placement::Node(NodeId(0)), Advice::None).unwrap_err();
    match &err {
        Error::OutOfMemory { node, requested, free } => {
            assert_eq!(*node, NodeId(0));
            assert_eq!(*requested, 8 * PAGE as u64);
            assert_eq!(*free, 4 * PAGE as u64);
        }
        other => panic!("expected OutOfMemory, got {other}"),
    }
    assert_eq!(pool.stats().unwrap().nodes[0].frames_used, 60);
    pool.free(keep.addr).unwrap();
}

#[test]
fn placement_outside_mesh_is_rejected() {
    let pool = pool();
    let err = pool.alloc(Layout::from_size_align(8, 8).unwrap(), Placement::Node(NodeId(3)), Advice::None).unwrap_err();
    assert!(matches!(err, Error::NodeOutOfRange { node: 3, .. }), "{err}");
}

#[test]
fn allocator_api_backs_a_vec() {
    let pool = pool();
    let before = pool.stats().unwrap().nodes[0].frames_used;
    let mut v = allocator_api2::vec::Vec::new_in(pool.on(NodeId(0)));
    for i in 0..100_000u32 {
        v.push(i);
    }
    let peak = pool.stats().unwrap().nodes[0].frames_used;
    assert!(peak >= before + 400_000 / PAGE as u64, "{before} -> {peak}");
    assert_eq!(v.iter().map(|&x| x as u64).sum::<u64>(), 99_999 * 100_000 / 2);
    let addr = v.as_ptr() as u64;
    assert_eq!(pool.home_of(GlobalAddr(addr)).unwrap(), NodeId(0));
    drop(v);
    let after = pool.stats().unwrap().nodes[0].frames_used;
    assert!(after + 400_000 / PAGE as u64 <= peak, "peak {peak}, after {after}");
}

#[test]
fn threads_free_each_others_blocks() {
    let pool = pool();
    let layout = Layout::from_size_align(48, 8).unwrap();
    // Each thread allocates and fills blocks, then frees the blocks the
    // previous thread allocated: every free is a free by a non-owner.
    let handed: Vec<Vec<GlobalAddr>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4u8)
            .map(|t| {
                let pool = &pool;
                scope.spawn(move || {
                    (0..5000)
                        .map(|_| {
                            let a = pool.alloc(layout, Placement::Local, Advice::None).unwrap();
                            pool.write(a.addr, &[t; 48]).unwrap();
                            a.addr
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut all: Vec<GlobalAddr> = handed.iter().flatten().copied().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 20_000, "a block was handed out twice");
    for (t, addrs) in handed.iter().enumerate() {
        let mut back = [0u8; 48];
        pool.read(addrs[4999], &mut back).unwrap();
        assert_eq!(back, [t as u8; 48]);
    }

    // The allocating threads have exited, so their slabs are abandoned;
    // other threads free into them, and later allocations adopt them.
    std::thread::scope(|scope| {
        for addrs in &handed {
            let pool = &pool;
            scope.spawn(move || {
                for &a in addrs {
                    pool.free(a).unwrap();
                }
                assert!(matches!(pool.free(addrs[0]), Err(Error::DoubleFree { .. })));
            });
        }
    });
    let used_before = pool.stats().unwrap().nodes[0].frames_used;
    let again: Vec<GlobalAddr> = (0..20_000).map(|_| pool.alloc(layout, Placement::Local, Advice::None).unwrap().addr).collect();
    assert_eq!(pool.stats().unwrap().nodes[0].frames_used, used_before, "the freed slabs were not reused");
    for a in again {
        pool.free(a).unwrap();
    }
    pool.validate().unwrap();
}

#[test]
fn advice_is_set_queried_and_unset() {
    let pool = pool();
    let a = pool.alloc(Layout::from_size_align(4 * PAGE, 8).unwrap(), Placement::Local, Advice::None).unwrap();
    assert!(pool.advice(a.addr).unwrap().is_empty());

    pool.advise(a.addr, 2 * PAGE, Advice::ReadMostly).unwrap();
    pool.advise(a.addr.add(PAGE as u64), PAGE, Advice::PreferredLocation(NodeId(0))).unwrap();
    pool.advise(a.addr, 4 * PAGE, Advice::AccessedBy(NodeId(0))).unwrap();
    let second = pool.advice(a.addr.add(PAGE as u64 + 5)).unwrap();
    assert!(second.read_mostly);
    assert_eq!(second.preferred_location, Some(NodeId(0)));
    assert_eq!(second.accessed_by, vec![NodeId(0)]);
    assert!(!second.streaming);
    let last = pool.advice(a.addr.add(3 * PAGE as u64)).unwrap();
    assert!(!last.read_mostly);
    assert_eq!(last.accessed_by, vec![NodeId(0)]);

    pool.unadvise(a.addr, 2 * PAGE, Advice::ReadMostly).unwrap();
    pool.advise(a.addr, 4 * PAGE, Advice::Streaming).unwrap();
    assert!(pool.advice(a.addr).unwrap().streaming);
    pool.free(a.addr).unwrap();
}

#[test]
fn bad_advice_is_rejected_and_changes_nothing() {
    let pool = pool();
    let a = pool.alloc(Layout::from_size_align(2 * PAGE, 8).unwrap(), Placement::Local, Advice::None).unwrap();
    pool.advise(a.addr, PAGE, Advice::ReadMostly).unwrap();
    let before = pool.advice(a.addr).unwrap();

    // Not allocated.
    let (base, len) = pool.window();
    let err = pool.advise(base.add(len / 2), 8, Advice::ReadMostly).unwrap_err();
    assert!(err.to_string().contains("not allocated"), "{err}");
    // Crossing the end of the allocation.
    let err = pool.advise(a.addr.add(PAGE as u64), 2 * PAGE, Advice::ReadMostly).unwrap_err();
    assert!(err.to_string().contains("crosses the end"), "{err}");
    // A node outside the mesh.
    let err = pool.advise(a.addr, PAGE, Advice::PreferredLocation(NodeId(5))).unwrap_err();
    assert!(matches!(err, Error::NodeOutOfRange { node: 5, .. }), "{err}");
    // Unsetting advice that was never set, on a range where part has it.
    let err = pool.unadvise(a.addr, 2 * PAGE, Advice::ReadMostly).unwrap_err();
    assert!(err.to_string().contains("does not have ReadMostly set"), "{err}");
    let err = pool.unadvise(a.addr, PAGE, Advice::AccessedBy(NodeId(0))).unwrap_err();
    assert!(err.to_string().contains("nothing to unset"), "{err}");
    // Conflicting advice.
    let err = pool.advise(a.addr, 2 * PAGE, Advice::Streaming).unwrap_err();
    assert!(err.to_string().contains("excludes Streaming"), "{err}");
    // An empty range and no advice at all.
    assert!(pool.advise(a.addr, 0, Advice::ReadMostly).is_err());
    assert!(pool.advise(a.addr, 8, Advice::None).is_err());
    assert_eq!(pool.advice(a.addr).unwrap(), before);
    assert!(!pool.advice(a.addr.add(PAGE as u64)).unwrap().read_mostly);

    // Small blocks share pages, so they take no advice.
    let err = pool.alloc(Layout::from_size_align(64, 8).unwrap(), Placement::Local, Advice::Streaming).unwrap_err();
    assert!(matches!(err, Error::InvalidLayout { .. }), "{err}");
    let small = pool.alloc(Layout::from_size_align(64, 8).unwrap(), Placement::Local, Advice::None).unwrap();
    let err = pool.advise(small.addr, 64, Advice::ReadMostly).unwrap_err();
    assert!(err.to_string().contains("whole pages"), "{err}");

    // Advice given at allocation is recorded; a bad one allocates nothing.
    let used = pool.stats().unwrap().nodes[0].frames_used;
    let err = pool.alloc(Layout::from_size_align(PAGE, 8).unwrap(), Placement::Local, Advice::AccessedBy(NodeId(2))).unwrap_err();
    assert!(matches!(err, Error::NodeOutOfRange { .. }), "{err}");
    assert_eq!(pool.stats().unwrap().nodes[0].frames_used, used);
    let advised = pool.alloc(Layout::from_size_align(PAGE, 8).unwrap(), Placement::Local, Advice::PreferredLocation(NodeId(0))).unwrap();
    assert_eq!(pool.advice(advised.addr).unwrap().preferred_location, Some(NodeId(0)));
    pool.free(advised.addr).unwrap();
    pool.free(small.addr).unwrap();
    pool.free(a.addr).unwrap();
}
