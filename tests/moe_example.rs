//! Runs the MoE layer example across node processes and checks that its
//! result equals the single-process reference and that its report lists
//! every node.
//!
//! The example is built and started with `cargo run` in the dev profile,
//! with a small batch and lengths scaled down by 256, so that the run takes
//! seconds. `cargo run` replaces itself with the example on Unix, so the
//! child is the example's launcher, and its nodes die with it because the
//! launcher sets `PR_SET_PDEATHSIG`.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the build and the run may take together. A cold build of the
/// example in the dev profile takes about a minute on two cores.
const DEADLINE: Duration = Duration::from_secs(600);

/// Kills and reaps the child when dropped, so a failed assertion leaves no
/// process behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the example with `args` and returns its exit status, stdout and
/// stderr.
fn run_example(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let mut command = Command::new(env!("CARGO"));
    command.args(["run", "--quiet", "--manifest-path", manifest, "--example", "moe_layer", "--"]).args(args);
    run(command)
}

/// Runs the example's binary under the `meshmem` launcher with
/// `launcher_args`, then `args` for the example.
fn run_under_launcher(launcher_args: &[&str], args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let built = Command::new(env!("CARGO"))
        .args(["build", "--quiet", "--manifest-path", manifest, "--example", "moe_layer"])
        .status()
        .expect("cargo starts");
    assert!(built.success(), "building the example failed");
    let launcher = std::path::Path::new(env!("CARGO_BIN_EXE_meshmem"));
    let example = launcher.parent().expect("the launcher sits in a target folder").join("examples").join("moe_layer");
    let mut command = Command::new(launcher);
    command.arg("run").args(launcher_args).arg("--").arg(example).args(args);
    run(command)
}

fn run(mut command: Command) -> (std::process::ExitStatus, String, String) {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cargo starts");
    let mut child = Reaped(child);

    // Read both pipes on threads, so that a full pipe cannot stall the run.
    let mut stdout = child.0.stdout.take().expect("stdout is piped");
    let mut stderr = child.0.stderr.take().expect("stderr is piped");
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        stdout.read_to_string(&mut text).map(|_| text)
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).map(|_| text)
    });

    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("the child can be waited for") {
            break status;
        }
        assert!(started.elapsed() < DEADLINE, "the example ran longer than {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = out.join().expect("stdout reader").expect("stdout is text");
    let err = err.join().expect("stderr reader").expect("stderr is text");
    (status, out, err)
}

#[test]
fn distributed_run_equals_reference() {
    let (status, out, err) = run_example(&["--batch", "3", "--steps", "2", "--scale", "256"]);
    assert!(status.success(), "the example failed with {status}:\n{out}\n{err}");

    let equal: Vec<&str> = out.lines().filter(|l| l.starts_with("equal: ")).collect();
    assert_eq!(equal.len(), 1, "expected one equality line:\n{out}");
    assert!(equal[0].starts_with("equal: true ("), "{}\n{out}", equal[0]);
    assert!(equal[0].ends_with(" values compared)"), "{}", equal[0]);

    // Every node of the 2x2x2 mesh has a row in the holdings table.
    for (node, coord) in
        ["(0,0,0)", "(1,0,0)", "(0,1,0)", "(1,1,0)", "(0,0,1)", "(1,0,1)", "(0,1,1)", "(1,1,1)"].iter().enumerate()
    {
        let listed = out.lines().any(|line| {
            let mut fields = line.split_whitespace();
            fields.next() == Some(&node.to_string()) && fields.next() == Some(coord)
        });
        assert!(listed, "node {node} {coord} is missing from the report:\n{out}");
    }
    assert!(out.contains("after freeing everything: every node's used frames are its slab pages"), "{out}");
    assert!(out.contains("8 nodes of mesh 2x2x2 exited 0"), "{out}");
    // Only node 0 writes, and without the launcher's per-line prefix.
    assert!(!out.contains("[node "), "{out}");
}

#[test]
fn replication_modes_equal_reference() {
    let args = ["--batch", "3", "--steps", "2", "--scale", "256", "--replicate-hot", "1.5", "--prefetch"];
    let (status, out, err) = run_example(&args);
    assert!(status.success(), "the example failed with {status}:\n{out}\n{err}");
    assert!(out.contains("load counters agree with the nodes' own counts and the reference's routing: true"), "{out}");

    // One row per mode, in order; the last field is the equality with the
    // reference, the sixth from the end the replicas of experts.
    let labels = ["no replication ", "replicate-hot 1.5 ", "prefetch "];
    let table = out.lines().skip_while(|l| !l.starts_with("modes compared")).collect::<Vec<_>>();
    assert!(table.len() > 1 + labels.len(), "the comparison table is missing:\n{out}");
    assert!(table[1].starts_with("mode "), "{}", table[1]);
    for (row, label) in table[2..2 + labels.len()].iter().zip(labels) {
        assert!(row.starts_with(label), "expected the row of `{label}`, found: {row}");
        let fields: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(fields.last(), Some(&"true"), "{row}");
        let replicas: u64 = fields[fields.len() - 6].parse().expect("a replica count");
        match label {
            "no replication " => assert_eq!(replicas, 0, "{row}"),
            "prefetch " => assert!(replicas > 0, "{row}"),
            _ => {}
        }
    }
    assert!(out.contains("equal in every mode: true"), "{out}");
    assert!(out.contains("after freeing everything: every node's used frames are its slab pages"), "{out}");
}

#[test]
fn bad_replicate_hot_is_rejected() {
    for value in ["0", "-1", "NaN"] {
        let (status, out, err) = run_example(&["--replicate-hot", value]);
        assert_eq!(status.code(), Some(2), "expected exit status 2 for {value}:\n{out}\n{err}");
        assert!(err.contains(&format!("{value} is not a finite factor above 0")), "{err}");
    }
}

#[test]
fn too_small_capacity_names_the_failed_node() {
    let (status, out, err) = run_example(&["--batch", "2", "--steps", "1", "--node-capacity", "64K"]);
    assert_eq!(status.code(), Some(1), "expected exit status 1:\n{out}\n{err}");
    assert!(err.contains("raise --node-capacity"), "{err}");
    assert!(err.contains("error: node 0 (0,0,0) exited with code 1"), "the launcher must name the node:\n{err}");
}

#[test]
fn external_launcher_sets_the_mesh() {
    let small = ["--batch", "3", "--steps", "1", "--scale", "256"];
    let (status, out, err) = run_under_launcher(&["--mesh", "2x2"], &small);
    assert!(status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("mesh 2x2x1"), "{out}");
    assert!(out.contains("equal: true"), "{out}");

    let mut mismatched = small.to_vec();
    mismatched.extend(["--mesh", "2x2x2"]);
    let (status, out, err) = run_under_launcher(&["--mesh", "2x2"], &mismatched);
    assert!(!status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("--mesh 2x2x2 differs from the mesh 2x2x1"), "{err}");
}

#[test]
fn runs_across_simulated_hosts() {
    if !nix::unistd::geteuid().is_root() || Command::new("ip").arg("-V").output().is_err() {
        println!("runs_across_simulated_hosts NOT RUN: it needs root and iproute2 to create network namespaces");
        return;
    }
    let small = ["--batch", "3", "--steps", "1", "--scale", "256"];
    let (status, out, err) = run_under_launcher(&["--hosts", "2", "--mesh", "2x2x1"], &small);
    assert!(status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("equal: true"), "{out}");
    assert!(out.contains("between hosts"), "{out}");
    assert!(err.contains("tcp between the 2 simulated hosts"), "{err}");
}
