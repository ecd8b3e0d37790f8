//! RDMA READ, WRITE and atomics between two queue pairs of this host's first
//! RDMA device, connected to each other through the device.
//!
//! This test has its own `main` so that, on a host without an RDMA device,
//! it prints that it did not run and why instead of passing silently.

use std::process::ExitCode;

use meshmem::transport::rdma::{device_names, Device, RdmaTransport};
use meshmem::transport::shm::Segment;
use meshmem::transport::Transport;
use meshmem::NodeId;

const SEGMENT: u64 = 1 << 20;

fn loopback_pair() -> meshmem::Result<(RdmaTransport, RdmaTransport, Segment, Segment)> {
    let (a, b) = (NodeId(0), NodeId(1));
    let seg_a = Segment::create(a, SEGMENT)?;
    let seg_b = Segment::create(b, SEGMENT)?;
    // SAFETY: both segments outlive the transports (returned after them and
    // dropped last by the caller).
    let mut ta = unsafe { RdmaTransport::new(Device::open(a, None)?, seg_a.as_ptr(), SEGMENT as usize, 2, &[b])? };
    // SAFETY: as above.
    let mut tb = unsafe { RdmaTransport::new(Device::open(b, None)?, seg_b.as_ptr(), SEGMENT as usize, 2, &[a])? };
    let (ea, eb) = (ta.endpoint(), tb.endpoint());
    ta.connect(b, &eb)?;
    tb.connect(a, &ea)?;
    Ok((ta, tb, seg_a, seg_b))
}

fn run() -> Result<(), String> {
    let (a, _b, _seg_a, _seg_b) = loopback_pair().map_err(|e| e.to_string())?;
    let node = NodeId(1);
    a.write(node, 4096, b"over rdma").map_err(|e| e.to_string())?;
    let mut back = [0u8; 9];
    a.read(node, 4096, &mut back).map_err(|e| e.to_string())?;
    if &back != b"over rdma" {
        return Err(format!("read back {back:?}"));
    }
    let previous = a.fetch_add_u64(node, 64, 5).map_err(|e| e.to_string())?;
    let swapped = a.compare_exchange_u64(node, 64, 5, 9).map_err(|e| e.to_string())?;
    if (previous, swapped) != (0, 5) {
        return Err(format!("atomics returned {previous} and {swapped}, expected 0 and 5"));
    }
    match a.read(node, SEGMENT - 4, &mut [0u8; 8]) {
        Err(meshmem::Error::OutOfBounds { .. }) => Ok(()),
        other => Err(format!("an out-of-bounds read returned {other:?}")),
    }
}

fn main() -> ExitCode {
    let devices = match device_names() {
        Ok(devices) => devices,
        Err(e) => {
            println!("rdma loopback: FAILED listing RDMA devices: {e}");
            println!("0 passed, 1 failed");
            return ExitCode::FAILURE;
        }
    };
    if devices.is_empty() {
        println!("rdma loopback: NOT RUN: this host has no RDMA device (ibv_get_device_list found none); run it on a host with an InfiniBand or RoCE adapter, or a soft-RoCE device (`rdma link add rxe0 type rxe netdev IFACE`)");
        println!("0 passed, 0 failed, 1 skipped");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(()) => {
            println!("rdma loopback on {}: ok", devices[0]);
            println!("1 passed, 0 failed");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("rdma loopback on {}: FAILED: {e}", devices[0]);
            println!("0 passed, 1 failed");
            ExitCode::FAILURE
        }
    }
}
