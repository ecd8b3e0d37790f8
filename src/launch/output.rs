//! Copying each node's stdout and stderr to the launcher's, line by line,
//! with a prefix that names the node.
//!
//! One thread per stream reads lines and writes each one, prefix included,
//! with a single `write_all` under the stream's lock, so lines of different
//! nodes never interleave. A last line without a newline gets one. When the
//! launcher's own stream fails (a closed pipe), the thread keeps reading and
//! drops the output so that the node never blocks on a full pipe.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The launcher stream that a node stream is copied to.
#[derive(Clone, Copy, Debug)]
pub(super) enum Stream {
    Stdout,
    Stderr,
}

/// Returns the prefix of a node's lines, such as `[node 3 (1,1,0)] `.
pub(super) fn line_prefix(node: crate::NodeId, coord: crate::Coord) -> String {
    format!("[node {node} {coord}] ")
}

/// The threads that copy node output. Each thread owns a clone of `done`
/// and drops it when its stream ends.
pub(super) struct OutputCopiers {
    threads: Vec<JoinHandle<()>>,
    done: Sender<()>,
    finished: Receiver<()>,
}

impl OutputCopiers {
    pub(super) fn new() -> Self {
        let (done, finished) = mpsc::channel();
        OutputCopiers { threads: Vec::new(), done, finished }
    }

    /// Starts a thread that copies `source` to `stream` with `prefix`.
    pub(super) fn copy(
        &mut self,
        source: impl Read + Send + 'static,
        stream: Stream,
        prefix: String,
    ) -> io::Result<()> {
        let done = self.done.clone();
        let thread = thread::Builder::new()
            .name(format!("meshmem {prefix}{stream:?}"))
            .spawn(move || {
                copy_lines(BufReader::new(source), stream, prefix.as_bytes());
                drop(done);
            })?;
        self.threads.push(thread);
        Ok(())
    }

    /// Waits until every stream has ended or `timeout` has passed, and
    /// returns how many streams were still open.
    ///
    /// A stream stays open after its node exits when a process that the node
    /// started outside its process group still has it open. Its thread is then
    /// detached and keeps copying until that process closes the stream.
    pub(super) fn finish(self, timeout: Duration) -> usize {
        let OutputCopiers { threads, done, finished } = self;
        drop(done);

        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match finished.recv_timeout(left) {
                Ok(()) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    return threads.iter().filter(|t| !t.is_finished()).count();
                }
            }
        }
        for thread in threads {
            // The result carries nothing, and a copier panics only when an
            // allocation fails, which the launcher outlives.
            let _ = thread.join();
        }
        0
    }
}

fn copy_lines(mut source: impl BufRead, stream: Stream, prefix: &[u8]) {
    let mut line = Vec::new();
    let mut out = Vec::new();
    loop {
        line.clear();
        match source.read_until(b'\n', &mut line) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }

        out.clear();
        out.extend_from_slice(prefix);
        out.extend_from_slice(&line);
        if !line.ends_with(b"\n") {
            out.push(b'\n');
        }
        // Errors of the launcher's own stream are dropped on purpose: see
        // the module docs.
        let _ = match stream {
            Stream::Stdout => io::stdout().lock().write_all(&out),
            Stream::Stderr => io::stderr().lock().write_all(&out),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Coord, NodeId};

    #[test]
    fn prefix_names_node_and_coord() {
        assert_eq!(line_prefix(NodeId(3), Coord::new(1, 1, 0)), "[node 3 (1,1,0)] ");
    }
}
