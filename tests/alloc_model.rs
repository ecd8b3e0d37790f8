//! Model-based test of the allocator: random sequences of allocations,
//! writes and frees against a plain list of live ranges and their contents.

use std::alloc::Layout;

use meshmem::{Advice, Config, Error, GlobalAddr, Placement, Pool};
use proptest::prelude::*;

const PAGE: usize = 4096;
const FRAMES: u64 = 256;

#[derive(Clone, Debug)]
enum Op {
    Alloc { size: usize, align_shift: u32 },
    Free { pick: usize },
    FreeAgain,
    FreeInterior { pick: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1usize..600, 0u32..7).prop_map(|(size, align_shift)| Op::Alloc { size, align_shift }),
        1 => (600usize..6 * PAGE, 0u32..13).prop_map(|(size, align_shift)| Op::Alloc { size, align_shift }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => Just(Op::FreeAgain),
        1 => any::<usize>().prop_map(|pick| Op::FreeInterior { pick }),
    ]
}

struct Live {
    addr: GlobalAddr,
    size: usize,
    seed: u8,
}

fn pattern(seed: u8, size: usize) -> Vec<u8> {
    (0..size).map(|i| seed.wrapping_add((i % 251) as u8)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn allocator_matches_model(ops in prop::collection::vec(op(), 1..120)) {
        let pool = Pool::join(Config {
            page_size: PAGE,
            node_capacity: FRAMES * PAGE as u64,
            window_size: 1 << 32,
            ..Config::default()
        }).unwrap();
        let mut live: Vec<Live> = Vec::new();
        let mut freed: Option<GlobalAddr> = None;
        let mut seed = 0u8;

        for op in ops {
            match op {
                Op::Alloc { size, align_shift } => {
                    let layout = Layout::from_size_align(size, 1 << align_shift).unwrap();
                    let before = pool.stats().unwrap().nodes[0].frames_used;
                    match pool.alloc(layout, Placement::Local, Advice::None) {
                        Ok(alloc) => {
                            prop_assert_eq!(alloc.addr.0 % layout.align() as u64, 0);
                            let end = alloc.addr.0 + size as u64;
                            for other in &live {
                                let other_end = other.addr.0 + other.size as u64;
                                prop_assert!(end <= other.addr.0 || other_end <= alloc.addr.0,
                                    "{:?}+{} overlaps {:?}+{}", alloc.addr, size, other.addr, other.size);
                            }
                            seed = seed.wrapping_add(37);
                            pool.write(alloc.addr, &pattern(seed, size)).unwrap();
                            live.push(Live { addr: alloc.addr, size, seed });
                        }
                        Err(Error::OutOfMemory { requested, free, .. }) => {
                            prop_assert!(requested > free || free < PAGE as u64);
                            prop_assert_eq!(pool.stats().unwrap().nodes[0].frames_used, before);
                        }
                        Err(e) => prop_assert!(false, "alloc failed: {}", e),
                    }
                }
                Op::Free { pick } if !live.is_empty() => {
                    let entry = live.swap_remove(pick % live.len());
                    let mut back = vec![0u8; entry.size];
                    pool.read(entry.addr, &mut back).unwrap();
                    prop_assert_eq!(back, pattern(entry.seed, entry.size), "contents of {:?}", entry.addr);
                    pool.free(entry.addr).unwrap();
                    freed = Some(entry.addr);
                }
                Op::FreeAgain => {
                    // Skip when the address was handed out again since.
                    if let Some(addr) = freed.take().filter(|a| live.iter().all(|l| l.addr != *a)) {
                        let before = pool.stats().unwrap().nodes[0].frames_used;
                        let err = pool.free(addr).unwrap_err();
                        prop_assert!(matches!(err, Error::DoubleFree { .. } | Error::InvalidFree { .. }), "{}", err);
                        prop_assert_eq!(pool.stats().unwrap().nodes[0].frames_used, before);
                    }
                }
                Op::FreeInterior { pick } if !live.is_empty() => {
                    let entry = &live[pick % live.len()];
                    if entry.size > 16 {
                        let err = pool.free(entry.addr.add(8)).unwrap_err();
                        prop_assert!(matches!(err, Error::InvalidFree { .. }), "{}", err);
                    }
                }
                _ => {}
            }
            pool.validate().unwrap();
        }

        for entry in live.drain(..) {
            let mut back = vec![0u8; entry.size];
            pool.read(entry.addr, &mut back).unwrap();
            prop_assert_eq!(back, pattern(entry.seed, entry.size));
            pool.free(entry.addr).unwrap();
        }
        pool.validate().unwrap();
    }
}
