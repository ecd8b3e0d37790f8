//! Simulated hosts on one machine: one Linux network namespace per host,
//! joined by a bridge, so a group's nodes talk real TCP across "hosts"
//! without a second machine.
//!
//! Layout, all made with iproute2 (`ip(8)`) and nothing in the caller's own
//! namespace:
//!
//! ```text
//!  namespace mm<pid>-<n>-h0      namespace mm<pid>-<n>-sw        namespace mm<pid>-<n>-h1
//!  h0 10.77.0.1/24  <── veth ──>  p0 ─┐
//!                                      br0
//!  h1 10.77.0.2/24  <── veth ──>  p1 ─┘
//! ```
//!
//! The bridge lives in a switch namespace of its own, so the caller's
//! namespace gets no link and no route. The addresses exist only inside the
//! namespaces made here. Dropping [`SimulatedHosts`] deletes every namespace
//! it made, which deletes their links too. Drop runs on every exit path that
//! unwinds or returns, including a setup that failed half way.
//!
//! Creating network namespaces needs `CAP_SYS_ADMIN` (root, as in CI).

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};

/// First three octets of the simulated hosts' addresses; host `k` is
/// `10.77.0.(k + 1)`. A private range that exists only inside the
/// namespaces made here.
const SUBNET: [u8; 3] = [10, 77, 0];

/// Most simulated hosts: the addresses `.1` to `.254` of one /24.
pub const MAX_HOSTS: usize = 254;

static NEXT_SET: AtomicU32 = AtomicU32::new(0);

/// A set of network namespaces acting as hosts. Deleted on drop.
#[derive(Debug)]
pub struct SimulatedHosts {
    prefix: String,
    hosts: usize,
    /// Namespaces made so far, deleted in reverse order on drop.
    created: Vec<String>,
}

fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip").args(args).stdin(Stdio::null()).output().map_err(|e| Error::Launch {
        reason: format!("cannot run `ip {}`; install iproute2", args.join(" ")),
        source: Some(e),
    })?;
    if output.status.success() {
        return Ok(());
    }
    Err(Error::Launch {
        reason: format!(
            "`ip {}` failed ({}): {}; simulated hosts need root (CAP_SYS_ADMIN) and iproute2",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        source: None,
    })
}

impl SimulatedHosts {
    /// Creates `hosts` namespaces joined by a bridge, each with its address
    /// up. Fails (and removes what it made) when a step fails.
    pub fn create(hosts: usize) -> Result<SimulatedHosts> {
        if hosts == 0 || hosts > MAX_HOSTS {
            return Err(Error::InvalidConfig {
                name: "--hosts",
                value: hosts.to_string(),
                reason: format!("expected 1 to {MAX_HOSTS} simulated hosts"),
            });
        }
        let prefix = format!("mm{}-{}", std::process::id(), NEXT_SET.fetch_add(1, Ordering::Relaxed));
        let mut set = SimulatedHosts { prefix, hosts, created: Vec::new() };

        // Step 1: the switch namespace and its bridge.
        let switch = set.switch();
        set.add_namespace(&switch)?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;

        // Step 2: each host, with a veth pair from it to the bridge.
        for k in 0..hosts {
            let ns = set.namespace(k);
            set.add_namespace(&ns)?;
            let (inside, port) = (format!("h{k}"), format!("p{k}"));
            ip(&["link", "add", &inside, "netns", &ns, "type", "veth", "peer", "name", &port, "netns", &switch])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &switch, "link", "set", &port, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", set.address(k)), "dev", &inside])?;
            ip(&["-n", &ns, "link", "set", &inside, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        tracing::info!(hosts, prefix = %set.prefix, "simulated hosts created");
        Ok(set)
    }

    fn add_namespace(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.created.push(name.to_string());
        Ok(())
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    pub fn len(&self) -> usize {
        self.hosts
    }

    pub fn is_empty(&self) -> bool {
        self.hosts == 0
    }

    /// Returns the name of host `k`'s namespace (for `ip netns exec`).
    pub fn namespace(&self, k: usize) -> String {
        format!("{}-h{k}", self.prefix)
    }

    /// Returns host `k`'s address, reachable from every other host.
    pub fn address(&self, k: usize) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], k as u8 + 1))
    }

    /// Builds a command that runs `program` inside host `k`'s namespace.
    pub fn command(&self, k: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.namespace(k)]).arg(program);
        command
    }
}

impl Drop for SimulatedHosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes its links; the bridge and veth pairs
        // go with them. A failure is logged and otherwise ignored, because
        // drop cannot report it; `ip netns list` shows what is left.
        for name in self.created.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &name]) {
                tracing::warn!(namespace = %name, error = %e, "cannot delete a simulated host's namespace");
            }
        }
    }
}
