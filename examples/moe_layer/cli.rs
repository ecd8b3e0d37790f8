//! Command-line options. Clap rejects a bad value with a message that names
//! it and exits with status 2; [`Args::check`] adds the checks that need
//! more than one option.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;
use meshmem::{Mesh3d, NodeId};

use crate::model::Preset;
use crate::trace::Scale;

/// Largest `--batch`: more sequences than this would take minutes even for
/// the tiny preset on a small machine.
pub const MAX_BATCH: usize = 4096;

/// Largest `--steps`, for the same reason.
pub const MAX_STEPS: usize = 4096;

/// Runs one MoE transformer layer over a batch of requests from a Mooncake
/// trace, with prefix-shared paged KV cache, and checks the result against a
/// single-process reference.
#[derive(Clone, Debug, Parser)]
#[command(name = "moe_layer")]
pub struct Args {
    /// Shape of the node mesh, `XxYxZ`, optionally followed by `:torus`.
    #[arg(long, default_value = "2x2x2", value_parser = parse_mesh)]
    pub mesh: Mesh3d,

    /// Decode steps after the prefill, each adding one token per sequence.
    #[arg(long, default_value_t = 4, value_parser = parse_steps)]
    pub steps: usize,

    /// Seed of the generated weights and token embeddings.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Placement policy of the weights: expert-parallel, local, interleave,
    /// balanced, nearest or node:N.
    #[arg(long, default_value = "expert-parallel", value_parser = PlacementChoice::from_str)]
    pub placement: PlacementChoice,

    /// Bytes of pool memory each node contributes, such as `512K` or `2G`.
    /// Defaults to the busiest node's share of the weights plus twice an
    /// even share of the KV blocks, so that the KV blocks of the nodes with
    /// the longest sequences spill to their neighbours.
    #[arg(long, value_parser = parse_capacity)]
    pub node_capacity: Option<u64>,

    /// Layer shape.
    #[arg(long, value_enum, default_value_t = Preset::Tiny)]
    pub preset: Preset,

    /// Trace in Mooncake's JSON Lines format; the whole file is read.
    /// Defaults to the slice shipped in examples/data.
    #[arg(long)]
    pub trace: Option<PathBuf>,

    /// Requests in the batch.
    #[arg(long, default_value_t = 8, value_parser = parse_batch)]
    pub batch: usize,

    /// Factor that divides the trace's token counts, a power of two from 1
    /// to 512; defaults to 32 for tiny and 512 for the other presets.
    #[arg(long, value_parser = parse_scale)]
    pub scale: Option<Scale>,

    /// Runs the layer again with hot experts replicated. In each step, after
    /// routing, the experts whose load over the whole batch exceeds F times
    /// the mean are made read-mostly. Each node that routed at least an even
    /// share of their tokens replicates them. F is a number above 0, such
    /// as 1.5.
    #[arg(long, value_name = "F", allow_negative_numbers = true, value_parser = parse_hot_factor)]
    pub replicate_hot: Option<f64>,

    /// Runs the layer again with every expert read-mostly. Each node
    /// replicates the experts it routes to in the background while it
    /// computes, and waits for the copies before the next step.
    #[arg(long)]
    pub prefetch: bool,
}

impl Args {
    /// Checks the options against each other.
    pub fn check(&self) -> Result<(), String> {
        if let PlacementChoice::Node(node) = self.placement {
            if node.index() >= self.mesh.len() {
                return Err(format!(
                    "--placement node:{node} is outside the mesh {} of {} nodes; \
                     pick a node from 0 to {}",
                    self.mesh,
                    self.mesh.len(),
                    self.mesh.len() - 1
                ));
            }
        }
        Ok(())
    }
}

/// The placement policy named by `--placement`. It maps onto the pool's
/// placement when node 0 writes the weights: `expert-parallel` puts expert
/// `e` whole on node `e mod N` and interleaves the dense tensors,
/// `nearest` means nearest to node 0, and `interleave` stripes every
/// tensor page by page over every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlacementChoice {
    ExpertParallel,
    Local,
    Interleave,
    Balanced,
    Nearest,
    Node(NodeId),
}

impl FromStr for PlacementChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "expert-parallel" => Ok(PlacementChoice::ExpertParallel),
            "local" => Ok(PlacementChoice::Local),
            "interleave" => Ok(PlacementChoice::Interleave),
            "balanced" => Ok(PlacementChoice::Balanced),
            "nearest" => Ok(PlacementChoice::Nearest),
            _ => {
                let Some(id) = text.strip_prefix("node:") else {
                    return Err(format!(
                        "unknown placement `{text}`; use expert-parallel, local, interleave, \
                         balanced, nearest or node:N"
                    ));
                };
                id.parse::<u16>().map(|id| PlacementChoice::Node(NodeId(id))).map_err(|_| {
                    format!("node id `{id}` in `{text}` is not a whole number from 0 to 65535")
                })
            }
        }
    }
}

impl fmt::Display for PlacementChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlacementChoice::ExpertParallel => f.write_str("expert-parallel"),
            PlacementChoice::Local => f.write_str("local"),
            PlacementChoice::Interleave => f.write_str("interleave"),
            PlacementChoice::Balanced => f.write_str("balanced"),
            PlacementChoice::Nearest => f.write_str("nearest"),
            PlacementChoice::Node(node) => write!(f, "node:{node}"),
        }
    }
}

fn parse_mesh(text: &str) -> Result<Mesh3d, String> {
    text.parse::<Mesh3d>().map_err(|e| e.to_string())
}

fn parse_capacity(text: &str) -> Result<u64, String> {
    let bytes = meshmem::config::parse_bytes("--node-capacity", text).map_err(|e| e.to_string())?;
    if bytes < 4096 {
        return Err(format!("{bytes} bytes is less than one 4 KiB page"));
    }
    Ok(bytes)
}

fn parse_bounded(text: &str, min: usize, max: usize) -> Result<usize, String> {
    let value = text
        .parse::<usize>()
        .map_err(|_| format!("`{text}` is not a whole number from {min} to {max}"))?;
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is outside {min} to {max}"))
    }
}

fn parse_steps(text: &str) -> Result<usize, String> {
    parse_bounded(text, 0, MAX_STEPS)
}

fn parse_batch(text: &str) -> Result<usize, String> {
    parse_bounded(text, 1, MAX_BATCH)
}

fn parse_hot_factor(text: &str) -> Result<f64, String> {
    let factor = text
        .parse::<f64>()
        .map_err(|_| format!("`{text}` is not a number; give a factor above 0, such as 1.5"))?;
    if factor.is_finite() && factor > 0.0 {
        Ok(factor)
    } else {
        Err(format!(
            "{text} is not a finite factor above 0; an expert is hot when its load exceeds \
             this factor times the mean, so give a value such as 1.5"
        ))
    }
}

fn parse_scale(text: &str) -> Result<Scale, String> {
    let factor = text
        .parse::<u32>()
        .map_err(|_| format!("`{text}` is not a whole number; use a power of two from 1 to 512"))?;
    Scale::new(factor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("moe_layer").chain(args.iter().copied()))
    }

    fn rejected(args: &[&str]) -> String {
        let error = parse(args).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::ValueValidation, "{error}");
        assert_eq!(error.exit_code(), 2);
        error.to_string()
    }

    #[test]
    fn defaults() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.mesh.len(), 8);
        assert_eq!(args.steps, 4);
        assert_eq!(args.batch, 8);
        assert_eq!(args.preset, Preset::Tiny);
        assert_eq!(args.placement, PlacementChoice::ExpertParallel);
        assert!(args.node_capacity.is_none());
        assert!(args.trace.is_none());
        assert!(args.scale.is_none());
        assert!(args.check().is_ok());
    }

    #[test]
    fn all_options() {
        let args = parse(&[
            "--mesh", "4x2x1:torus", "--steps", "0", "--seed", "9", "--placement", "node:7",
            "--preset", "deepseek-v3", "--trace", "t.jsonl", "--batch", "3", "--scale", "64",
            "--node-capacity", "3M",
        ])
        .unwrap();
        assert!(args.mesh.wrap);
        assert_eq!(args.steps, 0);
        assert_eq!(args.seed, 9);
        assert_eq!(args.placement, PlacementChoice::Node(NodeId(7)));
        assert_eq!(args.preset, Preset::DeepseekV3);
        assert_eq!(args.batch, 3);
        assert_eq!(args.scale, Some(Scale::new(64).unwrap()));
        assert_eq!(args.node_capacity, Some(3 << 20));
        assert!(args.check().is_ok());
    }

    #[test]
    fn bad_node_capacity() {
        assert!(rejected(&["--node-capacity", "1K"]).contains("less than one 4 KiB page"));
        assert!(rejected(&["--node-capacity", "lots"]).contains("lots"));
    }

    #[test]
    fn bad_mesh() {
        assert!(rejected(&["--mesh", "2x0x2"]).contains("2x0x2"));
    }

    #[test]
    fn bad_steps() {
        assert!(rejected(&["--steps=-1"]).contains("`-1`"));
        assert!(rejected(&["--steps", "5000"]).contains("5000 is outside 0 to 4096"));
    }

    #[test]
    fn bad_batch() {
        assert!(rejected(&["--batch", "0"]).contains("0 is outside 1 to 4096"));
        assert!(rejected(&["--batch", "many"]).contains("`many`"));
    }

    #[test]
    fn bad_seed() {
        let error = parse(&["--seed", "x"]).unwrap_err();
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains("'x'"));
    }

    #[test]
    fn bad_placement() {
        assert!(rejected(&["--placement", "random"]).contains("unknown placement `random`"));
        assert!(rejected(&["--placement", "node:x"]).contains("node id `x`"));
    }

    #[test]
    fn bad_preset() {
        let error = parse(&["--preset", "gpt"]).unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidValue);
        assert_eq!(error.exit_code(), 2);
        assert!(error.to_string().contains("'gpt'"));
    }

    #[test]
    fn bad_scale() {
        assert!(rejected(&["--scale", "3"]).contains("scale 3 is not a power of two"));
    }

    #[test]
    fn replication_options() {
        let args = parse(&["--replicate-hot", "1.5", "--prefetch"]).unwrap();
        assert_eq!(args.replicate_hot, Some(1.5));
        assert!(args.prefetch);
        let args = parse(&[]).unwrap();
        assert_eq!(args.replicate_hot, None);
        assert!(!args.prefetch);
    }

    #[test]
    fn bad_replicate_hot() {
        for (value, named) in [("0", "0 is not a finite factor above 0"), ("-1", "-1 is not a finite factor above 0")] {
            let message = rejected(&["--replicate-hot", value]);
            assert!(message.contains(named), "{message}");
            assert!(message.contains("such as 1.5"), "{message}");
        }
        assert!(rejected(&["--replicate-hot=-0.5"]).contains("-0.5 is not a finite factor"));
        assert!(rejected(&["--replicate-hot", "NaN"]).contains("NaN is not a finite factor"));
        assert!(rejected(&["--replicate-hot", "inf"]).contains("inf is not a finite factor"));
        assert!(rejected(&["--replicate-hot", "hot"]).contains("`hot` is not a number"));
    }

    #[test]
    fn placement_node_outside_mesh() {
        let args = parse(&["--mesh", "2x2x1", "--placement", "node:4"]).unwrap();
        let message = args.check().unwrap_err();
        assert!(message.contains("node:4 is outside the mesh"), "{message}");
        assert!(message.contains("from 0 to 3"), "{message}");
    }

    #[test]
    fn placement_round_trips() {
        for text in ["expert-parallel", "local", "interleave", "balanced", "nearest", "node:3"] {
            assert_eq!(text.parse::<PlacementChoice>().unwrap().to_string(), text);
        }
    }
}
