//! One MoE transformer layer: its shape presets, its weights generated from
//! a seed, and the per-token computation.
//!
//! The layer is, for an input row `x`:
//!
//! ```text
//! h   = x + Wo · attention(Wq · rms_norm(x), K, V)     K, V from the paged cache
//! n   = rms_norm(h)
//! p   = softmax(Wr · n);  the top-k experts, weights renormalised to sum 1
//! out = h + Σ p_e · W2_e (silu(W1_e n) ⊙ W3_e n)
//! ```
//!
//! The key and value rows of a token are `Wk · rms_norm(x)` and
//! `Wv · rms_norm(x)`. Grouped-query attention shares each KV head among
//! `heads / kv_heads` query heads. Positional encoding (RoPE) is not
//! modelled, so a token's K and V depend only on its input row.
//!
//! Weights are generated, not downloaded: every tensor draws from its own
//! splitmix64 stream keyed by the seed and the tensor's name, so any node
//! can regenerate any single tensor and get the same bits.

use std::fmt;

use crate::kernels::{dot, matvec, rms_norm, silu, softmax_in_place, top_k};

/// Bytes in one `f32` value, the element type of every weight and cache row.
pub const F32_BYTES: u64 = 4;

/// Shape presets selectable with `--preset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// A small layer that runs in seconds on two cores.
    Tiny,
    /// Mixtral 8x7B's layer shape, one layer.
    #[value(name = "mixtral-8x7b")]
    Mixtral8x7b,
    /// DeepSeek-V3's MoE shape with 16 of its 256 routed experts, one layer,
    /// plain multi-head attention in place of MLA.
    #[value(name = "deepseek-v3")]
    DeepseekV3,
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Preset::Tiny => "tiny",
            Preset::Mixtral8x7b => "mixtral-8x7b",
            Preset::DeepseekV3 => "deepseek-v3",
        })
    }
}

/// The shape of the layer. See `README.md` beside this file for where each
/// value of the published presets comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub preset: Preset,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Inner size of one expert's FFN.
    pub ffn: usize,
    pub experts: usize,
    pub top_k: usize,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// Default factor by which trace lengths are divided for this preset.
    pub default_scale: u32,
}

impl ModelConfig {
    /// Returns the shape of `preset`.
    pub fn from_preset(preset: Preset) -> Self {
        match preset {
            Preset::Tiny => ModelConfig {
                preset,
                hidden: 64,
                heads: 4,
                kv_heads: 2,
                head_dim: 16,
                ffn: 128,
                experts: 8,
                top_k: 2,
                norm_eps: 1e-5,
                default_scale: 32,
            },
            // Mixtral-8x7B config.json: hidden_size 4096, num_attention_heads
            // 32, num_key_value_heads 8, head_dim 128, intermediate_size
            // 14336, num_local_experts 8, num_experts_per_tok 2, rms_norm_eps
            // 1e-5. Reduced: 1 of 32 layers.
            Preset::Mixtral8x7b => ModelConfig {
                preset,
                hidden: 4096,
                heads: 32,
                kv_heads: 8,
                head_dim: 128,
                ffn: 14336,
                experts: 8,
                top_k: 2,
                norm_eps: 1e-5,
                default_scale: 512,
            },
            // DeepSeek-V3 config.json: hidden_size 7168, num_attention_heads
            // 128, num_key_value_heads 128, moe_intermediate_size 2048,
            // num_experts_per_tok 8, rms_norm_eps 1e-6. Reduced: 16 of 256
            // routed experts, 1 of 61 layers, no shared expert, softmax
            // routing without expert groups, and MHA with head_dim
            // 7168 / 128 = 56 in place of MLA.
            Preset::DeepseekV3 => ModelConfig {
                preset,
                hidden: 7168,
                heads: 128,
                kv_heads: 128,
                head_dim: 56,
                ffn: 2048,
                experts: 16,
                top_k: 8,
                norm_eps: 1e-6,
                default_scale: 512,
            },
        }
    }

    /// Width of the query projection, `heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Width of one key or value row, `kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Bytes of one expert's three matrices.
    pub fn expert_bytes(&self) -> u64 {
        3 * (self.hidden * self.ffn) as u64 * F32_BYTES
    }

    /// Bytes of the weights every token uses: both norms, the four
    /// attention projections and the router.
    pub fn dense_bytes(&self) -> u64 {
        let norms = 2 * self.hidden;
        let projections = 2 * self.hidden * self.q_dim() + 2 * self.hidden * self.kv_dim();
        let router = self.experts * self.hidden;
        (norms + projections + router) as u64 * F32_BYTES
    }
}

/// The splitmix64 generator (Steele, Lea and Flood, "Fast splittable
/// pseudorandom number generators", OOPSLA 2014): a 64-bit counter passed
/// through a fixed mixing function.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Returns a value uniform in `[-1, 1)` with 24 random bits, exact in
    /// `f32`.
    pub fn next_symmetric(&mut self) -> f32 {
        let bits = (self.next_u64() >> 40) as u32;
        bits as f32 / (1u32 << 23) as f32 - 1.0
    }
}

/// Derives a stream seed from the run's seed and a list of keys, so that
/// streams for different tensors or tokens do not overlap in practice.
pub fn stream_seed(seed: u64, keys: &[u64]) -> u64 {
    let mut mixer = SplitMix64::new(seed);
    let mut out = mixer.next_u64();
    for &key in keys {
        mixer = SplitMix64::new(out ^ key);
        out = mixer.next_u64();
    }
    out
}

/// Tags that keep the streams of different tensors apart.
mod tag {
    pub const EMBEDDING: u64 = 1;
    pub const ATTN_NORM: u64 = 2;
    pub const WQ: u64 = 3;
    pub const WK: u64 = 4;
    pub const WV: u64 = 5;
    pub const WO: u64 = 6;
    pub const FFN_NORM: u64 = 7;
    pub const ROUTER: u64 = 8;
    pub const W1: u64 = 9;
    pub const W2: u64 = 10;
    pub const W3: u64 = 11;
}

/// Returns `len` values uniform in `[-bound, bound)` from the stream of
/// `keys`.
fn generate(seed: u64, keys: &[u64], len: usize, bound: f32) -> Vec<f32> {
    let mut rng = SplitMix64::new(stream_seed(seed, keys));
    (0..len).map(|_| rng.next_symmetric() * bound).collect()
}

/// Returns a norm weight near 1: `1 + 0.1 u`, `u` uniform in `[-1, 1)`.
fn generate_norm(seed: u64, tag: u64, len: usize) -> Vec<f32> {
    generate(seed, &[tag], len, 0.1).into_iter().map(|v| 1.0 + v).collect()
}

/// Bound for a matrix with `fan_in` columns, `1 / sqrt(fan_in)` as in
/// `torch.nn.Linear`'s default initialisation, so activations keep their
/// scale through the layer.
fn bound(fan_in: usize) -> f32 {
    1.0 / (fan_in as f32).sqrt()
}

/// The weights that every token reads: norms, attention and router.
/// Matrices are row-major `[out][in]`.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseWeights {
    pub attn_norm: Vec<f32>,
    pub wq: Vec<f32>,
    pub wk: Vec<f32>,
    pub wv: Vec<f32>,
    pub wo: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub router: Vec<f32>,
}

impl DenseWeights {
    pub fn generate(cfg: &ModelConfig, seed: u64) -> Self {
        let (h, q, kv) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
        DenseWeights {
            attn_norm: generate_norm(seed, tag::ATTN_NORM, h),
            wq: generate(seed, &[tag::WQ], q * h, bound(h)),
            wk: generate(seed, &[tag::WK], kv * h, bound(h)),
            wv: generate(seed, &[tag::WV], kv * h, bound(h)),
            wo: generate(seed, &[tag::WO], h * q, bound(q)),
            ffn_norm: generate_norm(seed, tag::FFN_NORM, h),
            router: generate(seed, &[tag::ROUTER], cfg.experts * h, bound(h)),
        }
    }

    /// Returns the tensors in a fixed order with their names, for placing
    /// them in memory one by one.
    pub fn tensors(&self) -> [(&'static str, &[f32]); 7] {
        [
            ("attn_norm", &self.attn_norm),
            ("wq", &self.wq),
            ("wk", &self.wk),
            ("wv", &self.wv),
            ("wo", &self.wo),
            ("ffn_norm", &self.ffn_norm),
            ("router", &self.router),
        ]
    }

    /// Mutable view of the same tensors in the same order as
    /// [`DenseWeights::tensors`].
    pub fn tensors_mut(&mut self) -> [&mut Vec<f32>; 7] {
        [
            &mut self.attn_norm,
            &mut self.wq,
            &mut self.wk,
            &mut self.wv,
            &mut self.wo,
            &mut self.ffn_norm,
            &mut self.router,
        ]
    }

    /// Returns zero-filled tensors of the right sizes, to be read into.
    pub fn zeroed(cfg: &ModelConfig) -> Self {
        let (h, q, kv) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
        DenseWeights {
            attn_norm: vec![0.0; h],
            wq: vec![0.0; q * h],
            wk: vec![0.0; kv * h],
            wv: vec![0.0; kv * h],
            wo: vec![0.0; h * q],
            ffn_norm: vec![0.0; h],
            router: vec![0.0; cfg.experts * h],
        }
    }
}

/// One SwiGLU expert, stored as one buffer `[w1 | w3 | w2]` so that it is a
/// single allocation wherever it is placed: `w1` and `w3` are
/// `[ffn][hidden]`, `w2` is `[hidden][ffn]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertWeights {
    pub data: Vec<f32>,
    pub hidden: usize,
    pub ffn: usize,
}

impl ExpertWeights {
    pub fn generate(cfg: &ModelConfig, seed: u64, expert: usize) -> Self {
        let (h, f) = (cfg.hidden, cfg.ffn);
        let e = expert as u64;
        let mut data = generate(seed, &[tag::W1, e], f * h, bound(h));
        data.extend(generate(seed, &[tag::W3, e], f * h, bound(h)));
        data.extend(generate(seed, &[tag::W2, e], h * f, bound(f)));
        ExpertWeights { data, hidden: h, ffn: f }
    }

    /// Number of `f32` values in one expert of `cfg`.
    pub fn len(cfg: &ModelConfig) -> usize {
        3 * cfg.hidden * cfg.ffn
    }

    /// Wraps a buffer read back from memory; `None` if its length does not
    /// match `cfg`.
    pub fn from_data(cfg: &ModelConfig, data: Vec<f32>) -> Option<Self> {
        (data.len() == Self::len(cfg)).then_some(ExpertWeights {
            data,
            hidden: cfg.hidden,
            ffn: cfg.ffn,
        })
    }

    /// Computes `w2 (silu(w1 x) ⊙ w3 x)`.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let (h, f) = (self.hidden, self.ffn);
        let (w1, rest) = self.data.split_at(f * h);
        let (w3, w2) = rest.split_at(f * h);

        let mut gate = vec![0.0; f];
        let mut up = vec![0.0; f];
        matvec(w1, x, &mut gate);
        matvec(w3, x, &mut up);
        let inner: Vec<f32> = gate.iter().zip(&up).map(|(g, u)| silu(*g) * u).collect();

        let mut out = vec![0.0; h];
        matvec(w2, &inner, &mut out);
        out
    }
}

/// All weights of the layer in ordinary memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    pub dense: DenseWeights,
    pub experts: Vec<ExpertWeights>,
}

impl Weights {
    pub fn generate(cfg: &ModelConfig, seed: u64) -> Self {
        Weights {
            dense: DenseWeights::generate(cfg, seed),
            experts: (0..cfg.experts).map(|e| ExpertWeights::generate(cfg, seed, e)).collect(),
        }
    }
}

/// Source of expert weights for the forward pass: ordinary memory in the
/// reference, pool memory in the distributed run.
pub trait ExpertSource {
    type Error;

    /// Returns expert `expert`, fetching it first if needed.
    fn expert(&mut self, expert: usize) -> Result<&ExpertWeights, Self::Error>;
}

impl ExpertSource for &[ExpertWeights] {
    type Error = std::convert::Infallible;

    fn expert(&mut self, expert: usize) -> Result<&ExpertWeights, Self::Error> {
        Ok(&self[expert])
    }
}

/// Returns the input row of the token at `offset` inside prefix block
/// `hash_id`. Two requests that share a hash id therefore share the tokens
/// of that block, and with them their keys and values.
pub fn token_embedding(seed: u64, hash_id: u64, offset: usize, hidden: usize) -> Vec<f32> {
    generate(seed, &[tag::EMBEDDING, hash_id, offset as u64], hidden, 1.0)
}

/// Returns the input row of the decode step after `output`: the output
/// scaled to unit root mean square, so that repeated steps stay in range.
pub fn next_input(output: &[f32]) -> Vec<f32> {
    let ones = vec![1.0; output.len()];
    rms_norm(output, &ones, 1e-6)
}

/// Computes the key and value rows of a token with input row `x`.
pub fn key_value(cfg: &ModelConfig, w: &DenseWeights, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let xn = rms_norm(x, &w.attn_norm, cfg.norm_eps);
    let mut k = vec![0.0; cfg.kv_dim()];
    let mut v = vec![0.0; cfg.kv_dim()];
    matvec(&w.wk, &xn, &mut k);
    matvec(&w.wv, &xn, &mut v);
    (k, v)
}

/// Keys and values of the first tokens of a sequence, gathered from its KV
/// blocks into rows of `kv_dim` values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Context {
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
}

/// Computes multi-head attention of the query row `q` over the first
/// `tokens` rows of `ctx`. Query head `h` reads KV head
/// `h / (heads / kv_heads)`.
pub fn attention(cfg: &ModelConfig, q: &[f32], ctx: &Context, tokens: usize) -> Vec<f32> {
    let (d, kv_dim) = (cfg.head_dim, cfg.kv_dim());
    let group = cfg.heads / cfg.kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    let mut out = vec![0.0; cfg.q_dim()];
    let mut scores = vec![0.0; tokens];

    for head in 0..cfg.heads {
        let kv_head = head / group;
        let q_head = &q[head * d..(head + 1) * d];
        for (t, score) in scores.iter_mut().enumerate() {
            let k = &ctx.keys[t * kv_dim + kv_head * d..][..d];
            *score = dot(q_head, k) * scale;
        }
        softmax_in_place(&mut scores);

        // Weighted sum of value rows, added in increasing token order.
        let o = &mut out[head * d..(head + 1) * d];
        for (t, p) in scores.iter().enumerate() {
            let v = &ctx.values[t * kv_dim + kv_head * d..][..d];
            for (o, v) in o.iter_mut().zip(v) {
                *o += p * v;
            }
        }
    }
    out
}

/// Counts of the router's choices over some tokens: the tokens routed to
/// each expert, and each expert's gate probability summed over them all.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routing {
    /// Tokens routed to each expert; each token counts once for each of
    /// its `top_k` experts.
    pub tokens: Vec<u64>,
    /// Sum over the tokens of each expert's softmax probability, taken
    /// before the top-k selection, whether the expert was chosen or not.
    pub gate_sums: Vec<f64>,
}

impl Routing {
    pub fn new(experts: usize) -> Self {
        Routing { tokens: vec![0; experts], gate_sums: vec![0.0; experts] }
    }

    /// Tokens run through the router: the routed slots over `top_k`.
    pub fn routed_tokens(&self, top_k: usize) -> u64 {
        self.tokens.iter().sum::<u64>() / top_k.max(1) as u64
    }

    /// Returns what was routed since `earlier`, a copy taken before.
    pub fn since(&self, earlier: &Routing) -> Routing {
        Routing {
            tokens: self.tokens.iter().zip(&earlier.tokens).map(|(a, b)| a - b).collect(),
            gate_sums: self.gate_sums.iter().zip(&earlier.gate_sums).map(|(a, b)| a - b).collect(),
        }
    }
}

/// A token between the router and its experts: the hidden row after
/// attention, the normalised row the experts read, and the chosen experts
/// with their weights, largest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Routed {
    pub h: Vec<f32>,
    pub hn: Vec<f32>,
    /// `(expert, weight)`, the weights renormalised to sum to 1.
    pub experts: Vec<(usize, f32)>,
}

/// Runs attention and the router for a token with input row `x` at
/// position `tokens - 1`, attending over the first `tokens` rows of `ctx`,
/// whose last row must be this token's own key and value. Adds one to `routing.tokens[e]` for each expert `e` the token is routed
/// to, and every expert's gate probability to `routing.gate_sums`.
pub fn route(cfg: &ModelConfig, w: &DenseWeights, ctx: &Context, tokens: usize, x: &[f32], routing: &mut Routing) -> Routed {
    let xn = rms_norm(x, &w.attn_norm, cfg.norm_eps);
    let mut q = vec![0.0; cfg.q_dim()];
    matvec(&w.wq, &xn, &mut q);
    let attended = attention(cfg, &q, ctx, tokens);
    let mut projected = vec![0.0; cfg.hidden];
    matvec(&w.wo, &attended, &mut projected);
    let h: Vec<f32> = x.iter().zip(&projected).map(|(a, b)| a + b).collect();

    let hn = rms_norm(&h, &w.ffn_norm, cfg.norm_eps);
    let mut probs = vec![0.0; cfg.experts];
    matvec(&w.router, &hn, &mut probs);
    softmax_in_place(&mut probs);
    for (sum, &p) in routing.gate_sums.iter_mut().zip(&probs) {
        *sum += f64::from(p);
    }
    let chosen = top_k(&probs, cfg.top_k);
    let chosen_sum = chosen.iter().fold(0.0f32, |sum, &e| sum + probs[e]);
    for &e in &chosen {
        routing.tokens[e] += 1;
    }
    let experts = chosen.iter().map(|&e| (e, probs[e] / chosen_sum)).collect();
    Routed { h, hn, experts }
}

/// Adds the weighted outputs of a routed token's experts to its hidden
/// row, in rank order, and returns the layer's output for the token.
/// [`route`] and then this function run the whole layer for a token.
pub fn apply_experts<S: ExpertSource>(routed: Routed, experts: &mut S) -> Result<Vec<f32>, S::Error> {
    let Routed { h: mut out, hn, experts: chosen } = routed;
    for (e, weight) in chosen {
        let y = experts.expert(e)?.forward(&hn);
        for (o, y) in out.iter_mut().zip(&y) {
            *o += weight * y;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_reference_values() {
        // The widely published first outputs of splitmix64 for seed 0; a
        // changed constant or shift breaks them.
        let mut rng = SplitMix64::new(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn symmetric_values_in_range() {
        let mut rng = SplitMix64::new(7);
        for _ in 0..10_000 {
            let v = rng.next_symmetric();
            assert!((-1.0..1.0).contains(&v), "{v}");
        }
    }

    #[test]
    fn weights_depend_only_on_seed() {
        let cfg = ModelConfig::from_preset(Preset::Tiny);
        assert_eq!(Weights::generate(&cfg, 5), Weights::generate(&cfg, 5));
        assert_ne!(Weights::generate(&cfg, 5), Weights::generate(&cfg, 6));
    }

    #[test]
    fn experts_differ() {
        let cfg = ModelConfig::from_preset(Preset::Tiny);
        let w = Weights::generate(&cfg, 1);
        assert_ne!(w.experts[0], w.experts[1]);
    }

    #[test]
    fn presets_are_consistent() {
        for preset in [Preset::Tiny, Preset::Mixtral8x7b, Preset::DeepseekV3] {
            let cfg = ModelConfig::from_preset(preset);
            assert_eq!(cfg.heads % cfg.kv_heads, 0, "{preset}");
            assert!(cfg.top_k <= cfg.experts, "{preset}");
            assert!(512 % cfg.default_scale == 0, "{preset}");
        }
        let mixtral = ModelConfig::from_preset(Preset::Mixtral8x7b);
        assert_eq!(mixtral.q_dim(), mixtral.hidden);
        assert_eq!(mixtral.kv_dim(), 1024);
    }

    #[test]
    fn attention_single_token_returns_value() {
        let cfg = ModelConfig::from_preset(Preset::Tiny);
        let ctx = Context {
            keys: vec![0.5; cfg.kv_dim()],
            values: (0..cfg.kv_dim()).map(|i| i as f32).collect(),
        };
        let out = attention(&cfg, &vec![1.0; cfg.q_dim()], &ctx, 1);
        // Heads 0 and 1 share KV head 0; heads 2 and 3 share KV head 1.
        let d = cfg.head_dim;
        assert_eq!(&out[..d], &ctx.values[..d]);
        assert_eq!(&out[d..2 * d], &ctx.values[..d]);
        assert_eq!(&out[2 * d..3 * d], &ctx.values[d..2 * d]);
    }

    #[test]
    fn route_counts_top_k_experts() {
        let cfg = ModelConfig::from_preset(Preset::Tiny);
        let w = Weights::generate(&cfg, 3);
        let x = token_embedding(3, 0, 0, cfg.hidden);
        let (k, v) = key_value(&cfg, &w.dense, &x);
        let ctx = Context { keys: k, values: v };
        let mut routing = Routing::new(cfg.experts);
        let mut experts = w.experts.as_slice();
        let routed = route(&cfg, &w.dense, &ctx, 1, &x, &mut routing);
        assert_eq!(routed.experts.len(), cfg.top_k);
        let out = apply_experts(routed, &mut experts).unwrap();
        assert_eq!(out.len(), cfg.hidden);
        assert!(out.iter().all(|v| v.is_finite()));
        assert_eq!(routing.tokens.iter().sum::<u64>(), cfg.top_k as u64);
        assert_eq!(routing.routed_tokens(cfg.top_k), 1);
        // The probabilities of one token sum to 1, up to rounding.
        assert!((routing.gate_sums.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{:?}", routing.gate_sums);
    }
}
