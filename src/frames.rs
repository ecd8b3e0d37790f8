//! The per-node physical frame allocator.
//!
//! A node's free map is a bitmap in its own segment header, one bit per
//! frame, set while the frame is in use, plus a counter of free frames.
//! Both are updated only with 64-bit atomics, so any node can take or return
//! a frame of any other node one-sidedly.
//!
//! Taking frames is two steps. First the counter is lowered by the number
//! wanted, or the request fails with the node's free bytes and changes
//! nothing; this reservation guarantees the bits exist. Then bits are claimed
//! with `fetch_or`, several per word, scanning from the lowest frame so that
//! runs of frames tend to be contiguous (which lets their mappings merge).
//! Returning frames clears the bits first and raises the counter last.

use crate::error::{Error, Result};
use crate::layout::{hdr, SegmentLayout, Words};
use crate::topology::NodeId;

#[derive(Clone)]
pub struct Frames {
    words: Words,
    layout: SegmentLayout,
}

impl Frames {
    pub fn new(words: Words, layout: SegmentLayout) -> Self {
        Frames { words, layout }
    }

    pub fn frame_count(&self) -> u64 {
        self.layout.frame_count
    }

    pub fn free_frames(&self, node: NodeId) -> Result<u64> {
        self.words.load(node, hdr::FREE_FRAMES)
    }

    /// Lowers `node`'s free counter by `count`, or fails naming the free
    /// bytes without changing anything.
    pub fn reserve(&self, node: NodeId, count: u64) -> Result<()> {
        let reserved = self.words.fetch_update(node, hdr::FREE_FRAMES, |free| free.checked_sub(count))?;
        reserved.map(|_| ()).map_err(|free| Error::OutOfMemory {
            node,
            requested: count * self.layout.page_size,
            free: free * self.layout.page_size,
        })
    }

    /// Gives back a reservation that was not claimed.
    pub fn unreserve(&self, node: NodeId, count: u64) -> Result<()> {
        self.words.fetch_add(node, hdr::FREE_FRAMES, count).map(|_| ())
    }

    /// Claims `count` frames on `node` after `reserve` made room for them.
    pub fn claim(&self, node: NodeId, count: u64) -> Result<Vec<u32>> {
        let mut frames = Vec::with_capacity(count as usize);
        let words = self.layout.frame_count.div_ceil(64);
        let mut empty_scans = 0;
        while (frames.len() as u64) < count {
            let before = frames.len();
            for word in 0..words {
                let need = count - frames.len() as u64;
                if need == 0 {
                    break;
                }
                let offset = self.layout.bitmap + word * 8;
                let current = self.words.load(node, offset)?;
                if current == u64::MAX {
                    continue;
                }
                let wanted = lowest_zero_bits(current, need);
                let previous = self.words.fetch_or(node, offset, wanted)?;
                let mut got = wanted & !previous;
                while got != 0 {
                    let bit = got.trailing_zeros() as u64;
                    frames.push((word * 64 + bit) as u32);
                    got &= got - 1;
                }
            }
            // The reservation guarantees enough clear bits; several scans that
            // find none mean the map and the counter disagree.
            empty_scans = if frames.len() == before { empty_scans + 1 } else { 0 };
            if empty_scans > 64 {
                let missing = count - frames.len() as u64;
                self.release(node, &frames)?;
                self.unreserve(node, count - frames.len() as u64)?;
                return Err(Error::Corrupt {
                    node,
                    reason: format!(
                        "the free counter promised {count} frames but the free map had only {} clear bits ({missing} missing)",
                        count - missing
                    ),
                });
            }
        }
        frames.sort_unstable();
        Ok(frames)
    }

    /// Reserves and claims `count` frames on `node`.
    pub fn take(&self, node: NodeId, count: u64) -> Result<Vec<u32>> {
        self.reserve(node, count)?;
        self.claim(node, count)
    }

    /// Returns frames to `node`. A frame that is already free is reported as
    /// corruption after the others are returned.
    pub fn release(&self, node: NodeId, frames: &[u32]) -> Result<()> {
        let mut already_free = None;
        let mut returned = 0;
        for &frame in frames {
            if frame as u64 >= self.layout.frame_count {
                already_free.get_or_insert(frame);
                continue;
            }
            let offset = self.layout.bitmap + (frame as u64 / 64) * 8;
            let bit = 1u64 << (frame % 64);
            let previous = self.words.fetch_and(node, offset, !bit)?;
            if previous & bit == 0 {
                already_free.get_or_insert(frame);
            } else {
                returned += 1;
            }
        }
        self.words.fetch_add(node, hdr::FREE_FRAMES, returned)?;
        match already_free {
            None => Ok(()),
            Some(frame) => Err(Error::Corrupt {
                node,
                reason: format!("frame {frame} was returned while free or does not exist"),
            }),
        }
    }

    /// Checks that the counter matches the map: used + free = capacity.
    pub fn validate(&self, node: NodeId) -> Result<()> {
        let mut used = 0u64;
        for word in 0..self.layout.frame_count.div_ceil(64) {
            let mut bits = self.words.load(node, self.layout.bitmap + word * 8)?;
            let valid = self.layout.frame_count - word * 64;
            if valid < 64 {
                bits &= (1u64 << valid) - 1;
            }
            used += bits.count_ones() as u64;
        }
        let free = self.free_frames(node)?;
        if used + free != self.layout.frame_count {
            return Err(Error::Corrupt {
                node,
                reason: format!(
                    "{used} frames in use and {free} free do not add up to {} frames",
                    self.layout.frame_count
                ),
            });
        }
        Ok(())
    }
}

/// The lowest `count` clear bits of `word` (fewer if it has fewer).
fn lowest_zero_bits(word: u64, count: u64) -> u64 {
    let mut free = !word;
    let mut mask = 0;
    for _ in 0..count.min(64) {
        if free == 0 {
            break;
        }
        let low = free & free.wrapping_neg();
        mask |= low;
        free &= free - 1;
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_zero_bits_picks_in_order() {
        assert_eq!(lowest_zero_bits(0, 3), 0b111);
        assert_eq!(lowest_zero_bits(0b101, 2), 0b1010);
        assert_eq!(lowest_zero_bits(u64::MAX, 5), 0);
        assert_eq!(lowest_zero_bits(0, 100), u64::MAX);
    }
}

#[cfg(test)]
mod model_tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::transport::shm::{Segment, ShmTransport};

    /// Two initialised segments of `frames` frames in this process.
    pub(crate) fn two_nodes(frames: u64) -> (Frames, Words) {
        let layout = SegmentLayout::new(2, 4096, frames, 64);
        let segments: Vec<Segment> = (0..2)
            .map(|n| {
                let segment = Segment::create(NodeId(n), layout.len).unwrap();
                // SAFETY: fresh segment of `layout.len` bytes, private to this test.
                unsafe { layout.initialise(segment.as_ptr(), NodeId(n)) };
                segment
            })
            .collect();
        let words = Words::new(Arc::new(ShmTransport::new(NodeId(0), segments, layout)), 2);
        (Frames::new(words.clone(), layout), words)
    }

    #[derive(Clone, Debug)]
    enum Op {
        Take { node: u16, count: u64 },
        Release { node: u16, pick: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u16..2, 1u64..40).prop_map(|(node, count)| Op::Take { node, count }),
            (0u16..2, any::<usize>()).prop_map(|(node, pick)| Op::Release { node, pick }),
        ]
    }

    proptest! {
        /// The free map and counter agree with a set of used frames per node.
        #[test]
        fn frames_match_model(ops in prop::collection::vec(op(), 1..60)) {
            let (frames, _) = two_nodes(100);
            let mut model: [BTreeSet<u32>; 2] = Default::default();
            for op in ops {
                match op {
                    Op::Take { node, count } => {
                        let used = &mut model[node as usize];
                        let free = 100 - used.len() as u64;
                        match frames.take(NodeId(node), count) {
                            Ok(taken) => {
                                prop_assert!(count <= free);
                                prop_assert_eq!(taken.len() as u64, count);
                                for f in taken {
                                    prop_assert!(used.insert(f), "frame {} handed out twice", f);
                                }
                            }
                            Err(Error::OutOfMemory { requested, free: reported, .. }) => {
                                prop_assert!(count > free);
                                prop_assert_eq!(requested, count * 4096);
                                prop_assert_eq!(reported, free * 4096);
                            }
                            Err(e) => prop_assert!(false, "{}", e),
                        }
                    }
                    Op::Release { node, pick } => {
                        let used = &mut model[node as usize];
                        if let Some(&f) = used.iter().nth(pick % used.len().max(1)) {
                            frames.release(NodeId(node), &[f]).unwrap();
                            used.remove(&f);
                            // A second release is corruption and changes nothing.
                            prop_assert!(frames.release(NodeId(node), &[f]).is_err());
                        }
                    }
                }
                for node in 0..2u16 {
                    prop_assert_eq!(frames.free_frames(NodeId(node)).unwrap(), 100 - model[node as usize].len() as u64);
                    frames.validate(NodeId(node)).unwrap();
                }
            }
        }
    }
}
