//! The RDMA backend: ibverbs RC queue pairs, one memory region per segment,
//! RDMA READ and WRITE, and the two 64-bit atomics.
//!
//! Ownership and lifecycle, in the order things are made and the reverse
//! order they are freed:
//!
//! 1. [`Device`] opens a verbs context on the first active port of a device
//!    and allocates a protection domain and completion queues under it.
//! 2. [`MemoryRegion`] registers a segment (or this node's bounce buffer)
//!    with only the access flags it needs ([`Access`]). It keeps an `Arc` of
//!    the device, so a region never outlives its protection domain.
//! 3. [`QueuePair`] is an RC queue pair per remote node, with its own
//!    completion queue. It moves Reset → Init → Ready to Receive → Ready to
//!    Send as [`QpState`] allows, once the peer's [`Endpoint`] (its LID, GID,
//!    queue-pair numbers, PSN and registered regions) arrived through the
//!    group's rendezvous.
//! 4. [`RdmaTransport`] posts one signalled work request per operation from
//!    a registered bounce buffer and polls its completion, so `quiet` has
//!    nothing left to wait for when an operation returns.
//!
//! Everything that needs no device is plain Rust and unit-tested: work
//! requests are built by [`WorkRequest::build`], completion statuses map to
//! errors through `TryFrom<u32>` ([`CompletionStatus`]), queue-pair states
//! change only along the transitions the verbs specification allows, and
//! endpoints encode to and decode from bytes without panicking.
//!
//! NOTE: the device path (everything that calls into libibverbs) has been
//! compiled but not run here; no RDMA device was available. The
//! `tests/rdma.rs` integration test runs it where one is present.

use std::ffi::CStr;
use std::fmt;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rdma_sys::*;

use crate::error::{Error, Result};
use crate::topology::NodeId;
use crate::layout::SegmentLayout;
use crate::transport::shm::Segment;
use crate::transport::{check_bounds, LocalView, Transport, TransportKind};

/// Outstanding work requests per queue pair. One operation is in flight at a
/// time per peer today, so a small queue suffices.
const SEND_QUEUE_DEPTH: u32 = 16;

/// Outstanding RDMA READs and atomics a queue pair may have as initiator and
/// as target. 16 is what ConnectX adapters report as `max_qp_rd_atom`; the
/// device's own limit is applied when it is lower.
const MAX_RD_ATOMIC: u8 = 16;

/// Size of the registered bounce buffer that reads land in and writes are
/// sent from. Larger transfers are split.
const BOUNCE_LEN: usize = 4 << 20;

/// Local ACK timeout exponent: 4.096 µs × 2^14 ≈ 67 ms, the value perftest
/// and most RC examples use.
const ACK_TIMEOUT: u8 = 14;

/// Retries on transport errors and on receiver-not-ready; 7 is the maximum
/// the 3-bit fields allow (for `rnr_retry`, 7 means "retry forever").
const RETRY_COUNT: u8 = 7;

/// How long one operation may wait for its completion.
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(10);

/// A work completion status (`enum ibv_wc_status` of `<infiniband/verbs.h>`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CompletionStatus {
    Success,
    LocalLength,
    LocalQpOperation,
    LocalEecOperation,
    LocalProtection,
    Flushed,
    MemoryWindowBind,
    BadResponse,
    LocalAccess,
    RemoteInvalidRequest,
    RemoteAccess,
    RemoteOperation,
    RetryExceeded,
    RnrRetryExceeded,
    LocalRddViolation,
    RemoteInvalidRdRequest,
    RemoteAbort,
    InvalidEecn,
    InvalidEecState,
    Fatal,
    ResponseTimeout,
    General,
    TagMatching,
    TagMatchingRendezvousIncomplete,
}

/// A status code that this build does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown work completion status {0}")]
pub struct UnknownStatus(pub u32);

impl TryFrom<u32> for CompletionStatus {
    type Error = UnknownStatus;

    fn try_from(value: u32) -> std::result::Result<Self, UnknownStatus> {
        use ibv_wc_status::*;
        use CompletionStatus::*;
        Ok(match value {
            IBV_WC_SUCCESS => Success,
            IBV_WC_LOC_LEN_ERR => LocalLength,
            IBV_WC_LOC_QP_OP_ERR => LocalQpOperation,
            IBV_WC_LOC_EEC_OP_ERR => LocalEecOperation,
            IBV_WC_LOC_PROT_ERR => LocalProtection,
            IBV_WC_WR_FLUSH_ERR => Flushed,
            IBV_WC_MW_BIND_ERR => MemoryWindowBind,
            IBV_WC_BAD_RESP_ERR => BadResponse,
            IBV_WC_LOC_ACCESS_ERR => LocalAccess,
            IBV_WC_REM_INV_REQ_ERR => RemoteInvalidRequest,
            IBV_WC_REM_ACCESS_ERR => RemoteAccess,
            IBV_WC_REM_OP_ERR => RemoteOperation,
            IBV_WC_RETRY_EXC_ERR => RetryExceeded,
            IBV_WC_RNR_RETRY_EXC_ERR => RnrRetryExceeded,
            IBV_WC_LOC_RDD_VIOL_ERR => LocalRddViolation,
            IBV_WC_REM_INV_RD_REQ_ERR => RemoteInvalidRdRequest,
            IBV_WC_REM_ABORT_ERR => RemoteAbort,
            IBV_WC_INV_EECN_ERR => InvalidEecn,
            IBV_WC_INV_EEC_STATE_ERR => InvalidEecState,
            IBV_WC_FATAL_ERR => Fatal,
            IBV_WC_RESP_TIMEOUT_ERR => ResponseTimeout,
            IBV_WC_GENERAL_ERR => General,
            IBV_WC_TM_ERR => TagMatching,
            IBV_WC_TM_RNDV_INCOMPLETE => TagMatchingRendezvousIncomplete,
            other => return Err(UnknownStatus(other)),
        })
    }
}

impl CompletionStatus {
    /// Returns what went wrong and what to check, or `None` for success.
    pub fn explain(self) -> Option<&'static str> {
        use CompletionStatus::*;
        Some(match self {
            Success => return None,
            LocalLength => "local length error: the scatter/gather entry does not match the operation's length",
            LocalQpOperation => "local queue-pair operation error: the work request is invalid for this queue pair",
            LocalEecOperation => "local EE context operation error",
            LocalProtection => "local protection error: the local buffer is not inside a region registered with this protection domain",
            Flushed => "flushed: the queue pair entered the error state before this request ran; an earlier request failed",
            MemoryWindowBind => "memory window bind error",
            BadResponse => "bad response from the remote node",
            LocalAccess => "local access error: a protection error in a local buffer of an RDMA READ or atomic",
            RemoteInvalidRequest => "remote invalid request: the remote node rejected the operation (unsupported opcode or an unaligned atomic)",
            RemoteAccess => "remote access error: the remote key or range is not registered for this access on the remote node",
            RemoteOperation => "remote operation error: the remote node could not complete the operation",
            RetryExceeded => "transport retry counter exceeded: the remote node did not answer; it may have exited or the link is down",
            RnrRetryExceeded => "receiver-not-ready retry counter exceeded",
            LocalRddViolation => "local RDD violation",
            RemoteInvalidRdRequest => "remote invalid RD request",
            RemoteAbort => "remote node aborted the operation",
            InvalidEecn => "invalid EE context number",
            InvalidEecState => "invalid EE context state",
            Fatal => "fatal error of the adapter",
            ResponseTimeout => "response timeout",
            General => "general error",
            TagMatching => "tag matching error",
            TagMatchingRendezvousIncomplete => "tag matching rendezvous incomplete",
        })
    }

    /// Maps a raw status from a work completion to `Ok(())` or an error that
    /// names the node and the operation.
    pub fn check(raw: u32, node: NodeId, operation: &str) -> Result<()> {
        let reason = match CompletionStatus::try_from(raw) {
            Ok(status) => match status.explain() {
                None => return Ok(()),
                Some(text) => format!("RDMA {operation} to node {node} failed: {text} (status {raw})"),
            },
            Err(unknown) => format!("RDMA {operation} to node {node} failed: {unknown}"),
        };
        Err(Error::Transport { node, reason, source: None })
    }
}

/// The state of a queue pair (`enum ibv_qp_state`), limited to those this
/// backend uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QpState {
    Reset,
    Init,
    ReadyToReceive,
    ReadyToSend,
    Error,
}

impl QpState {
    /// Returns `to` when the verbs specification allows moving there from
    /// `self` with `ibv_modify_qp`, and an error naming both otherwise.
    pub fn transition(self, to: QpState) -> std::result::Result<QpState, String> {
        use QpState::*;
        let allowed = matches!(
            (self, to),
            (Reset, Init)
                | (Init, Init)
                | (Init, ReadyToReceive)
                | (ReadyToReceive, ReadyToSend)
                | (ReadyToSend, ReadyToSend)
        ) || matches!(to, Reset | Error);
        if allowed {
            Ok(to)
        } else {
            Err(format!("a queue pair cannot move from {self:?} to {to:?}"))
        }
    }

    fn raw(self) -> ibv_qp_state::Type {
        match self {
            QpState::Reset => ibv_qp_state::IBV_QPS_RESET,
            QpState::Init => ibv_qp_state::IBV_QPS_INIT,
            QpState::ReadyToReceive => ibv_qp_state::IBV_QPS_RTR,
            QpState::ReadyToSend => ibv_qp_state::IBV_QPS_RTS,
            QpState::Error => ibv_qp_state::IBV_QPS_ERR,
        }
    }
}

/// The use a memory region is registered for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A segment that peers read, write and update atomically.
    Segment,
    /// A local buffer that RDMA READs and atomics write into and RDMA
    /// WRITEs send from; no remote access.
    Bounce,
}

impl Access {
    /// Returns the `ibv_access_flags` for this use and no more.
    pub fn flags(self) -> ibv_access_flags {
        match self {
            // Remote write and atomic access require local write (verbs.h).
            Access::Segment => {
                ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                    | ibv_access_flags::IBV_ACCESS_REMOTE_READ
                    | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
                    | ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC
            }
            Access::Bounce => ibv_access_flags::IBV_ACCESS_LOCAL_WRITE,
        }
    }
}

/// A one-sided operation on a remote region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteOp {
    Read,
    Write,
    FetchAdd { add: u64 },
    CompareSwap { compare: u64, swap: u64 },
}

/// Everything one signalled work request needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkRequest {
    pub id: u64,
    pub op: RemoteOp,
    /// Local buffer (in a region registered with `Access::Bounce`).
    pub local_addr: u64,
    pub lkey: u32,
    pub len: u32,
    pub remote_addr: u64,
    pub rkey: u32,
}

impl WorkRequest {
    /// Checks what the adapter would reject later with a less helpful
    /// status: atomics move exactly 8 bytes between 8-byte aligned addresses.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if let RemoteOp::FetchAdd { .. } | RemoteOp::CompareSwap { .. } = self.op {
            if self.len != 8 {
                return Err(format!("an RDMA atomic moves 8 bytes, not {}", self.len));
            }
            if self.remote_addr % 8 != 0 || self.local_addr % 8 != 0 {
                return Err(format!(
                    "an RDMA atomic needs 8-byte aligned addresses (remote {:#x}, local {:#x})",
                    self.remote_addr, self.local_addr
                ));
            }
        }
        Ok(())
    }

    /// Builds the `ibv_send_wr`, pointing it at `sge`, which this fills in.
    /// The request is signalled so every operation has a completion.
    pub fn build(&self, sge: &mut ibv_sge) -> ibv_send_wr {
        *sge = ibv_sge { addr: self.local_addr, length: self.len, lkey: self.lkey };
        // SAFETY: ibv_send_wr is a C struct of integers, pointers and unions
        // of those, for which all-zero bytes are a valid value.
        let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = self.id;
        wr.next = ptr::null_mut();
        wr.sg_list = sge;
        wr.num_sge = 1;
        wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
        match self.op {
            RemoteOp::Read | RemoteOp::Write => {
                wr.opcode = if self.op == RemoteOp::Read {
                    ibv_wr_opcode::IBV_WR_RDMA_READ
                } else {
                    ibv_wr_opcode::IBV_WR_RDMA_WRITE
                };
                wr.wr.rdma = rdma_t { remote_addr: self.remote_addr, rkey: self.rkey };
            }
            RemoteOp::FetchAdd { add } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD;
                wr.wr.atomic = atomic_t { remote_addr: self.remote_addr, compare_add: add, swap: 0, rkey: self.rkey };
            }
            RemoteOp::CompareSwap { compare, swap } => {
                wr.opcode = ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP;
                wr.wr.atomic = atomic_t { remote_addr: self.remote_addr, compare_add: compare, swap, rkey: self.rkey };
            }
        }
        wr
    }
}

/// A registered region as a peer addresses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteRegion {
    pub addr: u64,
    pub rkey: u32,
    pub len: u64,
}

/// The connection data one node publishes through the rendezvous so that every peer can
/// connect a queue pair to it and address its segments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub lid: u16,
    pub gid: [u8; 16],
    /// Starting packet sequence number of this node's send queues.
    pub psn: u32,
    /// `qpns[peer]`: the number of the queue pair this node made for `peer`
    /// (0 for itself).
    pub qpns: Vec<u32>,
    /// This node's registered segments, in registration order.
    pub regions: Vec<RemoteRegion>,
}

/// Most peers or regions one encoded endpoint may list.
const MAX_ENDPOINT_ENTRIES: usize = 1 << 16;

impl Endpoint {
    /// Encodes as little-endian bytes: lid, gid, psn, count and queue-pair
    /// numbers, count and regions.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.qpns.len() * 4 + self.regions.len() * 20);
        out.extend_from_slice(&self.lid.to_le_bytes());
        out.extend_from_slice(&self.gid);
        out.extend_from_slice(&self.psn.to_le_bytes());
        out.extend_from_slice(&(self.qpns.len() as u32).to_le_bytes());
        for qpn in &self.qpns {
            out.extend_from_slice(&qpn.to_le_bytes());
        }
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        for region in &self.regions {
            out.extend_from_slice(&region.addr.to_le_bytes());
            out.extend_from_slice(&region.rkey.to_le_bytes());
            out.extend_from_slice(&region.len.to_le_bytes());
        }
        out
    }

    /// Decodes what `encode` wrote. Any other input returns an error that
    /// names the offset where decoding stopped.
    pub fn decode(bytes: &[u8]) -> std::result::Result<Endpoint, String> {
        let mut at = 0usize;
        let mut take = |n: usize| -> std::result::Result<&[u8], String> {
            let end = at.checked_add(n).filter(|&end| end <= bytes.len());
            let end =
                end.ok_or_else(|| format!("endpoint ends at byte {} but needs {} more at {at}", bytes.len(), n))?;
            let slice = &bytes[at..end];
            at = end;
            Ok(slice)
        };
        let u32_at = |s: &[u8]| u32::from_le_bytes(s.try_into().unwrap_or_default());
        let u64_at = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or_default());

        let lid = u16::from_le_bytes(take(2)?.try_into().unwrap_or_default());
        let gid: [u8; 16] = take(16)?.try_into().unwrap_or_default();
        let psn = u32_at(take(4)?);
        let count = u32_at(take(4)?) as usize;
        if count > MAX_ENDPOINT_ENTRIES {
            return Err(format!("endpoint lists {count} queue pairs, more than {MAX_ENDPOINT_ENTRIES}"));
        }
        let qpns = (0..count).map(|_| take(4).map(u32_at)).collect::<std::result::Result<_, _>>()?;
        let count = u32_at(take(4)?) as usize;
        if count > MAX_ENDPOINT_ENTRIES {
            return Err(format!("endpoint lists {count} regions, more than {MAX_ENDPOINT_ENTRIES}"));
        }
        let regions = (0..count)
            .map(|_| Ok(RemoteRegion { addr: u64_at(take(8)?), rkey: u32_at(take(4)?), len: u64_at(take(8)?) }))
            .collect::<std::result::Result<_, String>>()?;
        if at != bytes.len() {
            return Err(format!("endpoint has {} bytes after its end", bytes.len() - at));
        }
        Ok(Endpoint { lid, gid, psn, qpns, regions })
    }
}

/// Names of the RDMA devices of this host, from `ibv_get_device_list(3)`.
/// An empty list means none (or no kernel support); an error means the
/// library failed.
pub fn device_names() -> Result<Vec<String>> {
    let mut count = 0;
    // SAFETY: `count` is a valid out-pointer; the list is freed below.
    let list = unsafe { ibv_get_device_list(&mut count) };
    if list.is_null() {
        let e = std::io::Error::last_os_error();
        // ENOSYS: no kernel support for verbs, which is the same as no device.
        if e.raw_os_error() == Some(libc::ENOSYS) {
            return Ok(Vec::new());
        }
        return Err(Error::os("ibv_get_device_list", e));
    }
    let names = (0..count.max(0) as usize)
        .map(|i| {
            // SAFETY: the list has `count` valid device pointers.
            let name = unsafe { ibv_get_device_name(*list.add(i)) };
            if name.is_null() {
                String::from("?")
            } else {
                // SAFETY: a NUL-terminated name owned by the device list.
                unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
            }
        })
        .collect();
    // SAFETY: the list came from ibv_get_device_list and is freed once.
    unsafe { ibv_free_device_list(list) };
    Ok(names)
}

fn verbs_error(node: NodeId, what: &str) -> Error {
    Error::Transport { node, reason: format!("{what} failed"), source: Some(std::io::Error::last_os_error()) }
}

/// An open device port and its protection domain.
pub struct Device {
    name: String,
    context: *mut ibv_context,
    pd: *mut ibv_pd,
    port: u8,
    lid: u16,
    gid: [u8; 16],
    mtu: ibv_mtu::Type,
    max_rd_atomic: u8,
    me: NodeId,
}

// SAFETY: verbs objects may be used from any thread (libibverbs is thread
// safe); `Device` hands out no references into them.
unsafe impl Send for Device {}
// SAFETY: as above.
unsafe impl Sync for Device {}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device").field("name", &self.name).field("port", &self.port).field("lid", &self.lid).finish()
    }
}

impl Device {
    /// Opens the device named `name` (or the first one) on port 1 and
    /// allocates a protection domain.
    pub fn open(me: NodeId, name: Option<&str>) -> Result<Arc<Device>> {
        let names = device_names()?;
        let index = match name {
            Some(wanted) => names.iter().position(|n| n == wanted).ok_or_else(|| Error::Transport {
                node: me,
                reason: format!("no RDMA device named `{wanted}`; this host has {names:?}"),
                source: None,
            })?,
            None if names.is_empty() => {
                return Err(Error::Transport {
                    node: me,
                    reason: "this host has no RDMA device; use the TCP transport".into(),
                    source: None,
                })
            }
            None => 0,
        };

        let mut count = 0;
        // SAFETY: as in `device_names`; freed before returning.
        let list = unsafe { ibv_get_device_list(&mut count) };
        if list.is_null() || index >= count.max(0) as usize {
            return Err(verbs_error(me, "ibv_get_device_list"));
        }
        // SAFETY: `index` is inside the list; the context stays valid after
        // the list is freed (ibv_get_device_list(3)).
        let context = unsafe { ibv_open_device(*list.add(index)) };
        // SAFETY: freed once, after its last use.
        unsafe { ibv_free_device_list(list) };
        if context.is_null() {
            return Err(verbs_error(me, "ibv_open_device"));
        }
        let mut device = Device {
            name: names[index].clone(),
            context,
            pd: ptr::null_mut(),
            port: 1,
            lid: 0,
            gid: [0; 16],
            mtu: ibv_mtu::IBV_MTU_1024,
            max_rd_atomic: MAX_RD_ATOMIC,
            me,
        };

        // From here `Drop` frees what is set.
        // SAFETY: a live context.
        device.pd = unsafe { ibv_alloc_pd(context) };
        if device.pd.is_null() {
            return Err(verbs_error(me, "ibv_alloc_pd"));
        }
        // SAFETY: zeroed attribute structs are valid out-parameters.
        let mut port: ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: a live context and a valid out-pointer.
        if unsafe { ___ibv_query_port(context, device.port, &mut port) } != 0 {
            return Err(verbs_error(me, "ibv_query_port"));
        }
        if port.state != ibv_port_state::IBV_PORT_ACTIVE {
            return Err(Error::Transport {
                node: me,
                reason: format!(
                    "port {} of RDMA device {} is not active (state {})",
                    device.port, device.name, port.state
                ),
                source: None,
            });
        }
        device.lid = port.lid;
        device.mtu = port.active_mtu;
        let mut gid: ibv_gid = ibv_gid { raw: [0; 16] };
        // SAFETY: a live context and a valid out-pointer. GID index 0 is the
        // port's default GID; RoCE needs it, InfiniBand may ignore it.
        if unsafe { ibv_query_gid(context, device.port, 0, &mut gid) } == 0 {
            // SAFETY: every bit pattern of the union is a valid byte array.
            device.gid = unsafe { gid.raw };
        }
        // SAFETY: zeroed attributes are a valid out-parameter.
        let mut attr: ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: a live context and a valid out-pointer.
        if unsafe { ibv_query_device(context, &mut attr) } == 0 {
            device.max_rd_atomic = MAX_RD_ATOMIC.min(attr.max_qp_rd_atom.clamp(1, 255) as u8);
        }
        tracing::info!(node = %me, device = %device.name, lid = device.lid, "RDMA device open");
        Ok(Arc::new(device))
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // A failure here means a region or queue pair still uses the domain,
        // which the `Arc`s rule out. The kernel frees everything at exit
        // either way, so failures are logged and not raised.
        // SAFETY: each pointer is freed once, children (regions, queue
        // pairs) having been dropped first because they hold an `Arc` of us.
        unsafe {
            if !self.pd.is_null() && ibv_dealloc_pd(self.pd) != 0 {
                tracing::warn!(device = %self.name, "ibv_dealloc_pd failed");
            }
            if ibv_close_device(self.context) != 0 {
                tracing::warn!(device = %self.name, "ibv_close_device failed");
            }
        }
    }
}

/// A registered range of memory. Holds its device, so the protection domain
/// outlives it.
pub struct MemoryRegion {
    mr: *mut ibv_mr,
    addr: *mut u8,
    len: usize,
    device: Arc<Device>,
}

// SAFETY: see `Device`; the region's memory is shared and only touched
// through copies made by its owner while holding the peer's lock.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Registers `len` bytes at `addr` for `access`.
    ///
    /// # Safety
    ///
    /// The range must stay mapped until the region is dropped, and with
    /// `Access::Segment` it may be changed by peers at any time.
    pub unsafe fn register(device: &Arc<Device>, addr: *mut u8, len: usize, access: Access) -> Result<MemoryRegion> {
        // SAFETY: the caller guarantees the range; the domain is live.
        let mr = unsafe { ibv_reg_mr(device.pd, addr.cast(), len, access.flags().0 as i32) };
        if mr.is_null() {
            return Err(verbs_error(device.me, &format!("ibv_reg_mr of {len} bytes at {addr:p}")));
        }
        Ok(MemoryRegion { mr, addr, len, device: device.clone() })
    }

    fn lkey(&self) -> u32 {
        // SAFETY: a live registration.
        unsafe { (*self.mr).lkey }
    }

    /// This region as peers address it.
    pub fn remote(&self) -> RemoteRegion {
        // SAFETY: a live registration.
        RemoteRegion { addr: self.addr as u64, rkey: unsafe { (*self.mr).rkey }, len: self.len as u64 }
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: registered in `register`, deregistered once. A failure
        // leaves the pages pinned until exit, which is logged, not raised.
        if unsafe { ibv_dereg_mr(self.mr) } != 0 {
            tracing::warn!(device = %self.device.name, len = self.len, "ibv_dereg_mr failed");
        }
    }
}

/// An RC queue pair to one peer, with its own completion queue.
pub struct QueuePair {
    qp: *mut ibv_qp,
    cq: *mut ibv_cq,
    state: QpState,
    device: Arc<Device>,
}

// SAFETY: see `Device`; a queue pair is used under its peer's lock.
unsafe impl Send for QueuePair {}

impl QueuePair {
    /// Creates a queue pair in the Reset state and moves it to Init.
    pub fn create(device: &Arc<Device>) -> Result<QueuePair> {
        let me = device.me;
        // SAFETY: a live context; no channel, vector 0.
        let cq =
            unsafe { ibv_create_cq(device.context, SEND_QUEUE_DEPTH as i32 * 2, ptr::null_mut(), ptr::null_mut(), 0) };
        if cq.is_null() {
            return Err(verbs_error(me, "ibv_create_cq"));
        }
        // SAFETY: zeroed init attributes are valid; fields set below.
        let mut init: ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = cq;
        init.recv_cq = cq;
        init.cap.max_send_wr = SEND_QUEUE_DEPTH;
        init.cap.max_recv_wr = 1;
        init.cap.max_send_sge = 1;
        init.cap.max_recv_sge = 1;
        init.qp_type = ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        // SAFETY: a live domain and valid attributes.
        let qp = unsafe { ibv_create_qp(device.pd, &mut init) };
        if qp.is_null() {
            // SAFETY: created above, unused.
            unsafe { ibv_destroy_cq(cq) };
            return Err(verbs_error(me, "ibv_create_qp"));
        }
        let mut pair = QueuePair { qp, cq, state: QpState::Reset, device: device.clone() };

        // SAFETY: zeroed attributes are valid; fields set below.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.pkey_index = 0;
        attr.port_num = device.port;
        attr.qp_access_flags = Access::Segment.flags().0 & !ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0;
        let mask =
            ibv_qp_attr_mask::IBV_QP_PKEY_INDEX | ibv_qp_attr_mask::IBV_QP_PORT | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        pair.modify(QpState::Init, attr, mask)?;
        Ok(pair)
    }

    /// Returns the queue pair number that peers connect to.
    pub fn qpn(&self) -> u32 {
        // SAFETY: a live queue pair.
        unsafe { (*self.qp).qp_num }
    }

    pub fn state(&self) -> QpState {
        self.state
    }

    fn modify(&mut self, to: QpState, mut attr: ibv_qp_attr, mask: ibv_qp_attr_mask) -> Result<()> {
        let me = self.device.me;
        let next = self.state.transition(to).map_err(|reason| Error::Transport { node: me, reason, source: None })?;
        attr.qp_state = to.raw();
        let mask = mask | ibv_qp_attr_mask::IBV_QP_STATE;
        // SAFETY: a live queue pair and attributes valid for `mask`.
        let rc = unsafe { ibv_modify_qp(self.qp, &mut attr, mask.0 as i32) };
        if rc != 0 {
            return Err(Error::Transport {
                node: me,
                reason: format!("ibv_modify_qp from {:?} to {to:?} failed", self.state),
                source: Some(std::io::Error::from_raw_os_error(rc)),
            });
        }
        self.state = next;
        Ok(())
    }

    /// Connects to the peer's queue pair `remote_qpn` and moves through
    /// Ready to Receive to Ready to Send.
    pub fn connect(&mut self, local_psn: u32, remote: &Endpoint, remote_qpn: u32) -> Result<()> {
        let device = self.device.clone();

        // Phase 1: Ready to Receive, addressed at the peer.
        // SAFETY: zeroed attributes are valid; fields set below.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.path_mtu = device.mtu;
        attr.dest_qp_num = remote_qpn;
        attr.rq_psn = remote.psn;
        attr.max_dest_rd_atomic = device.max_rd_atomic;
        attr.min_rnr_timer = 12;
        attr.ah_attr.dlid = remote.lid;
        attr.ah_attr.port_num = device.port;
        if remote.gid != [0; 16] {
            // RoCE and routed InfiniBand address by GID.
            attr.ah_attr.is_global = 1;
            attr.ah_attr.grh.dgid = ibv_gid { raw: remote.gid };
            attr.ah_attr.grh.sgid_index = 0;
            attr.ah_attr.grh.hop_limit = 1;
        }
        let mask = ibv_qp_attr_mask::IBV_QP_AV
            | ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        self.modify(QpState::ReadyToReceive, attr, mask)?;

        // Phase 2: Ready to Send.
        // SAFETY: as above.
        let mut attr: ibv_qp_attr = unsafe { std::mem::zeroed() };
        attr.timeout = ACK_TIMEOUT;
        attr.retry_cnt = RETRY_COUNT;
        attr.rnr_retry = RETRY_COUNT;
        attr.sq_psn = local_psn;
        attr.max_rd_atomic = device.max_rd_atomic;
        let mask = ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(QpState::ReadyToSend, attr, mask)
    }

    /// Posts `request` and polls until it completes, the completion reports
    /// an error, or `COMPLETION_TIMEOUT` passes.
    fn execute(&mut self, node: NodeId, request: &WorkRequest, operation: &str) -> Result<()> {
        request.validate().map_err(|reason| Error::Transport { node, reason, source: None })?;
        let mut sge = ibv_sge { addr: 0, length: 0, lkey: 0 };
        let mut wr = request.build(&mut sge);
        let mut bad: *mut ibv_send_wr = ptr::null_mut();
        // SAFETY: a live queue pair in Ready to Send; `wr` and `sge` live
        // until the completion is polled below.
        let rc = unsafe { ibv_post_send(self.qp, &mut wr, &mut bad) };
        if rc != 0 {
            return Err(Error::Transport {
                node,
                reason: format!("ibv_post_send of an RDMA {operation} failed"),
                source: Some(std::io::Error::from_raw_os_error(rc)),
            });
        }

        let started = Instant::now();
        loop {
            // SAFETY: a zeroed completion is a valid out-parameter.
            let mut wc: ibv_wc = unsafe { std::mem::zeroed() };
            // SAFETY: a live completion queue and room for one completion.
            let n = unsafe { ibv_poll_cq(self.cq, 1, &mut wc) };
            if n < 0 {
                return Err(Error::Transport { node, reason: "ibv_poll_cq failed".into(), source: None });
            }
            if n == 1 && wc.wr_id == request.id {
                let outcome = CompletionStatus::check(wc.status, node, operation);
                if outcome.is_err() {
                    self.state = QpState::Error;
                }
                return outcome;
            }
            if started.elapsed() > COMPLETION_TIMEOUT {
                self.state = QpState::Error;
                return Err(Error::Transport {
                    node,
                    reason: format!("RDMA {operation} to node {node} did not complete within {COMPLETION_TIMEOUT:?}"),
                    source: None,
                });
            }
            std::hint::spin_loop();
        }
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: created in `create` and destroyed once, queue pair first.
        // Failures leave kernel objects until exit and are only logged.
        unsafe {
            if ibv_destroy_qp(self.qp) != 0 {
                tracing::warn!(device = %self.device.name, "ibv_destroy_qp failed");
            }
            if ibv_destroy_cq(self.cq) != 0 {
                tracing::warn!(device = %self.device.name, "ibv_destroy_cq failed");
            }
        }
    }
}

/// The connection to one peer: its queue pair, a bounce buffer, and where
/// its segment lies.
struct Link {
    qp: QueuePair,
    bounce: Vec<u64>,
    region: MemoryRegion,
    remote: RemoteRegion,
    next_id: u64,
}

/// The RDMA transport of one node.
pub struct RdmaTransport {
    me: NodeId,
    device: Arc<Device>,
    psn: u32,
    /// This node's registered segment; peers address it.
    own: MemoryRegion,
    /// `links[peer]`, built by `connect` and `None` for this node and for
    /// peers reached another way.
    links: Vec<Option<Mutex<Link>>>,
    /// Queue pairs created for each peer, waiting for `connect`.
    pending: Mutex<Vec<Option<QueuePair>>>,
    /// The layout of `segment`, whose traffic row counts this node's
    /// operations; `None` counts nothing.
    counters: Option<SegmentLayout>,
    /// The segment `own` registers, when the transport owns it. Declared
    /// last, so it is unmapped only after `own` is deregistered.
    segment: Option<Arc<Segment>>,
}

impl fmt::Debug for RdmaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RdmaTransport").field("node", &self.me).field("device", &self.device).finish()
    }
}

impl RdmaTransport {
    /// Phase 1 of setup: registers this node's segment and creates a queue
    /// pair for each of `peers` (a node count, this node excluded).
    ///
    /// # Safety
    ///
    /// `segment..segment + len` must stay mapped while the transport lives;
    /// peers will read, write and update it at any time.
    pub unsafe fn new(
        device: Arc<Device>,
        segment: *mut u8,
        len: usize,
        nodes: usize,
        peers: &[NodeId],
    ) -> Result<Self> {
        let me = device.me;
        // SAFETY: the caller's contract.
        let own = unsafe { MemoryRegion::register(&device, segment, len, Access::Segment) }?;
        let mut pending: Vec<Option<QueuePair>> = (0..nodes).map(|_| None).collect();
        for &peer in peers {
            if peer != me && peer.index() < nodes {
                pending[peer.index()] = Some(QueuePair::create(&device)?);
            }
        }
        let mut psn = [0u8; 4];
        // A fixed PSN would do for RC; a random one keeps stale packets of an
        // earlier run from matching.
        let _ = getrandom_psn(&mut psn);
        let psn = u32::from_le_bytes(psn) & 0x00ff_ffff;
        Ok(RdmaTransport {
            me,
            device,
            psn,
            own,
            links: (0..nodes).map(|_| None).collect(),
            pending: Mutex::new(pending),
            counters: None,
            segment: None,
        })
    }

    /// Opens this host's first RDMA device, registers `segment` and creates
    /// a queue pair for every other node of a group of `nodes`. The
    /// transport owns the segment, so it stays mapped as long as peers can
    /// reach it. An error explains why this node cannot use RDMA.
    pub fn for_segment(me: NodeId, segment: Arc<Segment>, nodes: usize) -> Result<RdmaTransport> {
        let device = Device::open(me, None)?;
        let len = usize::try_from(segment.len()).map_err(|_| Error::Transport {
            node: me,
            reason: format!("segment of {} bytes does not fit this machine's address space", segment.len()),
            source: None,
        })?;
        let peers: Vec<NodeId> = (0..nodes).filter(|&n| n != me.index()).map(|n| NodeId(n as u16)).collect();
        // SAFETY: the transport keeps an `Arc` of the segment, which stays
        // mapped until the transport (and with it the region) is dropped.
        let mut transport = unsafe { RdmaTransport::new(device, segment.as_ptr(), len, nodes, &peers) }?;
        transport.segment = Some(segment);
        Ok(transport)
    }

    /// Counts every operation in the traffic row of the segment that
    /// [`for_segment`](Self::for_segment) registered, as the other backends
    /// do. A transport made by [`new`](Self::new) counts nothing.
    pub fn with_counters(mut self, layout: SegmentLayout) -> Self {
        self.counters = Some(layout);
        self
    }

    fn count(&self, dest: NodeId, bytes: u64) {
        let (Some(own), Some(layout)) = (&self.segment, &self.counters) else { return };
        let word = |offset: u64| {
            // SAFETY: the traffic row lies in the header of our own segment,
            // which `self` keeps mapped; the words are 8-byte aligned and
            // only touched atomically.
            unsafe { &*(own.as_ptr().add(offset as usize) as *const AtomicU64) }
        };
        // Relaxed: counters are statistics, read without ordering.
        word(layout.traffic_bytes(dest)).fetch_add(bytes, Ordering::Relaxed);
        word(layout.traffic_ops(dest)).fetch_add(1, Ordering::Relaxed);
    }

    /// Returns the endpoint to publish through the rendezvous.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            lid: self.device.lid,
            gid: self.device.gid,
            psn: self.psn,
            qpns: self.pending.lock().iter().map(|qp| qp.as_ref().map_or(0, QueuePair::qpn)).collect(),
            regions: vec![self.own.remote()],
        }
    }

    /// Phase 2: connects the queue pair for `peer` to the peer's endpoint.
    pub fn connect(&mut self, peer: NodeId, remote: &Endpoint) -> Result<()> {
        let fail = |reason: String| Error::Transport { node: peer, reason, source: None };
        let mut qp = self
            .pending
            .get_mut()
            .get_mut(peer.index())
            .and_then(Option::take)
            .ok_or_else(|| fail(format!("no queue pair was created for node {peer}")))?;
        let remote_qpn = *remote
            .qpns
            .get(self.me.index())
            .ok_or_else(|| fail(format!("node {peer}'s endpoint lists no queue pair for node {}", self.me)))?;
        let region = *remote.regions.first().ok_or_else(|| fail(format!("node {peer} registered no segment")))?;
        qp.connect(self.psn, remote, remote_qpn)?;

        let mut bounce = vec![0u64; BOUNCE_LEN / 8];
        // SAFETY: the bounce buffer is moved into the link with its region
        // and is never reallocated (its length is fixed).
        let bounce_region =
            unsafe { MemoryRegion::register(&self.device, bounce.as_mut_ptr().cast(), BOUNCE_LEN, Access::Bounce) }?;
        self.links[peer.index()] =
            Some(Mutex::new(Link { qp, bounce, region: bounce_region, remote: region, next_id: 1 }));
        tracing::info!(node = %self.me, peer = %peer, "RDMA queue pair connected");
        Ok(())
    }

    fn link(&self, node: NodeId) -> Result<&Mutex<Link>> {
        self.links.get(node.index()).and_then(Option::as_ref).ok_or_else(|| Error::Transport {
            node,
            reason: format!("node {} has no RDMA connection to node {node}", self.me),
            source: None,
        })
    }

    /// Runs one operation of at most `BOUNCE_LEN` bytes through the bounce
    /// buffer: `fill` prepares it, `drain` reads it afterwards.
    fn run(
        &self,
        node: NodeId,
        op: RemoteOp,
        offset: u64,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
        drain: impl FnOnce(&[u8]),
    ) -> Result<()> {
        let mut link = self.link(node)?.lock();
        let link = &mut *link;
        check_bounds(node, offset, len as u64, link.remote.len)?;
        let id = link.next_id;
        link.next_id += 1;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut link.bounce[..]);
        fill(&mut bytes[..len]);
        let request = WorkRequest {
            id,
            op,
            local_addr: link.region.addr as u64,
            lkey: link.region.lkey(),
            len: len as u32,
            remote_addr: link.remote.addr + offset,
            rkey: link.remote.rkey,
        };
        let name = match op {
            RemoteOp::Read => "READ",
            RemoteOp::Write => "WRITE",
            RemoteOp::FetchAdd { .. } => "fetch-and-add",
            RemoteOp::CompareSwap { .. } => "compare-and-swap",
        };
        link.qp.execute(node, &request, name)?;
        let bytes: &[u8] = bytemuck::cast_slice(&link.bounce[..]);
        drain(&bytes[..len]);
        Ok(())
    }

    fn atomic(&self, node: NodeId, offset: u64, op: RemoteOp) -> Result<u64> {
        if offset % 8 != 0 {
            return Err(Error::UnalignedOffset { node, offset });
        }
        let mut previous = 0;
        self.run(node, op, offset, 8, |_| {}, |b| previous = u64::from_ne_bytes(b.try_into().unwrap_or_default()))?;
        self.count(node, 8);
        Ok(previous)
    }
}

fn getrandom_psn(out: &mut [u8; 4]) -> std::io::Result<()> {
    // SAFETY: a valid 4-byte buffer; getrandom(2) with no flags.
    let n = unsafe { libc::getrandom(out.as_mut_ptr().cast(), out.len(), 0) };
    if n == 4 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Transport for RdmaTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Rdma
    }

    fn local_node(&self) -> NodeId {
        self.me
    }

    fn segment_len(&self, node: NodeId) -> Result<u64> {
        Ok(self.link(node)?.lock().remote.len)
    }

    fn read(&self, node: NodeId, offset: u64, dst: &mut [u8]) -> Result<()> {
        for (i, chunk) in dst.chunks_mut(BOUNCE_LEN).enumerate() {
            let at = offset + (i * BOUNCE_LEN) as u64;
            let len = chunk.len();
            self.run(node, RemoteOp::Read, at, len, |_| {}, |b| chunk.copy_from_slice(b))?;
        }
        self.count(node, dst.len() as u64);
        Ok(())
    }

    fn write(&self, node: NodeId, offset: u64, src: &[u8]) -> Result<()> {
        for (i, chunk) in src.chunks(BOUNCE_LEN).enumerate() {
            let at = offset + (i * BOUNCE_LEN) as u64;
            self.run(node, RemoteOp::Write, at, chunk.len(), |b| b.copy_from_slice(chunk), |_| {})?;
        }
        self.count(node, src.len() as u64);
        Ok(())
    }

    fn fetch_add_u64(&self, node: NodeId, offset: u64, value: u64) -> Result<u64> {
        self.atomic(node, offset, RemoteOp::FetchAdd { add: value })
    }

    fn compare_exchange_u64(&self, node: NodeId, offset: u64, current: u64, new: u64) -> Result<u64> {
        self.atomic(node, offset, RemoteOp::CompareSwap { compare: current, swap: new })
    }

    /// Returns at once, because every operation waits for its own completion.
    fn quiet(&self) -> Result<()> {
        Ok(())
    }

    fn local_view(&self, _node: NodeId) -> Option<LocalView> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_status_maps_every_code() {
        for raw in 0..=23u32 {
            let status = CompletionStatus::try_from(raw).unwrap();
            assert_eq!(status.explain().is_none(), raw == 0, "{status:?}");
            let outcome = CompletionStatus::check(raw, NodeId(3), "READ");
            assert_eq!(outcome.is_ok(), raw == 0);
            if let Err(e) = outcome {
                let text = e.to_string();
                assert!(text.contains("node 3"), "{text}");
                assert!(text.contains(&format!("status {raw}")), "{text}");
            }
        }
        for raw in [24u32, 1000, u32::MAX] {
            assert_eq!(CompletionStatus::try_from(raw), Err(UnknownStatus(raw)));
            let text = CompletionStatus::check(raw, NodeId(1), "WRITE").unwrap_err().to_string();
            assert!(text.contains(&format!("unknown work completion status {raw}")), "{text}");
        }
    }

    #[test]
    fn qp_state_follows_the_verbs_state_machine() {
        use QpState::*;
        let path = [Reset, Init, ReadyToReceive, ReadyToSend];
        for pair in path.windows(2) {
            assert_eq!(pair[0].transition(pair[1]), Ok(pair[1]));
        }
        for from in [Reset, Init, ReadyToReceive, ReadyToSend, Error] {
            assert_eq!(from.transition(Error), Ok(Error));
            assert_eq!(from.transition(Reset), Ok(Reset));
        }
        for (from, to) in
            [(Reset, ReadyToReceive), (Reset, ReadyToSend), (Init, ReadyToSend), (ReadyToSend, Init), (Error, Init)]
        {
            let err = from.transition(to).unwrap_err();
            assert!(err.contains(&format!("{from:?} to {to:?}")), "{err}");
        }
    }

    #[test]
    fn access_flags_grant_only_what_is_needed() {
        let segment = Access::Segment.flags().0;
        let bounce = Access::Bounce.flags().0;
        assert_eq!(bounce, ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0);
        assert_eq!(segment & ibv_access_flags::IBV_ACCESS_MW_BIND.0, 0);
        for flag in [
            ibv_access_flags::IBV_ACCESS_REMOTE_READ,
            ibv_access_flags::IBV_ACCESS_REMOTE_WRITE,
            ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC,
        ] {
            assert_ne!(segment & flag.0, 0);
            assert_eq!(bounce & flag.0, 0);
        }
    }

    fn request(op: RemoteOp) -> WorkRequest {
        WorkRequest { id: 77, op, local_addr: 0x1000, lkey: 5, len: 8, remote_addr: 0x2000_0008, rkey: 9 }
    }

    #[test]
    fn work_requests_carry_every_field() {
        let mut sge = ibv_sge { addr: 0, length: 0, lkey: 0 };
        for (op, opcode) in [
            (RemoteOp::Read, ibv_wr_opcode::IBV_WR_RDMA_READ),
            (RemoteOp::Write, ibv_wr_opcode::IBV_WR_RDMA_WRITE),
            (RemoteOp::FetchAdd { add: 3 }, ibv_wr_opcode::IBV_WR_ATOMIC_FETCH_AND_ADD),
            (RemoteOp::CompareSwap { compare: 4, swap: 6 }, ibv_wr_opcode::IBV_WR_ATOMIC_CMP_AND_SWP),
        ] {
            let wr = request(op).build(&mut sge);
            assert_eq!(wr.opcode, opcode);
            assert_eq!(wr.wr_id, 77);
            assert_eq!(wr.num_sge, 1);
            assert_eq!(wr.send_flags, ibv_send_flags::IBV_SEND_SIGNALED.0);
            assert!(wr.next.is_null());
            assert_eq!(wr.sg_list, &mut sge as *mut ibv_sge);
            assert_eq!((sge.addr, sge.length, sge.lkey), (0x1000, 8, 5));
            // SAFETY: reading the union member that `build` wrote for `op`.
            unsafe {
                match op {
                    RemoteOp::Read | RemoteOp::Write => {
                        assert_eq!((wr.wr.rdma.remote_addr, wr.wr.rdma.rkey), (0x2000_0008, 9));
                    }
                    RemoteOp::FetchAdd { add } => {
                        assert_eq!((wr.wr.atomic.remote_addr, wr.wr.atomic.rkey), (0x2000_0008, 9));
                        assert_eq!(wr.wr.atomic.compare_add, add);
                    }
                    RemoteOp::CompareSwap { compare, swap } => {
                        assert_eq!((wr.wr.atomic.compare_add, wr.wr.atomic.swap), (compare, swap));
                    }
                }
            }
        }
    }

    #[test]
    fn atomics_are_validated() {
        assert!(request(RemoteOp::FetchAdd { add: 1 }).validate().is_ok());
        let err = WorkRequest { len: 4, ..request(RemoteOp::FetchAdd { add: 1 }) }.validate().unwrap_err();
        assert!(err.contains("8 bytes, not 4"), "{err}");
        let err = WorkRequest { remote_addr: 0x2001, ..request(RemoteOp::CompareSwap { compare: 0, swap: 1 }) }
            .validate()
            .unwrap_err();
        assert!(err.contains("aligned"), "{err}");
        assert!(WorkRequest { len: 1 << 20, ..request(RemoteOp::Read) }.validate().is_ok());
    }

    #[test]
    fn endpoints_round_trip_and_reject_garbage() {
        let endpoint = Endpoint {
            lid: 12,
            gid: [0xfe; 16],
            psn: 0x00ab_cdef,
            qpns: vec![0, 1234, 5678],
            regions: vec![RemoteRegion { addr: 0x7f00_0000_0000, rkey: 42, len: 1 << 30 }],
        };
        let bytes = endpoint.encode();
        assert_eq!(Endpoint::decode(&bytes), Ok(endpoint));
        for cut in 0..bytes.len() {
            assert!(Endpoint::decode(&bytes[..cut]).is_err(), "accepted a cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Endpoint::decode(&longer).unwrap_err().contains("after its end"));
        let mut huge = bytes[..22].to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(Endpoint::decode(&huge).unwrap_err().contains("more than"));
    }

    #[test]
    fn device_listing_does_not_fail_without_devices() {
        // On a host without RDMA this is an empty list, never an error or a
        // crash; on one with devices it names them.
        let names = device_names().unwrap();
        assert!(names.iter().all(|n| !n.is_empty()));
    }

    #[test]
    fn endpoints_travel_in_descriptors() {
        use crate::transport::hosts::Descriptor;
        use crate::transport::rendezvous::Hello;

        let endpoint = Endpoint {
            lid: 7,
            gid: [0x11; 16],
            psn: 99,
            qpns: vec![0, 17],
            regions: vec![RemoteRegion { addr: 0x7f00_0000_0000, rkey: 5, len: 1 << 20 }],
        };
        let hello = Hello {
            protocol: 1,
            rank: 1,
            size: 2,
            mesh: "2x1x1".into(),
            page_size: 4096,
            window_size: 1 << 30,
            segment_len: 1 << 20,
            pid: 1,
        };
        let descriptor = Descriptor {
            hello,
            host: "host-1".into(),
            tcp: None,
            rdma: Some(endpoint.encode()),
            window_base: None,
            group: None,
            collectives: None,
        };
        let back = Descriptor::decode(&descriptor.encode(), NodeId(1)).unwrap();
        assert_eq!(Endpoint::decode(back.rdma.as_deref().unwrap()), Ok(endpoint));

        let garbage = Descriptor { rdma: Some(vec![0xff; 5]), ..descriptor };
        let back = Descriptor::decode(&garbage.encode(), NodeId(1)).unwrap();
        let err = Endpoint::decode(back.rdma.as_deref().unwrap()).unwrap_err();
        assert!(err.contains("needs 16 more at 2"), "{err}");
    }

    #[test]
    fn transport_without_device_is_an_error() {
        if !device_names().unwrap().is_empty() {
            return;
        }
        let segment = Arc::new(Segment::create(NodeId(3), 1 << 16).unwrap());
        let err = RdmaTransport::for_segment(NodeId(3), segment, 4).unwrap_err().to_string();
        assert!(err.contains("node 3"), "{err}");
        assert!(err.contains("no RDMA device"), "{err}");
    }
}
