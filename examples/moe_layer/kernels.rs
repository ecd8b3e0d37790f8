//! Compute kernels with a fixed summation order.
//!
//! Every reduction here adds its terms in an order that depends only on the
//! lengths of its inputs, never on threads, timing or the process it runs
//! in. Rust does not reassociate floating-point additions, so the same
//! inputs give bit-identical outputs in every node process and in the
//! single-process reference. The kernels run on one thread.

/// Lanes of the partial sums in [`dot`]. Eight `f32` lanes fill one AVX
/// register, so the compiler can vectorise the loop without changing the
/// order of any addition.
const LANES: usize = 8;

/// Returns the dot product of `a` and `b`, which must have equal lengths.
///
/// Summation order: element `i` of the first `len - len % 8` elements goes
/// into partial sum `i % 8`, in increasing `i`. The partial sums are added
/// as `((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))`, and the remaining
/// elements are then added one by one in increasing index.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut lanes = [0.0f32; LANES];
    let chunks_a = a.chunks_exact(LANES);
    let chunks_b = b.chunks_exact(LANES);
    let (tail_a, tail_b) = (chunks_a.remainder(), chunks_b.remainder());
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for lane in 0..LANES {
            lanes[lane] += ca[lane] * cb[lane];
        }
    }

    let mut sum = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
    for (x, y) in tail_a.iter().zip(tail_b) {
        sum += x * y;
    }
    sum
}

/// Computes `out = w x` for a row-major `w` of `out.len()` rows and
/// `x.len()` columns, as `torch.nn.Linear` stores its weight. Each output is
/// one [`dot`].
pub fn matvec(w: &[f32], x: &[f32], out: &mut [f32]) {
    debug_assert_eq!(w.len(), x.len() * out.len());
    for (row, y) in w.chunks_exact(x.len()).zip(out.iter_mut()) {
        *y = dot(row, x);
    }
}

/// Returns `x / sqrt(mean(x²) + eps) * weight`. The mean of squares is a
/// [`dot`] of `x` with itself.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    debug_assert_eq!(x.len(), weight.len());
    let inv_rms = 1.0 / (dot(x, x) / x.len() as f32 + eps).sqrt();
    x.iter().zip(weight).map(|(v, w)| v * inv_rms * w).collect()
}

/// Replaces `x` by its softmax. The maximum is subtracted first for range,
/// and the exponentials are summed in increasing index.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
}

/// Returns the indices of the `k` largest values, largest first. Equal
/// values rank by lower index, so the choice is the same in every process.
/// NaN ranks below every number.
pub fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| {
        let (va, vb) = (values[a], values[b]);
        let by_value = match (va.is_nan(), vb.is_nan()) {
            (true, true) => std::cmp::Ordering::Equal,
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            (false, false) => vb.partial_cmp(&va).unwrap_or(std::cmp::Ordering::Equal),
        };
        by_value.then(a.cmp(&b))
    });
    order.truncate(k);
    order
}

/// Returns `silu(x) = x * sigmoid(x)`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_exact_sum() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        let b = vec![1.0f32; 19];
        assert_eq!(dot(&a, &b), 171.0);
    }

    #[test]
    fn dot_sums_lanes_before_combining() {
        // In f32, 1e8 absorbs an added 1.0. Summed left to right, these terms
        // give 0; with element 1 in its own lane, 1e8 and -1e8 cancel in
        // lane 0 first and the 1.0 survives.
        let mut a = vec![0.0f32; 16];
        a[0] = 1e8;
        a[1] = 1.0;
        a[8] = -1e8;
        let b = vec![1.0f32; 16];
        assert_eq!(dot(&a, &b), 1.0);
    }

    #[test]
    fn matvec_rows() {
        let w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut out = [0.0; 2];
        matvec(&w, &[1.0, 0.0, -1.0], &mut out);
        assert_eq!(out, [-2.0, -2.0]);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = [1.0f32, 2.0, 3.0, 1000.0];
        softmax_in_place(&mut x);
        assert!(x.iter().all(|v| v.is_finite()));
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(x[3] > 0.99);
    }

    #[test]
    fn top_k_breaks_ties_by_index() {
        assert_eq!(top_k(&[0.5, 0.9, 0.5, 0.9], 3), vec![1, 3, 0]);
    }

    #[test]
    fn top_k_ranks_nan_last() {
        assert_eq!(top_k(&[f32::NAN, 0.1, 0.2], 2), vec![2, 1]);
    }

    #[test]
    fn rms_norm_unit_weight() {
        let y = rms_norm(&[3.0, 4.0], &[1.0, 1.0], 0.0);
        let expected = 1.0 / (12.5f32).sqrt();
        assert_eq!(y, vec![3.0 * expected, 4.0 * expected]);
    }
}
