//! Expert load over the global batch: the load-balancing loss computed from
//! it, and the experts hot enough to replicate.
//!
//! The loads come from counters in pool memory, one `u64` per expert and
//! step, to which every node adds its own tokens with `fetch_add`. After a
//! step's barrier every node can read the load of the whole batch from
//! them, with no all-reduce. Each node also counts its own tokens, which is
//! all it needs to decide whether it is one of an expert's heavy users.

use crate::model::Routing;

/// Computes the global-batch load-balancing loss of "Demons in the Detail:
/// On Implementing Load Balancing Loss for Training Specialized
/// Mixture-of-Expert Models" (Qwen team, 2025):
///
/// ```text
/// LBL = N_E · Σ_i f_i · P_i
/// ```
///
/// Here `N_E` is the number of experts and `f_i` the fraction of the
/// routed token-slots that went to expert `i`, `tokens[i] / Σ tokens`
/// (each token fills `top_k` slots). `P_i` is the mean over the `T` tokens
/// of expert `i`'s gate probability before the top-k selection,
/// `gate_sums[i] / T` with `T = Σ tokens / top_k`. Both are taken over the
/// global batch, the tokens of every node, not per node and then averaged.
///
/// The paper's abstract defines the loss as `N_E Σ f_i p_i`, with `f_i`
/// the frequency of expert `i` being selected and `p_i` its average gating
/// score. Scaling `f_i` to a fraction of the slots is this example's
/// choice: the loss is then 1 when tokens and probabilities are spread
/// evenly, and at most `N_E`.
///
/// Returns `None` when no token was routed.
pub fn load_balancing_loss(routing: &Routing, top_k: usize) -> Option<f64> {
    let slots: u64 = routing.tokens.iter().sum();
    let tokens = routing.routed_tokens(top_k);
    if slots == 0 || tokens == 0 {
        return None;
    }
    let experts = routing.tokens.len() as f64;
    let sum: f64 = routing
        .tokens
        .iter()
        .zip(&routing.gate_sums)
        .map(|(&count, &gate)| (count as f64 / slots as f64) * (gate / tokens as f64))
        .sum();
    Some(experts * sum)
}

/// Returns, in increasing order, the experts whose load is more than
/// `factor` times the mean load. Every node gets the same result from the
/// same counters.
pub fn hot_experts(load: &[u64], factor: f64) -> Vec<usize> {
    if load.is_empty() {
        return Vec::new();
    }
    let mean = load.iter().sum::<u64>() as f64 / load.len() as f64;
    (0..load.len()).filter(|&e| load[e] as f64 > factor * mean).collect()
}

/// Returns whether a node that routed `mine` of an expert's `total` tokens
/// is one of its heavy users: it routed at least the share an even split
/// over `nodes` nodes would give it. A node decides this for itself from
/// its own count and the global counter, without hearing from the others.
pub fn is_heavy_user(mine: u64, total: u64, nodes: usize) -> bool {
    mine > 0 && u128::from(mine) * nodes as u128 >= u128::from(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(tokens: &[u64], gate_sums: &[f64]) -> Routing {
        Routing { tokens: tokens.to_vec(), gate_sums: gate_sums.to_vec() }
    }

    #[test]
    fn even_load_gives_one() {
        // 4 experts, top-2, 4 tokens: 8 slots, 2 per expert; each token
        // gives every expert probability 1/4.
        let loss = load_balancing_loss(&routing(&[2, 2, 2, 2], &[1.0, 1.0, 1.0, 1.0]), 2).unwrap();
        assert!((loss - 1.0).abs() < 1e-12, "{loss}");
    }

    #[test]
    fn collapsed_load_gives_expert_count() {
        // Top-1, every token to expert 0 with probability 1.
        let loss = load_balancing_loss(&routing(&[3, 0, 0], &[3.0, 0.0, 0.0]), 1).unwrap();
        assert!((loss - 3.0).abs() < 1e-12, "{loss}");
    }

    #[test]
    fn worked_example() {
        // 2 experts, top-1, 4 tokens: f = (3/4, 1/4), P = (2.4/4, 1.6/4);
        // LBL = 2 (0.75 * 0.6 + 0.25 * 0.4) = 1.1.
        let loss = load_balancing_loss(&routing(&[3, 1], &[2.4, 1.6]), 1).unwrap();
        assert!((loss - 1.1).abs() < 1e-12, "{loss}");
    }

    #[test]
    fn no_tokens_gives_none() {
        assert_eq!(load_balancing_loss(&routing(&[0, 0], &[0.0, 0.0]), 2), None);
    }

    #[test]
    fn hot_experts_exceed_factor_times_mean() {
        // Mean 4: above 1.5 x 4 = 6 are 7 and 9; 6 itself is not.
        assert_eq!(hot_experts(&[1, 7, 6, 9, 0, 1], 1.5), vec![1, 3]);
        assert_eq!(hot_experts(&[4, 4, 4, 4], 1.0), Vec::<usize>::new());
        assert_eq!(hot_experts(&[], 1.5), Vec::<usize>::new());
    }

    #[test]
    fn heavy_users_have_an_even_share() {
        assert!(is_heavy_user(2, 16, 8));
        assert!(!is_heavy_user(1, 16, 8));
        assert!(!is_heavy_user(0, 0, 8));
        assert!(is_heavy_user(u64::MAX, u64::MAX, 8));
    }
}
