//! The single-process reference: the whole batch in ordinary memory, and
//! the bit-for-bit comparison of its result with another run's.

use std::time::{Duration, Instant};

use crate::model::{ModelConfig, Routing, Weights};
use crate::prefix::SharingPlan;
use crate::sequence::{self, BlockOutOfRange, Layer, LocalKvStore, StepError, Workload};

/// Result of a run: the final hidden states and the work that produced
/// them.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOutput {
    /// Per sequence, the output row of the last prompt token followed by
    /// the row of each decode step: `(steps + 1) * hidden` values.
    pub hidden_states: Vec<Vec<f32>>,
    /// Tokens routed to each expert and the sums of their gate
    /// probabilities.
    pub routing: Routing,
    /// Tokens run through the layer, prefill and decode.
    pub computed_tokens: u64,
    /// Prompt tokens whose keys and values were written.
    pub written_prompt_tokens: u64,
}

/// Wall-clock time of each phase.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub prefill: Duration,
    pub steps: Vec<Duration>,
}

/// Runs the prefill and `workload.steps` decode steps of the batch in this
/// process, with the KV blocks of `plan`.
pub fn run(
    cfg: &ModelConfig,
    weights: &Weights,
    workload: &Workload,
    plan: &SharingPlan,
) -> Result<(RunOutput, Timings), StepError<BlockOutOfRange, std::convert::Infallible>> {
    let layer = Layer { cfg, dense: &weights.dense, seed: workload.seed, scale: workload.scale };
    let mut kv = LocalKvStore::new(cfg, plan.blocks());
    let mut experts = weights.experts.as_slice();
    let mut out = RunOutput {
        hidden_states: vec![Vec::new(); workload.sequences.len()],
        routing: Routing::new(cfg.experts),
        computed_tokens: 0,
        written_prompt_tokens: 0,
    };
    let mut timings = Timings::default();

    // Phase 1 for every sequence before phase 2 for any: a sequence reads
    // shared blocks that a later sequence of the batch may not write, but
    // an earlier one does.
    let started = Instant::now();
    for (index, seq) in workload.sequences.iter().enumerate() {
        let written = sequence::write_prompt_kv(layer, plan, index, seq, &mut kv)
            .map_err(StepError::Kv)?;
        out.written_prompt_tokens += written as u64;
    }
    for (index, seq) in workload.sequences.iter().enumerate() {
        let (last, computed) = sequence::prefill(
            layer,
            plan,
            index,
            seq,
            &mut kv,
            &mut experts,
            &mut out.routing,
        )?;
        out.hidden_states[index] = last;
        out.computed_tokens += computed as u64;
    }
    timings.prefill = started.elapsed();

    for step in 0..workload.steps {
        let started = Instant::now();
        for (index, seq) in workload.sequences.iter().enumerate() {
            let states = &mut out.hidden_states[index];
            let previous = states[states.len() - cfg.hidden..].to_vec();
            let row = sequence::decode(
                layer,
                &plan.sequences[index],
                seq.prompt_tokens + step,
                &previous,
                &mut kv,
                &mut experts,
                &mut out.routing,
            )?;
            states.extend_from_slice(&row);
            out.computed_tokens += 1;
        }
        timings.steps.push(started.elapsed());
    }
    Ok((out, timings))
}

/// The result of comparing two runs value by value.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// Values compared, in both runs.
    pub compared: usize,
    /// Values whose bits differ.
    pub mismatches: usize,
    /// The first difference: sequence, index in its row list, both values.
    pub first_mismatch: Option<(usize, usize, f32, f32)>,
    /// A sequence count or row length that differs, which makes the rest
    /// of the comparison meaningless.
    pub shape_mismatch: Option<String>,
}

impl Comparison {
    pub fn equal(&self) -> bool {
        self.mismatches == 0 && self.shape_mismatch.is_none()
    }
}

/// Compares the bits of every hidden-state value of `actual` with
/// `expected`. Bits, not values, so `-0.0 != 0.0` and equal NaNs match.
pub fn compare(expected: &[Vec<f32>], actual: &[Vec<f32>]) -> Comparison {
    let mut comparison =
        Comparison { compared: 0, mismatches: 0, first_mismatch: None, shape_mismatch: None };
    if expected.len() != actual.len() {
        comparison.shape_mismatch =
            Some(format!("{} sequences expected, {} found", expected.len(), actual.len()));
        return comparison;
    }
    for (seq, (e, a)) in expected.iter().zip(actual).enumerate() {
        if e.len() != a.len() {
            comparison.shape_mismatch = Some(format!(
                "sequence {seq}: {} values expected, {} found",
                e.len(),
                a.len()
            ));
            return comparison;
        }
        for (i, (x, y)) in e.iter().zip(a).enumerate() {
            comparison.compared += 1;
            if x.to_bits() != y.to_bits() {
                comparison.mismatches += 1;
                comparison.first_mismatch.get_or_insert((seq, i, *x, *y));
            }
        }
    }
    comparison
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Preset;
    use crate::trace::{Scale, Sequence};

    fn sequence(line: usize, prompt_tokens: usize, hash_ids: &[u64]) -> Sequence {
        Sequence { line, prompt_tokens, output_tokens: 1, hash_ids: hash_ids.to_vec() }
    }

    /// Three sequences at scale 32 (16 tokens per hash id): the first two
    /// share two full blocks, the third shares only its first block, and
    /// the last is shorter than one block.
    fn workload(steps: usize) -> Workload {
        Workload {
            seed: 11,
            scale: Scale::new(32).unwrap(),
            steps,
            sequences: vec![
                sequence(1, 45, &[0, 1, 2]),
                sequence(2, 40, &[0, 1, 3]),
                sequence(3, 20, &[0, 4]),
                sequence(4, 7, &[9]),
            ],
        }
    }

    fn tiny() -> (ModelConfig, Weights) {
        let cfg = ModelConfig::from_preset(Preset::Tiny);
        let weights = Weights::generate(&cfg, 11);
        (cfg, weights)
    }

    #[test]
    fn reference_is_deterministic() {
        let (cfg, weights) = tiny();
        let work = workload(3);
        let plan = SharingPlan::build(&work.sequences, work.scale, work.steps, true);
        let (first, _) = run(&cfg, &weights, &work, &plan).unwrap();
        let (second, _) = run(&cfg, &weights, &work, &plan).unwrap();
        assert!(compare(&first.hidden_states, &second.hidden_states).equal());
        assert_eq!(first.routing, second.routing);
    }

    #[test]
    fn reference_output_shape() {
        let (cfg, weights) = tiny();
        let work = workload(3);
        let plan = SharingPlan::build(&work.sequences, work.scale, work.steps, true);
        let (out, timings) = run(&cfg, &weights, &work, &plan).unwrap();
        assert_eq!(out.hidden_states.len(), 4);
        assert!(out.hidden_states.iter().all(|s| s.len() == 4 * cfg.hidden));
        assert!(out.hidden_states.iter().flatten().all(|v| v.is_finite()));
        assert_eq!(timings.steps.len(), 3);
        let routed: u64 = out.routing.tokens.iter().sum();
        assert_eq!(routed, out.computed_tokens * cfg.top_k as u64);
    }

    #[test]
    fn shared_prefix_matches_unshared() {
        let (cfg, weights) = tiny();
        let work = workload(3);
        let shared = SharingPlan::build(&work.sequences, work.scale, work.steps, true);
        let unshared = SharingPlan::build(&work.sequences, work.scale, work.steps, false);
        assert!(shared.saved_blocks() > 0);

        let (a, _) = run(&cfg, &weights, &work, &shared).unwrap();
        let (b, _) = run(&cfg, &weights, &work, &unshared).unwrap();
        let comparison = compare(&b.hidden_states, &a.hidden_states);
        assert!(comparison.equal(), "{comparison:?}");
        assert_eq!(comparison.compared, 4 * 4 * cfg.hidden);

        // Sharing skips the writes and the layer runs of reused tokens.
        assert!(a.written_prompt_tokens < b.written_prompt_tokens);
        assert!(a.computed_tokens < b.computed_tokens);
    }

    #[test]
    fn seed_changes_output() {
        let (cfg, weights) = tiny();
        let work = workload(1);
        let plan = SharingPlan::build(&work.sequences, work.scale, work.steps, true);
        let (a, _) = run(&cfg, &weights, &work, &plan).unwrap();
        let other = Workload { seed: 12, ..work.clone() };
        let (b, _) = run(&cfg, &weights, &other, &plan).unwrap();
        assert!(!compare(&a.hidden_states, &b.hidden_states).equal());
    }

    #[test]
    fn compare_reports_first_mismatch() {
        let expected = vec![vec![1.0, 2.0], vec![3.0, 4.0]];
        let actual = vec![vec![1.0, 2.0], vec![3.0, 5.0]];
        let comparison = compare(&expected, &actual);
        assert!(!comparison.equal());
        assert_eq!(comparison.compared, 4);
        assert_eq!(comparison.mismatches, 1);
        assert_eq!(comparison.first_mismatch, Some((1, 1, 4.0, 5.0)));
    }

    #[test]
    fn compare_uses_bits() {
        let comparison = compare(&[vec![0.0]], &[vec![-0.0]]);
        assert!(!comparison.equal());
    }

    #[test]
    fn compare_rejects_shape() {
        let comparison = compare(&[vec![0.0]], &[vec![0.0, 1.0]]);
        assert!(!comparison.equal());
        assert!(comparison.shape_mismatch.unwrap().contains("1 values expected, 2 found"));
    }
}
