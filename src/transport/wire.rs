//! The binary wire format of the TCP backend.
//!
//! Every frame is a 16-byte header followed by a body of `len` bytes:
//!
//! ```text
//! 0..4    len      u32 LE   bytes of body after the header, at most MAX_BODY
//! 4       version  u8       VERSION; anything else is rejected
//! 5       opcode   u8       see `Opcode`
//! 6..8    flags    u16 LE   reserved, must be 0
//! 8..16   id       u64 LE   request id; a response carries its request's id
//! ```
//!
//! Bodies, all integers little-endian:
//!
//! | opcode | direction | body |
//! |---|---|---|
//! | `Hello` | client → server | client node u16, server node u16, nonce \[32\] |
//! | `Challenge` | server → client | server node u16, nonce \[32\], mac \[32\] |
//! | `Auth` | client → server | mac \[32\] |
//! | `Welcome` | server → client | count u32, count × segment length u64 |
//! | `Read` | request | segment u32, offset u64, len u32 |
//! | `Write` | request | segment u32, offset u64, payload |
//! | `FetchAdd` | request | segment u32, offset u64, value u64 |
//! | `CompareExchange` | request | segment u32, offset u64, current u64, new u64 |
//! | `Done` | response | value u64 (the previous word; 0 for a write) |
//! | `Data` | response | payload (the bytes a read requested) |
//! | `Failed` | response | code u16, 0 u16, segment u32, offset u64, len u64, limit u64 |
//!
//! The server responds to the requests of one connection in the order they arrive,
//! which is what lets a client pipeline them and match responses by position.
//! Decoding checks the version, the opcode, the flags, the length against
//! `MAX_BODY` and against what the opcode needs, and never panics: every
//! input maps to a frame or a [`WireError`].

use std::fmt;

/// Version of this format, sent in every header.
pub const VERSION: u8 = 1;

/// Size of the fixed header.
pub const HEADER_LEN: usize = 16;

/// Largest payload of one `Read`, `Write` or `Data` frame. Larger transfers
/// are split by the client. 4 MiB stays under Linux's default maximum
/// receive buffer (6 MiB, the third value of `tcp_rmem`) while making the
/// per-frame cost small for bulk copies.
pub const MAX_PAYLOAD: u32 = 4 << 20;

/// Largest body of any frame: a `Write` of `MAX_PAYLOAD` bytes and its
/// 12-byte prefix, rounded up.
pub const MAX_BODY: u32 = MAX_PAYLOAD + 64;

/// Most segments one `Welcome` may list.
pub const MAX_SEGMENTS: u32 = 1024;

/// Size of a handshake nonce and of an HMAC-SHA256 tag.
pub const NONCE_LEN: usize = 32;

/// Fixed body lengths; `Write`'s is its prefix before the payload.
const HELLO_BODY: u32 = 2 + 2 + NONCE_LEN as u32;
const CHALLENGE_BODY: u32 = 2 + 2 * NONCE_LEN as u32;
const AUTH_BODY: u32 = NONCE_LEN as u32;
const READ_BODY: u32 = 4 + 8 + 4;
pub(crate) const WRITE_PREFIX: u32 = 4 + 8;
const FETCH_ADD_BODY: u32 = 4 + 8 + 8;
const COMPARE_EXCHANGE_BODY: u32 = 4 + 8 + 8 + 8;
const DONE_BODY: u32 = 8;
const FAILED_BODY: u32 = 2 + 2 + 4 + 8 + 8 + 8;

/// The kind of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    Hello = 0x01,
    Challenge = 0x02,
    Auth = 0x03,
    Welcome = 0x04,
    Read = 0x10,
    Write = 0x11,
    FetchAdd = 0x12,
    CompareExchange = 0x13,
    Done = 0x20,
    Data = 0x21,
    Failed = 0x22,
}

impl TryFrom<u8> for Opcode {
    type Error = WireError;

    fn try_from(value: u8) -> Result<Self, WireError> {
        Ok(match value {
            0x01 => Opcode::Hello,
            0x02 => Opcode::Challenge,
            0x03 => Opcode::Auth,
            0x04 => Opcode::Welcome,
            0x10 => Opcode::Read,
            0x11 => Opcode::Write,
            0x12 => Opcode::FetchAdd,
            0x13 => Opcode::CompareExchange,
            0x20 => Opcode::Done,
            0x21 => Opcode::Data,
            0x22 => Opcode::Failed,
            other => return Err(WireError::UnknownOpcode(other)),
        })
    }
}

impl Opcode {
    /// Returns the body length this opcode needs: exact, or a minimum for frames
    /// with a payload or a list.
    fn body_len(self) -> BodyLen {
        match self {
            Opcode::Hello => BodyLen::Exact(HELLO_BODY),
            Opcode::Challenge => BodyLen::Exact(CHALLENGE_BODY),
            Opcode::Auth => BodyLen::Exact(AUTH_BODY),
            Opcode::Welcome => BodyLen::AtLeast(4),
            Opcode::Read => BodyLen::Exact(READ_BODY),
            Opcode::Write => BodyLen::AtLeast(WRITE_PREFIX),
            Opcode::FetchAdd => BodyLen::Exact(FETCH_ADD_BODY),
            Opcode::CompareExchange => BodyLen::Exact(COMPARE_EXCHANGE_BODY),
            Opcode::Done => BodyLen::Exact(DONE_BODY),
            Opcode::Data => BodyLen::AtLeast(0),
            Opcode::Failed => BodyLen::Exact(FAILED_BODY),
        }
    }

    /// Returns whether a client may send this opcode after the handshake.
    pub fn is_request(self) -> bool {
        matches!(self, Opcode::Read | Opcode::Write | Opcode::FetchAdd | Opcode::CompareExchange)
    }
}

enum BodyLen {
    Exact(u32),
    AtLeast(u32),
}

/// Why a frame could not be decoded. After any of these the byte stream is
/// out of step, so the receiver sends `Failed` (where it can) and closes the
/// connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    #[error("the input ends after {have} bytes but the frame needs {need}")]
    Truncated { have: usize, need: usize },
    #[error("protocol version {0} is not supported; this build speaks version {VERSION}; run the same meshmem release on every host")]
    UnsupportedVersion(u8),
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    #[error("reserved flags are {0:#06x}, expected 0")]
    Flags(u16),
    #[error("frame body of {len} bytes exceeds the maximum of {max} bytes")]
    TooLong { len: u32, max: u32 },
    #[error("{opcode:?} frame has a body of {len} bytes: {reason}")]
    BadLength { opcode: Opcode, len: u32, reason: String },
    #[error("unknown failure code {0}")]
    UnknownFailure(u16),
    #[error("{opcode:?} frame is not valid here: {reason}")]
    Unexpected { opcode: Opcode, reason: &'static str },
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub len: u32,
    pub opcode: Opcode,
    pub id: u64,
}

impl Header {
    /// Decodes and checks a header: version, opcode, flags, and `len`
    /// against both `MAX_BODY` and what the opcode needs.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Header, WireError> {
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if bytes[4] != VERSION {
            return Err(WireError::UnsupportedVersion(bytes[4]));
        }
        let opcode = Opcode::try_from(bytes[5])?;
        let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
        if flags != 0 {
            return Err(WireError::Flags(flags));
        }
        if len > MAX_BODY {
            return Err(WireError::TooLong { len, max: MAX_BODY });
        }
        let id = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or([0; 8]));
        let fits = match opcode.body_len() {
            BodyLen::Exact(n) => len == n,
            BodyLen::AtLeast(n) => len >= n,
        };
        if !fits {
            let reason = match opcode.body_len() {
                BodyLen::Exact(n) => format!("expected exactly {n}"),
                BodyLen::AtLeast(n) => format!("expected at least {n}"),
            };
            return Err(WireError::BadLength { opcode, len, reason });
        }
        if matches!(opcode, Opcode::Write | Opcode::Data) && len - fixed_len(opcode) > MAX_PAYLOAD {
            return Err(WireError::TooLong { len, max: MAX_PAYLOAD + fixed_len(opcode) });
        }
        Ok(Header { len, opcode, id })
    }

    /// Encodes this header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&self.len.to_le_bytes());
        out[4] = VERSION;
        out[5] = self.opcode as u8;
        out[8..16].copy_from_slice(&self.id.to_le_bytes());
        out
    }

    /// Bytes of the body before any payload: all of it for fixed frames.
    pub fn fixed_len(&self) -> u32 {
        match self.opcode {
            Opcode::Write | Opcode::Data | Opcode::Welcome => fixed_len(self.opcode),
            _ => self.len,
        }
    }
}

fn fixed_len(opcode: Opcode) -> u32 {
    match opcode {
        Opcode::Write => WRITE_PREFIX,
        Opcode::Welcome => 4,
        _ => 0,
    }
}

/// The reason a server rejected a request, as carried by a `Failed` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FailureCode {
    /// `offset + len` is beyond the segment; `limit` is its length.
    OutOfBounds = 1,
    /// An atomic's offset is not 8-byte aligned.
    Unaligned = 2,
    /// The segment index is not one the node registered; `limit` is the count.
    NoSuchSegment = 3,
    /// The peer did not prove knowledge of the group's secret.
    AuthFailed = 4,
    /// The frame could not be decoded; the connection is closed.
    Malformed = 5,
    /// The frame's version is not this build's; `limit` is the server's.
    UnsupportedVersion = 6,
    /// The opcode is unknown or not valid at this point of the exchange.
    UnknownOpcode = 7,
    /// The length field exceeds the maximum; `limit` is the maximum.
    TooLong = 8,
    /// The client asked for another node than the one serving this address.
    WrongNode = 9,
}

impl TryFrom<u16> for FailureCode {
    type Error = WireError;

    fn try_from(value: u16) -> Result<Self, WireError> {
        Ok(match value {
            1 => FailureCode::OutOfBounds,
            2 => FailureCode::Unaligned,
            3 => FailureCode::NoSuchSegment,
            4 => FailureCode::AuthFailed,
            5 => FailureCode::Malformed,
            6 => FailureCode::UnsupportedVersion,
            7 => FailureCode::UnknownOpcode,
            8 => FailureCode::TooLong,
            9 => FailureCode::WrongNode,
            other => return Err(WireError::UnknownFailure(other)),
        })
    }
}

impl fmt::Display for FailureCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailureCode::OutOfBounds => "out of bounds",
            FailureCode::Unaligned => "unaligned atomic",
            FailureCode::NoSuchSegment => "no such segment",
            FailureCode::AuthFailed => "authentication failed",
            FailureCode::Malformed => "malformed frame",
            FailureCode::UnsupportedVersion => "unsupported protocol version",
            FailureCode::UnknownOpcode => "unknown or unexpected opcode",
            FailureCode::TooLong => "frame too long",
            FailureCode::WrongNode => "wrong node",
        })
    }
}

impl FailureCode {
    /// Returns the code a server sends back for a frame it could not decode.
    pub fn for_wire_error(error: &WireError) -> FailureCode {
        match error {
            WireError::UnsupportedVersion(_) => FailureCode::UnsupportedVersion,
            WireError::UnknownOpcode(_) | WireError::Unexpected { .. } => FailureCode::UnknownOpcode,
            WireError::TooLong { .. } => FailureCode::TooLong,
            _ => FailureCode::Malformed,
        }
    }
}

/// The body of a `Failed` frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    pub code: FailureCode,
    pub segment: u32,
    pub offset: u64,
    pub len: u64,
    pub limit: u64,
}

impl Failure {
    pub fn new(code: FailureCode) -> Failure {
        Failure { code, segment: 0, offset: 0, len: 0, limit: 0 }
    }
}

/// One decoded frame. Payloads borrow from the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Hello { client: u16, server: u16, nonce: [u8; NONCE_LEN] },
    Challenge { server: u16, nonce: [u8; NONCE_LEN], mac: [u8; NONCE_LEN] },
    Auth { mac: [u8; NONCE_LEN] },
    Welcome { segments: Vec<u64> },
    Read { segment: u32, offset: u64, len: u32 },
    Write { segment: u32, offset: u64, data: &'a [u8] },
    FetchAdd { segment: u32, offset: u64, value: u64 },
    CompareExchange { segment: u32, offset: u64, current: u64, new: u64 },
    Done { value: u64 },
    Data { data: &'a [u8] },
    Failed(Failure),
}

/// A little-endian reader over a body whose length the header has checked.
/// Reads past the end yield zeros instead of panicking; `Header::decode`
/// makes that unreachable for well-formed lengths.
struct Fields<'a> {
    bytes: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.bytes.len());
        out[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        out
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }

    fn rest(self) -> &'a [u8] {
        self.bytes
    }
}

impl<'a> Frame<'a> {
    pub fn opcode(&self) -> Opcode {
        match self {
            Frame::Hello { .. } => Opcode::Hello,
            Frame::Challenge { .. } => Opcode::Challenge,
            Frame::Auth { .. } => Opcode::Auth,
            Frame::Welcome { .. } => Opcode::Welcome,
            Frame::Read { .. } => Opcode::Read,
            Frame::Write { .. } => Opcode::Write,
            Frame::FetchAdd { .. } => Opcode::FetchAdd,
            Frame::CompareExchange { .. } => Opcode::CompareExchange,
            Frame::Done { .. } => Opcode::Done,
            Frame::Data { .. } => Opcode::Data,
            Frame::Failed(_) => Opcode::Failed,
        }
    }

    /// Decodes the body of a frame whose header is `header`. `body` must be
    /// exactly `header.len` bytes.
    pub fn decode_body(header: &Header, body: &'a [u8]) -> Result<Frame<'a>, WireError> {
        if body.len() != header.len as usize {
            return Err(WireError::Truncated { have: body.len(), need: header.len as usize });
        }
        let mut f = Fields { bytes: body };
        Ok(match header.opcode {
            Opcode::Hello => Frame::Hello { client: f.u16(), server: f.u16(), nonce: f.take() },
            Opcode::Challenge => Frame::Challenge { server: f.u16(), nonce: f.take(), mac: f.take() },
            Opcode::Auth => Frame::Auth { mac: f.take() },
            Opcode::Welcome => {
                let count = f.u32();
                let rest = f.rest();
                if count > MAX_SEGMENTS || rest.len() as u64 != count as u64 * 8 {
                    return Err(WireError::BadLength {
                        opcode: Opcode::Welcome,
                        len: header.len,
                        reason: format!(
                            "{count} segments need {} bytes (at most {MAX_SEGMENTS} segments)",
                            4 + count as u64 * 8
                        ),
                    });
                }
                let segments =
                    rest.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
                Frame::Welcome { segments }
            }
            Opcode::Read => {
                let (segment, offset, len) = (f.u32(), f.u64(), f.u32());
                if len > MAX_PAYLOAD {
                    return Err(WireError::TooLong { len, max: MAX_PAYLOAD });
                }
                Frame::Read { segment, offset, len }
            }
            Opcode::Write => Frame::Write { segment: f.u32(), offset: f.u64(), data: f.rest() },
            Opcode::FetchAdd => Frame::FetchAdd { segment: f.u32(), offset: f.u64(), value: f.u64() },
            Opcode::CompareExchange => {
                Frame::CompareExchange { segment: f.u32(), offset: f.u64(), current: f.u64(), new: f.u64() }
            }
            Opcode::Done => Frame::Done { value: f.u64() },
            Opcode::Data => Frame::Data { data: f.rest() },
            Opcode::Failed => {
                let code = FailureCode::try_from(f.u16())?;
                if f.u16() != 0 {
                    return Err(WireError::BadLength {
                        opcode: Opcode::Failed,
                        len: header.len,
                        reason: "its reserved field is not 0".into(),
                    });
                }
                Frame::Failed(Failure { code, segment: f.u32(), offset: f.u64(), len: f.u64(), limit: f.u64() })
            }
        })
    }

    /// Decodes one whole frame from the front of `input` and returns it with
    /// the number of bytes it took.
    pub fn decode(input: &'a [u8]) -> Result<(Frame<'a>, usize), WireError> {
        let Some(head) = input.first_chunk::<HEADER_LEN>() else {
            return Err(WireError::Truncated { have: input.len(), need: HEADER_LEN });
        };
        let header = Header::decode(head)?;
        let end = HEADER_LEN + header.len as usize;
        let Some(body) = input.get(HEADER_LEN..end) else {
            return Err(WireError::Truncated { have: input.len(), need: end });
        };
        Ok((Frame::decode_body(&header, body)?, end))
    }

    /// Returns the header of this frame with request id `id`.
    pub fn header(&self, id: u64) -> Header {
        let len = match self {
            Frame::Welcome { segments } => 4 + segments.len() as u32 * 8,
            Frame::Write { data, .. } => WRITE_PREFIX + data.len() as u32,
            Frame::Data { data } => data.len() as u32,
            other => match other.opcode().body_len() {
                BodyLen::Exact(n) | BodyLen::AtLeast(n) => n,
            },
        };
        Header { len, opcode: self.opcode(), id }
    }

    /// Appends the header and the fixed part of the body to `out`. The
    /// payload of `Write` and `Data` is left out, so callers can send it
    /// from where it lies; `encode` appends it too.
    pub fn encode_head(&self, id: u64, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header(id).encode());
        match self {
            Frame::Hello { client, server, nonce } => {
                out.extend_from_slice(&client.to_le_bytes());
                out.extend_from_slice(&server.to_le_bytes());
                out.extend_from_slice(nonce);
            }
            Frame::Challenge { server, nonce, mac } => {
                out.extend_from_slice(&server.to_le_bytes());
                out.extend_from_slice(nonce);
                out.extend_from_slice(mac);
            }
            Frame::Auth { mac } => out.extend_from_slice(mac),
            Frame::Welcome { segments } => {
                out.extend_from_slice(&(segments.len() as u32).to_le_bytes());
                for len in segments {
                    out.extend_from_slice(&len.to_le_bytes());
                }
            }
            Frame::Read { segment, offset, len } => {
                out.extend_from_slice(&segment.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&len.to_le_bytes());
            }
            Frame::Write { segment, offset, .. } => {
                out.extend_from_slice(&segment.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
            }
            Frame::FetchAdd { segment, offset, value } => {
                out.extend_from_slice(&segment.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&value.to_le_bytes());
            }
            Frame::CompareExchange { segment, offset, current, new } => {
                out.extend_from_slice(&segment.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                out.extend_from_slice(&current.to_le_bytes());
                out.extend_from_slice(&new.to_le_bytes());
            }
            Frame::Done { value } => out.extend_from_slice(&value.to_le_bytes()),
            Frame::Data { .. } => {}
            Frame::Failed(failure) => {
                out.extend_from_slice(&(failure.code as u16).to_le_bytes());
                out.extend_from_slice(&[0, 0]);
                out.extend_from_slice(&failure.segment.to_le_bytes());
                out.extend_from_slice(&failure.offset.to_le_bytes());
                out.extend_from_slice(&failure.len.to_le_bytes());
                out.extend_from_slice(&failure.limit.to_le_bytes());
            }
        }
    }

    /// Appends the whole frame to `out`. Payloads longer than `MAX_PAYLOAD`
    /// produce a frame that `decode` rejects; senders split them first.
    pub fn encode(&self, id: u64, out: &mut Vec<u8>) {
        self.encode_head(id, out);
        if let Frame::Write { data, .. } | Frame::Data { data } = self {
            out.extend_from_slice(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Frame<'static>> {
        vec![
            Frame::Hello { client: 3, server: 7, nonce: [9; NONCE_LEN] },
            Frame::Challenge { server: 7, nonce: [1; NONCE_LEN], mac: [2; NONCE_LEN] },
            Frame::Auth { mac: [5; NONCE_LEN] },
            Frame::Welcome { segments: vec![4096, 1 << 30] },
            Frame::Welcome { segments: vec![] },
            Frame::Read { segment: 0, offset: 0x1000, len: 8 },
            Frame::Write { segment: 1, offset: 16, data: b"hello" },
            Frame::Write { segment: 1, offset: 16, data: b"" },
            Frame::FetchAdd { segment: 0, offset: 8, value: u64::MAX },
            Frame::CompareExchange { segment: 0, offset: 8, current: 1, new: 2 },
            Frame::Done { value: 42 },
            Frame::Data { data: b"bytes" },
            Frame::Failed(Failure { code: FailureCode::OutOfBounds, segment: 0, offset: 9, len: 8, limit: 12 }),
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for (id, frame) in samples().into_iter().enumerate() {
            let mut out = Vec::new();
            frame.encode(id as u64, &mut out);
            let (back, used) = Frame::decode(&out).unwrap();
            assert_eq!(back, frame);
            assert_eq!(used, out.len());
            let head: &[u8; HEADER_LEN] = out.first_chunk().unwrap();
            assert_eq!(Header::decode(head).unwrap().id, id as u64);
        }
    }

    #[test]
    fn every_truncation_is_reported() {
        for frame in samples() {
            let mut out = Vec::new();
            frame.encode(1, &mut out);
            for cut in 0..out.len() {
                let err = Frame::decode(&out[..cut]).unwrap_err();
                assert!(matches!(err, WireError::Truncated { .. }), "{frame:?} cut at {cut}: {err}");
            }
        }
    }

    fn header_bytes(len: u32, version: u8, opcode: u8, flags: u16) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&len.to_le_bytes());
        out[4] = version;
        out[5] = opcode;
        out[6..8].copy_from_slice(&flags.to_le_bytes());
        out
    }

    #[test]
    fn bad_headers_are_rejected() {
        assert_eq!(Header::decode(&header_bytes(16, 2, 0x10, 0)), Err(WireError::UnsupportedVersion(2)));
        assert_eq!(Header::decode(&header_bytes(16, VERSION, 0x7f, 0)), Err(WireError::UnknownOpcode(0x7f)));
        assert_eq!(Header::decode(&header_bytes(16, VERSION, 0x10, 1)), Err(WireError::Flags(1)));
        assert_eq!(
            Header::decode(&header_bytes(u32::MAX, VERSION, 0x11, 0)),
            Err(WireError::TooLong { len: u32::MAX, max: MAX_BODY })
        );
        assert!(matches!(
            Header::decode(&header_bytes(15, VERSION, 0x10, 0)),
            Err(WireError::BadLength { opcode: Opcode::Read, len: 15, .. })
        ));
        assert!(matches!(Header::decode(&header_bytes(MAX_BODY, VERSION, 0x21, 0)), Err(WireError::TooLong { .. })));
    }

    #[test]
    fn bad_bodies_are_rejected() {
        let mut out = Vec::new();
        Frame::Read { segment: 0, offset: 0, len: MAX_PAYLOAD + 1 }.encode(0, &mut out);
        assert!(matches!(Frame::decode(&out), Err(WireError::TooLong { .. })));

        out.clear();
        Frame::Welcome { segments: vec![1, 2] }.encode(0, &mut out);
        out[16] = 3;
        assert!(matches!(Frame::decode(&out), Err(WireError::BadLength { .. })));

        out.clear();
        Frame::Failed(Failure::new(FailureCode::Malformed)).encode(0, &mut out);
        out[16] = 0xee;
        assert_eq!(Frame::decode(&out), Err(WireError::UnknownFailure(0xee)));
    }

    #[test]
    fn foreign_codes_convert_without_panicking() {
        for byte in 0..=u8::MAX {
            if let Ok(opcode) = Opcode::try_from(byte) {
                assert_eq!(opcode as u8, byte);
            }
        }
        for code in 0..=u16::MAX {
            if let Ok(failure) = FailureCode::try_from(code) {
                assert_eq!(failure as u16, code);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn decode_never_panics(input in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Frame::decode(&input);
        }

        #[test]
        fn decode_never_panics_on_valid_headers(
            opcode in prop::sample::select(vec![0x01u8, 0x02, 0x03, 0x04, 0x10, 0x11, 0x12, 0x13, 0x20, 0x21, 0x22]),
            len in 0u32..128,
            body in proptest::collection::vec(any::<u8>(), 0..160),
        ) {
            let mut input = header_bytes(len, VERSION, opcode, 0).to_vec();
            input.extend_from_slice(&body);
            if let Ok((frame, used)) = Frame::decode(&input) {
                prop_assert_eq!(used, HEADER_LEN + len as usize);
                let mut again = Vec::new();
                frame.encode(0, &mut again);
                prop_assert_eq!(&again[..], &input[..used]);
            }
        }

        #[test]
        fn requests_round_trip(segment: u32, offset: u64, value: u64, data in proptest::collection::vec(any::<u8>(), 0..64)) {
            for frame in [
                Frame::Read { segment, offset, len: data.len() as u32 },
                Frame::Write { segment, offset, data: &data },
                Frame::FetchAdd { segment, offset, value },
                Frame::CompareExchange { segment, offset, current: value, new: !value },
            ] {
                let mut out = Vec::new();
                frame.encode(value, &mut out);
                prop_assert_eq!(Frame::decode(&out).unwrap(), (frame, out.len()));
            }
        }
    }
}
