//! The shared-memory backend: every node of the group on one host.
//!
//! Each node's segment is an anonymous `memfd` (it has no name under
//! `/dev/shm`, so nothing is left behind when processes die). The rendezvous
//! passes the file descriptors between processes over a Unix-domain socket,
//! and every process maps every segment once, `MAP_SHARED`, as its local
//! view. One-sided operations are then copies and atomics on those views, and
//! `quiet` is a sequentially consistent fence.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

use crate::error::{Error, Result};
use crate::layout::SegmentLayout;
use crate::topology::NodeId;
use crate::transport::{check_bounds, LocalView, Transport, TransportKind};

/// One node's segment, mapped into this process.
#[derive(Debug)]
pub struct Segment {
    fd: OwnedFd,
    ptr: *mut u8,
    len: u64,
}

// SAFETY: the mapping is shared memory that every user touches through
// atomics or explicit copies; the pointer is valid until `Drop` unmaps it.
unsafe impl Send for Segment {}
// SAFETY: as above; `&Segment` hands out no references to the bytes.
unsafe impl Sync for Segment {}

impl Segment {
    /// Creates a zero-filled segment of `len` bytes for `node`.
    pub fn create(node: NodeId, len: u64) -> Result<Self> {
        let name = std::ffi::CString::new(format!("meshmem-node-{node}")).expect("no NUL");
        let fd = memfd_create(&name, MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| Error::os(format!("memfd_create for node {node}"), e))?;
        nix::unistd::ftruncate(&fd, len as i64)
            .map_err(|e| Error::os(format!("ftruncate of node {node}'s segment to {len} bytes"), e))?;
        Self::map(fd, len)
    }

    /// Maps a segment received from a peer.
    pub fn open(fd: OwnedFd) -> Result<Self> {
        let stat = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| Error::os("fstat of a segment", e))?;
        Self::map(fd, stat.st_size as u64)
    }

    fn map(fd: OwnedFd, len: u64) -> Result<Self> {
        // SAFETY: a fresh shared mapping of the whole file, placed by the
        // kernel; nothing else refers to that range yet.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::os(
                format!("mmap of a {len}-byte segment"),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Segment { fd, ptr: ptr.cast(), len })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are the mapping made in `map`. A failed
        // munmap can only mean the range is already gone; the memory is
        // returned when the process exits either way, so it is ignored.
        unsafe { libc::munmap(self.ptr.cast(), self.len as usize) };
    }
}

/// The shared-memory transport of one node process.
///
/// In a group that spans hosts it contains the segments of this host's nodes
/// only. The others are `None`, and an operation on them fails naming the
/// node (the pool routes those to TCP or RDMA instead).
pub struct ShmTransport {
    me: NodeId,
    segments: Vec<Option<Arc<Segment>>>,
    layout: SegmentLayout,
}

impl ShmTransport {
    /// Builds the transport over every node's mapped segment, in id order.
    pub fn new(me: NodeId, segments: Vec<Segment>, layout: SegmentLayout) -> Self {
        Self::partial(me, segments.into_iter().map(|s| Some(Arc::new(s))).collect(), layout)
    }

    /// Builds the transport over the segments of the nodes on this host, in
    /// id order, `None` for nodes on other hosts. This node's own segment
    /// must be present because its header contains the traffic counters.
    pub fn partial(me: NodeId, segments: Vec<Option<Arc<Segment>>>, layout: SegmentLayout) -> Self {
        debug_assert!(segments.get(me.index()).is_some_and(Option::is_some), "node {me} needs its own segment");
        ShmTransport { me, segments, layout }
    }

    pub fn segment(&self, node: NodeId) -> Result<&Segment> {
        match self.segments.get(node.index()) {
            Some(Some(segment)) => Ok(segment),
            Some(None) => Err(Error::Transport {
                node,
                reason: format!(
                    "its segment is on another host, so node {} cannot reach it through shared memory",
                    self.me
                ),
                source: None,
            }),
            None => Err(Error::NodeOutOfRange {
                node: node.0 as u32,
                nodes: self.segments.len(),
                mesh: crate::topology::Mesh3d { dims: [self.segments.len() as u16, 1, 1], wrap: false },
            }),
        }
    }

    /// Adds one operation of `bytes` bytes to `dest` to this node's row.
    #[inline]
    fn count(&self, dest: NodeId, bytes: u64) {
        let Some(Some(own)) = self.segments.get(self.me.index()) else { return };
        let at = |offset: u64| {
            // SAFETY: the traffic row lies inside the header of our own
            // segment, which stays mapped while `self` lives; the offsets are
            // 8-byte aligned and the words are only touched atomically.
            unsafe { &*(own.ptr.add(offset as usize) as *const AtomicU64) }
        };
        // Relaxed: counters are statistics, read without ordering guarantees.
        at(self.layout.traffic_bytes(dest)).fetch_add(bytes, Ordering::Relaxed);
        at(self.layout.traffic_ops(dest)).fetch_add(1, Ordering::Relaxed);
    }

    #[inline]
    fn word(&self, node: NodeId, offset: u64) -> Result<&AtomicU64> {
        let segment = self.segment(node)?;
        check_bounds(node, offset, 8, segment.len)?;
        if offset % 8 != 0 {
            return Err(Error::UnalignedOffset { node, offset });
        }
        // SAFETY: in bounds and aligned (checked above) inside a live mapping.
        Ok(unsafe { &*(segment.ptr.add(offset as usize) as *const AtomicU64) })
    }
}

impl Transport for ShmTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn local_node(&self) -> NodeId {
        self.me
    }

    fn segment_len(&self, node: NodeId) -> Result<u64> {
        Ok(self.segment(node)?.len)
    }

    fn read(&self, node: NodeId, offset: u64, dst: &mut [u8]) -> Result<()> {
        let segment = self.segment(node)?;
        check_bounds(node, offset, dst.len() as u64, segment.len)?;
        // SAFETY: the source range is inside the mapping (checked above) and
        // cannot overlap `dst`, which is ordinary memory of this process.
        // Concurrent writers in other processes make the bytes unspecified,
        // not the copy unsound, as with any shared-memory get.
        unsafe { ptr::copy_nonoverlapping(segment.ptr.add(offset as usize), dst.as_mut_ptr(), dst.len()) };
        self.count(node, dst.len() as u64);
        Ok(())
    }

    fn write(&self, node: NodeId, offset: u64, src: &[u8]) -> Result<()> {
        let segment = self.segment(node)?;
        check_bounds(node, offset, src.len() as u64, segment.len)?;
        // SAFETY: the destination range is inside the mapping (checked above);
        // `src` is ordinary memory of this process, so they cannot overlap.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), segment.ptr.add(offset as usize), src.len()) };
        self.count(node, src.len() as u64);
        Ok(())
    }

    fn fetch_add_u64(&self, node: NodeId, offset: u64, value: u64) -> Result<u64> {
        let previous = self.word(node, offset)?.fetch_add(value, Ordering::AcqRel);
        self.count(node, 8);
        Ok(previous)
    }

    fn compare_exchange_u64(&self, node: NodeId, offset: u64, current: u64, new: u64) -> Result<u64> {
        let word = self.word(node, offset)?;
        let previous = match word.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire) {
            Ok(previous) | Err(previous) => previous,
        };
        self.count(node, 8);
        Ok(previous)
    }

    fn quiet(&self) -> Result<()> {
        // Stores to shared memory are complete when issued; SeqCst orders them
        // before whatever this node does next (a flag store, a barrier).
        fence(Ordering::SeqCst);
        Ok(())
    }

    fn local_view(&self, node: NodeId) -> Option<LocalView> {
        self.segments.get(node.index())?.as_ref().map(|s| LocalView { ptr: s.ptr, len: s.len })
    }

    fn count_copy(&self, from: NodeId, to: NodeId, bytes: u64) {
        if self.local_view(from).is_some() && self.local_view(to).is_some() {
            self.count(from, bytes);
            self.count(to, bytes);
        }
    }

    fn mappable_fd(&self, node: NodeId) -> Option<std::os::fd::RawFd> {
        self.segments.get(node.index())?.as_ref().map(|s| s.fd.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single() -> ShmTransport {
        let layout = SegmentLayout::new(2, 4096, 4, 64);
        let segments = vec![
            Segment::create(NodeId(0), layout.len).unwrap(),
            Segment::create(NodeId(1), layout.len).unwrap(),
        ];
        ShmTransport::new(NodeId(0), segments, layout)
    }

    #[test]
    fn read_write_and_atomics() {
        let t = single();
        let at = t.segment_len(NodeId(1)).unwrap() - 16;
        t.write(NodeId(1), at, &[1, 2, 3, 4]).unwrap();
        let mut back = [0u8; 4];
        t.read(NodeId(1), at, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3, 4]);
        assert_eq!(t.fetch_add_u64(NodeId(1), at + 8, 5).unwrap(), 0);
        assert_eq!(t.compare_exchange_u64(NodeId(1), at + 8, 5, 9).unwrap(), 5);
        assert_eq!(t.compare_exchange_u64(NodeId(1), at + 8, 5, 1).unwrap(), 9);
        t.quiet().unwrap();
    }

    #[test]
    fn out_of_bounds_is_rejected() {
        let t = single();
        let len = t.segment_len(NodeId(1)).unwrap();
        let err = t.write(NodeId(1), len - 2, &[0; 4]).unwrap_err();
        assert!(matches!(err, Error::OutOfBounds { .. }), "{err}");
        assert!(err.to_string().contains(&format!("{len:#x}")), "{err}");
        let err = t.read(NodeId(1), u64::MAX, &mut [0; 1]).unwrap_err();
        assert!(matches!(err, Error::OutOfBounds { .. }), "{err}");
        let err = t.fetch_add_u64(NodeId(1), 4, 1).unwrap_err();
        assert!(matches!(err, Error::UnalignedOffset { .. }), "{err}");
        assert!(t.read(NodeId(2), 0, &mut [0; 1]).is_err());
    }

    #[test]
    fn operations_are_counted() {
        let t = single();
        t.write(NodeId(1), 4096, &[0; 100]).unwrap();
        t.fetch_add_u64(NodeId(1), 4096, 1).unwrap();
        let own = t.local_view(NodeId(0)).unwrap();
        let layout = t.layout;
        // SAFETY: reading two aligned counter words of our own live view.
        let (bytes, ops) = unsafe {
            (
                *(own.ptr.add(layout.traffic_bytes(NodeId(1)) as usize) as *const u64),
                *(own.ptr.add(layout.traffic_ops(NodeId(1)) as usize) as *const u64),
            )
        };
        assert_eq!((bytes, ops), (108, 2));
    }
}
