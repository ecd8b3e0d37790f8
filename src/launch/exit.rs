//! Node exit statuses in the words a user expects: an exit code, or the name
//! of the signal that killed the node.

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nix::sys::signal::Signal;

/// The end of a node process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeExit {
    /// The process called `exit` with this code.
    Code(i32),
    /// A signal killed the process.
    Signal { signal: i32, core_dumped: bool },
    /// Something else in this process reaped the node first (a `waitpid(-1)`
    /// elsewhere), so its status is lost. Counts as a failure.
    Lost,
}

impl NodeExit {
    /// Checks whether the node exited with code 0.
    pub fn success(self) -> bool {
        self == NodeExit::Code(0)
    }

    /// Returns the shell's exit code for this end: the code itself, or 128
    /// plus the signal number, as `sh` reports `$?` for a killed command.
    pub fn shell_code(self) -> i32 {
        match self {
            NodeExit::Code(code) => code,
            NodeExit::Signal { signal, .. } => 128 + signal,
            NodeExit::Lost => 1,
        }
    }
}

impl From<ExitStatus> for NodeExit {
    fn from(status: ExitStatus) -> Self {
        if let Some(code) = status.code() {
            return NodeExit::Code(code);
        }
        match status.signal() {
            Some(signal) => NodeExit::Signal { signal, core_dumped: status.core_dumped() },
            // `wait` without WUNTRACED or WCONTINUED reports only exits and
            // deaths by signal, so a status that is neither means it was not
            // a real termination status.
            None => NodeExit::Lost,
        }
    }
}

impl fmt::Display for NodeExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            NodeExit::Code(code) => write!(f, "exited with code {code}"),
            NodeExit::Signal { signal, core_dumped } => {
                write!(f, "was killed by signal {}", signal_name(signal))?;
                if core_dumped {
                    write!(f, " (core dumped)")?;
                }
                Ok(())
            }
            NodeExit::Lost => write!(
                f,
                "ended, but its exit status was lost because another part of the launcher process reaped it"
            ),
        }
    }
}

/// Returns the name of a signal number, such as `SIGKILL`, or `signal 34`
/// for a number without a name (the real-time signals).
pub fn signal_name(signal: i32) -> String {
    match Signal::try_from(signal) {
        Ok(known) => known.as_str().to_string(),
        Err(_) => format!("signal {signal}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a wait status as the kernel encodes it: the exit code in bits
    /// 8 to 15, or the signal in bits 0 to 6 with bit 7 for a core dump.
    fn exited(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    fn killed(signal: i32, core: bool) -> ExitStatus {
        ExitStatus::from_raw(signal | if core { 0x80 } else { 0 })
    }

    #[test]
    fn exit_codes_are_read() {
        assert_eq!(NodeExit::from(exited(0)), NodeExit::Code(0));
        assert_eq!(NodeExit::from(exited(3)), NodeExit::Code(3));
        assert!(NodeExit::Code(0).success());
        assert!(!NodeExit::Code(3).success());
    }

    #[test]
    fn deaths_by_signal_are_read() {
        let exit = NodeExit::from(killed(libc::SIGKILL, false));
        assert_eq!(exit, NodeExit::Signal { signal: libc::SIGKILL, core_dumped: false });
        assert!(!exit.success());
        let core = NodeExit::from(killed(libc::SIGSEGV, true));
        assert_eq!(core, NodeExit::Signal { signal: libc::SIGSEGV, core_dumped: true });
    }

    #[test]
    fn exits_format_as_sentences() {
        assert_eq!(NodeExit::Code(3).to_string(), "exited with code 3");
        let kill = NodeExit::Signal { signal: libc::SIGKILL, core_dumped: false };
        assert_eq!(kill.to_string(), "was killed by signal SIGKILL");
        let segv = NodeExit::Signal { signal: libc::SIGSEGV, core_dumped: true };
        assert_eq!(segv.to_string(), "was killed by signal SIGSEGV (core dumped)");
        assert!(NodeExit::Lost.to_string().contains("lost"));
    }

    #[test]
    fn signals_are_named() {
        assert_eq!(signal_name(libc::SIGKILL), "SIGKILL");
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(libc::SIGINT), "SIGINT");
        assert_eq!(signal_name(libc::SIGRTMIN()), format!("signal {}", libc::SIGRTMIN()));
        assert_eq!(signal_name(0), "signal 0");
        assert_eq!(signal_name(-5), "signal -5");
    }

    #[test]
    fn shell_codes_follow_sh() {
        assert_eq!(NodeExit::Code(3).shell_code(), 3);
        let term = NodeExit::Signal { signal: libc::SIGTERM, core_dumped: false };
        assert_eq!(term.shell_code(), 143);
    }
}
