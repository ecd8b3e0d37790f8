//! Catching SIGINT and SIGTERM while a launch runs, with a self-pipe.
//!
//! The handler writes the signal number as one byte into a non-blocking
//! pipe, which is all it does, so it stays async-signal-safe. The supervisor
//! polls the read end together with its tick, so a signal wakes it at once
//! whichever thread the kernel delivered it to. The previous dispositions are
//! restored when the [`SignalPipe`] drops, so a program that links the crate
//! gets its own handling back after `launch` returns. A signal that was
//! ignored when the launch began (as `nohup` or a background job of a
//! non-interactive shell arranges for SIGINT) stays ignored.
//!
//! Dispositions are process-wide, so only one launch may run at a time in a
//! process; a second concurrent one is rejected.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::pipe2;

use crate::error::{Error, Result};

/// The signals that stop a launch and are forwarded to the nodes.
pub(super) const STOP_SIGNALS: [Signal; 2] = [Signal::SIGINT, Signal::SIGTERM];

/// Write end of the current pipe, or -1 when no launch runs.
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);

/// Pid of the launcher. A forked node runs the handler until it calls
/// `exec`, and must not report its signals as the launcher's.
static LAUNCHER_PID: AtomicI32 = AtomicI32::new(0);

/// Set while a launch owns the handlers.
static ACTIVE: AtomicBool = AtomicBool::new(false);

extern "C" fn write_signal_to_pipe(signal: libc::c_int) {
    // SAFETY: getpid, write and errno access are async-signal-safe, and the
    // handler touches nothing else but two atomics. `byte` lives on this
    // stack for the whole write call. A failed or short write only loses a
    // wake-up when the pipe is already full of them.
    unsafe {
        let errno = *libc::__errno_location();
        if libc::getpid() == LAUNCHER_PID.load(Ordering::Relaxed) {
            let fd = PIPE_WRITE.load(Ordering::Relaxed);
            if fd >= 0 {
                let byte = signal as u8;
                libc::write(fd, (&byte as *const u8).cast(), 1);
            }
        }
        *libc::__errno_location() = errno;
    }
}

/// The handlers for [`STOP_SIGNALS`] and the pipe they write to, installed
/// for the lifetime of the value.
pub(super) struct SignalPipe {
    read: OwnedFd,
    // Kept open for the handler, which reads its number from PIPE_WRITE.
    _write: OwnedFd,
    saved: Vec<(Signal, SigAction)>,
}

impl SignalPipe {
    /// Creates the pipe and installs the handlers.
    pub(super) fn install() -> Result<Self> {
        if ACTIVE.swap(true, Ordering::AcqRel) {
            return Err(Error::Launch {
                reason: "another launch is already running in this process; signal handlers are process-wide, so wait for it to return".into(),
                source: None,
            });
        }

        let (read, write) = match pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK) {
            Ok(pair) => pair,
            Err(e) => {
                ACTIVE.store(false, Ordering::Release);
                return Err(Error::os("creating the signal pipe with pipe2", e));
            }
        };
        LAUNCHER_PID.store(std::process::id() as i32, Ordering::Relaxed);
        // SeqCst because the handler, on any thread, must see the fd once it
        // is installed below; the cost is nothing at this rate.
        PIPE_WRITE.store(write.as_raw_fd(), Ordering::SeqCst);

        let mut pipe = SignalPipe { read, _write: write, saved: Vec::new() };
        let action = SigAction::new(
            SigHandler::Handler(write_signal_to_pipe),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for signal in STOP_SIGNALS {
            // SAFETY: the handler is async-signal-safe (see above), and the
            // old action is restored in Drop.
            let old = match unsafe { sigaction(signal, &action) } {
                Ok(old) => old,
                Err(e) => return Err(Error::os(format!("installing a handler for {signal}"), e)),
            };
            if old.handler() == SigHandler::SigIgn {
                // SAFETY: puts back the disposition that was there a moment ago.
                let _ = unsafe { sigaction(signal, &old) };
                continue;
            }
            pipe.saved.push((signal, old));
        }
        Ok(pipe)
    }

    /// Waits up to `timeout` for a caught signal and returns its number.
    pub(super) fn wait(&self, timeout: Duration) -> Option<i32> {
        let mut poll_fd = libc::pollfd { fd: self.read.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let millis = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `poll_fd` is one valid pollfd on this stack, and the count
        // passed is 1. EINTR returns early, which the caller treats as a tick.
        unsafe { libc::poll(&mut poll_fd, 1, millis) };

        let mut byte = 0u8;
        // SAFETY: reads at most one byte into `byte` from our own
        // non-blocking pipe; an empty pipe returns -1 with EAGAIN.
        let read = unsafe { libc::read(self.read.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) };
        (read == 1).then_some(byte as i32)
    }
}

impl Drop for SignalPipe {
    fn drop(&mut self) {
        for (signal, old) in self.saved.drain(..) {
            // SAFETY: restores the disposition saved by `install`. sigaction
            // fails only for an invalid signal or action, and these two were
            // accepted a moment ago, so the result is ignored.
            let _ = unsafe { sigaction(signal, &old) };
        }
        // The handler is gone before the fd is forgotten and closed, so it
        // never writes to a reused descriptor.
        PIPE_WRITE.store(-1, Ordering::Release);
        ACTIVE.store(false, Ordering::Release);
    }
}
