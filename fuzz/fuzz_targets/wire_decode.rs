//! Feeds arbitrary bytes to the TCP backend's frame decoder: it must return
//! a frame or an error, never panic, and every frame it returns must encode
//! back to bytes that decode to the same frame.
//!
//! `cargo fuzz run wire_decode` (from this folder, with cargo-fuzz).
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshmem_core::transport::wire::{Frame, Header, HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Some(head) = data.first_chunk::<HEADER_LEN>() {
        let _ = Header::decode(head);
    }
    if let Ok((frame, used)) = Frame::decode(data) {
        assert!(used <= data.len());
        let mut out = Vec::new();
        frame.encode(1, &mut out);
        let (again, len) = Frame::decode(&out).expect("an encoded frame decodes");
        assert_eq!(again, frame);
        assert_eq!(len, out.len());
    }
});
