//! Pool operations against their plain-memory counterparts, in one run:
//! reads and writes through the pool against `memcpy` of the same sizes,
//! and small allocations against the system allocator.
//!
//! `cargo bench --bench pool`; BENCHMARKS.md records the ratios.

use std::alloc::{GlobalAlloc as _, Layout, System};
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use meshmem::{Advice, Config, Placement, Pool};

fn pool() -> Pool {
    Pool::join(Config { node_capacity: 256 << 20, window_size: 1 << 36, ..Config::default() }).expect("join a one-node pool")
}

fn copies(c: &mut Criterion) {
    let pool = pool();
    for size in [4usize << 10, 1 << 20] {
        let mut group = c.benchmark_group(format!("copy_{}KiB", size >> 10));
        group.throughput(Throughput::Bytes(size as u64));
        let src = vec![7u8; size];
        let mut dst = vec![0u8; size];
        // Both sides start warm: the pool range is written once before timing.
        let alloc = pool.alloc(Layout::from_size_align(size, 64).unwrap(), Placement::Local, Advice::None).unwrap();
        pool.write(alloc.addr, &src).unwrap();
        let mut plain = vec![0u8; size];

        group.bench_function(BenchmarkId::new("memcpy", "write"), |b| {
            b.iter(|| plain.copy_from_slice(black_box(&src)))
        });
        group.bench_function(BenchmarkId::new("pool", "write"), |b| {
            b.iter(|| pool.write(alloc.addr, black_box(&src)).unwrap())
        });
        group.bench_function(BenchmarkId::new("memcpy", "read"), |b| {
            b.iter(|| dst.copy_from_slice(black_box(&plain)))
        });
        group.bench_function(BenchmarkId::new("pool", "read"), |b| {
            b.iter(|| pool.read(alloc.addr, black_box(&mut dst)).unwrap())
        });
        group.finish();
        pool.free(alloc.addr).unwrap();
    }
}

fn small_allocs(c: &mut Criterion) {
    let pool = pool();
    let mut group = c.benchmark_group("alloc_free_64B");
    let layout = Layout::from_size_align(64, 8).unwrap();
    group.bench_function("system", |b| {
        b.iter(|| {
            // SAFETY: a non-zero layout, freed with the same layout.
            unsafe {
                let p = System.alloc(black_box(layout));
                System.dealloc(black_box(p), layout);
            }
        })
    });
    group.bench_function("pool", |b| {
        b.iter(|| {
            let a = pool.alloc(black_box(layout), Placement::Local, Advice::None).unwrap();
            pool.free(black_box(a.addr)).unwrap();
        })
    });
    // Batches keep many blocks live at once, as a real workload does.
    group.bench_function("system_batch_1000", |b| {
        let mut ptrs = Vec::with_capacity(1000);
        b.iter(|| {
            for _ in 0..1000 {
                // SAFETY: as above.
                ptrs.push(unsafe { System.alloc(layout) });
            }
            for p in ptrs.drain(..) {
                // SAFETY: each pointer came from `System.alloc` with `layout`.
                unsafe { System.dealloc(p, layout) };
            }
        })
    });
    group.bench_function("pool_batch_1000", |b| {
        let mut addrs = Vec::with_capacity(1000);
        b.iter(|| {
            for _ in 0..1000 {
                addrs.push(pool.alloc(layout, Placement::Local, Advice::None).unwrap().addr);
            }
            for a in addrs.drain(..) {
                pool.free(a).unwrap();
            }
        })
    });
    group.finish();
}

criterion_group!(benches, copies, small_allocs);
criterion_main!(benches);
