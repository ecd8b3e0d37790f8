//! Runs the `meshmem` binary with small `sh` programs as nodes and checks
//! what the nodes see, what the launcher prints and exits with, and that no
//! process of a run is left afterwards.
//!
//! Every process a test starts is killed by pid when its guard drops, so a
//! failing test leaves nothing running either.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Upper bound for any launcher run in these tests; the nodes that should
/// be stopped sleep for 30 s, well above it.
const RUN_TIMEOUT: Duration = Duration::from_secs(15);

/// A temporary directory that the nodes write their pids to. On drop it
/// kills every recorded pid that still carries the run's group id, then
/// removes the directory.
struct NodeDir {
    path: PathBuf,
}

impl NodeDir {
    fn new() -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "meshmem-launcher-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).unwrap();
        NodeDir { path }
    }

    /// Returns `(pid, group)` from every file ending in `.{extension}` that
    /// a node has written in full, as `PID GROUP` on one line.
    fn records(&self, extension: &str) -> Vec<(i32, String)> {
        let mut records = Vec::new();
        for entry in fs::read_dir(&self.path).unwrap().flatten() {
            if entry.path().extension().map_or(true, |e| e != extension) {
                continue;
            }
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            let mut fields = text.split_whitespace();
            if let (Some(pid), Some(group)) = (fields.next(), fields.next()) {
                records.push((pid.parse().unwrap(), group.to_string()));
            }
        }
        records
    }

    /// Waits until `count` nodes have written `.{extension}` records.
    fn wait_for_records(&self, extension: &str, count: usize) -> Vec<(i32, String)> {
        let deadline = Instant::now() + RUN_TIMEOUT;
        loop {
            let records = self.records(extension);
            if records.len() >= count {
                return records;
            }
            let found = records.len();
            assert!(Instant::now() < deadline, "only {found} of {count} .{extension} records after {RUN_TIMEOUT:?}");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeDir {
    fn drop(&mut self) {
        for extension in ["node", "child"] {
            for (pid, group) in self.records(extension) {
                if environ_has_group(pid, &group) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A running launcher. Its output is collected by two threads; on drop it
/// is killed by pid and reaped if it still runs.
struct Launcher {
    child: Child,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    started: Instant,
}

/// How a launcher run ended.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl Launcher {
    fn start(args: &[&str], dir: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_meshmem"))
            .args(args)
            .env("MM_TEST_DIR", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |mut stream: Box<dyn Read + Send>| {
            thread::spawn(move || {
                let mut text = String::new();
                let _ = stream.read_to_string(&mut text);
                text
            })
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Launcher { child, stdout: Some(stdout), stderr: Some(stderr), started: Instant::now() }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Waits for the launcher to exit, panicking after [`RUN_TIMEOUT`].
    fn finish(mut self) -> Finished {
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(self.started.elapsed() < RUN_TIMEOUT, "launcher still running after {RUN_TIMEOUT:?}");
            thread::sleep(Duration::from_millis(10));
        };
        let elapsed = self.started.elapsed();
        let stdout = self.stdout.take().unwrap().join().unwrap();
        let stderr = self.stderr.take().unwrap().join().unwrap();
        Finished { status, stdout, stderr, elapsed }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Runs the launcher to completion.
fn run(args: &[&str], dir: &NodeDir) -> Finished {
    Launcher::start(args, &dir.path).finish()
}

fn environ_has_group(pid: i32, group: &str) -> bool {
    let marker = format!("MESHMEM_GROUP={group}");
    fs::read(format!("/proc/{pid}/environ"))
        .map(|environ| environ.split(|&b| b == 0).any(|var| var == marker.as_bytes()))
        .unwrap_or(false)
}

/// Returns the pids of every process whose environment carries `group`.
fn processes_in_group(group: &str) -> Vec<i32> {
    fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| environ_has_group(pid, group))
        .collect()
}

/// Checks whether `pid` has exited: no such process, or a zombie waiting for a
/// parent other than the launcher to reap it.
fn is_gone(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH) {
        return true;
    }
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    state == Some("Z") || stat.is_empty()
}

fn wait_until_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !is_gone(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Checks that the launcher reaped every node and that nothing carrying the
/// run's group id is left.
fn assert_run_left_nothing(dir: &NodeDir) {
    let nodes = dir.records("node");
    assert!(!nodes.is_empty(), "no node wrote its pid");
    for (pid, _) in &nodes {
        assert_eq!(kill(Pid::from_raw(*pid), None), Err(Errno::ESRCH), "node pid {pid} still exists");
    }
    for (pid, _) in dir.records("child") {
        assert!(wait_until_gone(pid, Duration::from_secs(2)), "child pid {pid} of a node still runs");
    }
    let group = &nodes[0].1;
    assert_eq!(processes_in_group(group), Vec::<i32>::new(), "processes still carry MESHMEM_GROUP={group}");
}

/// A node program that records its pid and group, then sleeps.
const RECORD_AND_SLEEP: &str = r#"echo "$$ $MESHMEM_GROUP" > "$MM_TEST_DIR/$RANK.node"; exec sleep 30"#;

#[test]
fn nodes_see_launch_environment() {
    let dir = NodeDir::new();
    let script = r#"echo "rank=$RANK world=$WORLD_SIZE local=$LOCAL_RANK/$LOCAL_WORLD_SIZE mesh=$MESHMEM_MESH group=$MESHMEM_GROUP""#;
    let run = run(&["run", "--mesh", "2x2x2", "--", "sh", "-c", script], &dir);

    assert!(run.status.success(), "{}", run.stderr);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 8, "{}", run.stdout);

    let mesh: meshmem::Mesh3d = "2x2x2".parse().unwrap();
    let mut groups = Vec::new();
    for node in mesh.nodes() {
        let prefix = format!("[node {node} {}] rank={node} world=8 local={node}/8 mesh=2x2x2 group=", mesh.coord(node).unwrap());
        let line = lines.iter().find(|l| l.starts_with(&prefix));
        let line = line.unwrap_or_else(|| panic!("no line starts with `{prefix}` in:\n{}", run.stdout));
        groups.push(line[prefix.len()..].to_string());
    }
    assert!(groups[0].starts_with("mm-"), "{}", groups[0]);
    assert!(groups.iter().all(|g| *g == groups[0]), "{groups:?}");
    assert!(run.stderr.contains("8 nodes of mesh 2x2x2 exited 0"), "{}", run.stderr);
}

#[test]
fn group_id_differs_between_runs() {
    let dir = NodeDir::new();
    let args = ["run", "--mesh", "1", "--", "sh", "-c", "echo $MESHMEM_GROUP"];
    let first = run(&args, &dir);
    let second = run(&args, &dir);
    assert!(first.status.success(), "{}", first.stderr);
    assert!(second.status.success(), "{}", second.stderr);
    assert_ne!(first.stdout, second.stdout);
}

#[test]
fn output_is_prefixed_per_stream() {
    let dir = NodeDir::new();
    let script = "echo out; echo err >&2; printf tail";
    let run = run(&["run", "--mesh", "2", "--", "sh", "-c", script], &dir);

    assert!(run.status.success(), "{}", run.stderr);
    assert!(run.stdout.contains("[node 0 (0,0,0)] out\n"), "{}", run.stdout);
    assert!(run.stdout.contains("[node 1 (1,0,0)] out\n"), "{}", run.stdout);
    assert!(run.stdout.contains("[node 1 (1,0,0)] tail\n"), "{}", run.stdout);
    assert!(!run.stdout.contains("err"), "{}", run.stdout);
    assert!(run.stderr.contains("[node 0 (0,0,0)] err\n"), "{}", run.stderr);
    assert!(run.stderr.contains("[node 1 (1,0,0)] err\n"), "{}", run.stderr);
}

#[test]
fn no_prefix_passes_output_through() {
    let dir = NodeDir::new();
    let run = run(&["run", "--mesh", "1", "--no-prefix", "--", "sh", "-c", "echo plain"], &dir);
    assert!(run.status.success(), "{}", run.stderr);
    assert_eq!(run.stdout, "plain\n");
}

#[test]
fn failing_node_names_exit_code() {
    let dir = NodeDir::new();
    // Node 3 fails only once the others have recorded their pids, so that
    // the test can check they were stopped.
    let script = format!(
        r#"if [ "$RANK" = 3 ]; then
            while [ "$(find "$MM_TEST_DIR" -name '*.node' -size +0c | wc -l)" -lt 3 ]; do sleep 0.02; done
            exit 3
        fi
        {RECORD_AND_SLEEP}"#
    );
    let run = run(&["run", "--mesh", "2x2x1", "--grace-ms", "2000", "--", "sh", "-c", &script], &dir);

    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("node 3 (1,1,0) exited with code 3"), "{}", run.stderr);
    assert!(run.elapsed < Duration::from_secs(10), "took {:?}", run.elapsed);
    assert_run_left_nothing(&dir);
}

#[test]
fn killed_node_stops_the_others() {
    let dir = NodeDir::new();
    // Node 2 waits until the others have started a background sleep each,
    // so the test can check that those grandchildren are stopped too.
    let script = r#"
        echo "$$ $MESHMEM_GROUP" > "$MM_TEST_DIR/$RANK.node"
        if [ "$RANK" = 2 ]; then
            while [ "$(find "$MM_TEST_DIR" -name '*.child' -size +0c | wc -l)" -lt 3 ]; do sleep 0.02; done
            kill -9 $$
        fi
        sleep 30 &
        echo "$! $MESHMEM_GROUP" > "$MM_TEST_DIR/$RANK.child"
        wait
    "#;
    let run = run(&["run", "--mesh", "2x2x1", "--grace-ms", "2000", "--", "sh", "-c", script], &dir);

    assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("node 2 (0,1,0) was killed by signal SIGKILL"), "{}", run.stderr);
    assert!(run.elapsed < Duration::from_secs(10), "took {:?}", run.elapsed);
    assert_eq!(dir.records("node").len(), 4);
    assert_eq!(dir.records("child").len(), 3);
    assert_run_left_nothing(&dir);
}

#[test]
fn launcher_sigterm_stops_every_node() {
    let dir = NodeDir::new();
    let launcher = Launcher::start(&["run", "--mesh", "2x2x1", "--grace-ms", "2000", "--", "sh", "-c", RECORD_AND_SLEEP], &dir.path);
    dir.wait_for_records("node", 4);

    kill(launcher.pid(), Signal::SIGTERM).unwrap();
    let run = launcher.finish();

    assert_eq!(run.status.code(), Some(128 + libc::SIGTERM), "{}", run.stderr);
    assert!(run.stderr.contains("received SIGTERM"), "{}", run.stderr);
    assert!(run.elapsed < Duration::from_secs(10), "took {:?}", run.elapsed);
    assert_run_left_nothing(&dir);
}

#[test]
fn launcher_sigkill_kills_nodes() {
    let dir = NodeDir::new();
    let launcher = Launcher::start(&["run", "--mesh", "2x1x1", "--", "sh", "-c", RECORD_AND_SLEEP], &dir.path);
    let nodes = dir.wait_for_records("node", 2);

    kill(launcher.pid(), Signal::SIGKILL).unwrap();
    let run = launcher.finish();

    assert_eq!(run.status.code(), None);
    for (pid, _) in nodes {
        assert!(wait_until_gone(pid, Duration::from_secs(5)), "node pid {pid} outlived the launcher");
    }
}

#[test]
fn bad_mesh_exits_2_naming_value() {
    let dir = NodeDir::new();
    let marker = r#"touch "$MM_TEST_DIR/started""#;
    for mesh in ["2x0x2", "abc", "2x2x2:ring", "", "70000"] {
        let run = run(&["run", "--mesh", mesh, "--", "sh", "-c", marker], &dir);
        assert_eq!(run.status.code(), Some(2), "mesh `{mesh}`: {}", run.stderr);
        assert!(run.stderr.contains(&format!("invalid mesh `{mesh}`")), "{}", run.stderr);
        assert!(!dir.path.join("started").exists(), "mesh `{mesh}` started a node");
    }

    let run = run(&["mesh", "2x0x2"], &dir);
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("dimension Y is zero"), "{}", run.stderr);
}

#[test]
fn bad_program_exits_2_naming_value() {
    let dir = NodeDir::new();
    let plain_file = dir.path.join("not-executable");
    fs::write(&plain_file, "echo hi\n").unwrap();
    let plain_file = plain_file.to_str().unwrap();

    let cases = [
        ("/nonexistent/program", "no such file"),
        ("no-such-program-for-meshmem", "not found in PATH"),
        (plain_file, "not executable"),
        ("/", "not a regular file"),
    ];
    for (program, reason) in cases {
        let run = run(&["run", "--mesh", "2", "--", program], &dir);
        assert_eq!(run.status.code(), Some(2), "{program}: {}", run.stderr);
        assert!(run.stderr.contains(&format!("`{program}`")), "{}", run.stderr);
        assert!(run.stderr.contains(reason), "{}", run.stderr);
    }

    let run = run(&["run", "--mesh", "2"], &dir);
    assert_eq!(run.status.code(), Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("PROGRAM"), "{}", run.stderr);
}

#[test]
fn mesh_command_prints_table() {
    let dir = NodeDir::new();
    let run = run(&["mesh", "2x2x2"], &dir);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(run.stdout.starts_with("mesh 2x2x2: 8 nodes, diameter 3 hops\n"), "{}", run.stdout);
    let last = run.stdout.lines().last().unwrap();
    assert!(last.starts_with("   7  (1,1,1)"), "{last}");
    assert!(last.ends_with(" 3  2  2  1  2  1  1  0"), "{last}");
}
