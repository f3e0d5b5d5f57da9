//! A LLaMA-style decoder for Burn, generic over the backend: token embedding, pre-norm blocks
//! of rotary grouped-query attention (with a KV cache) and a SwiGLU MLP, a final RMSNorm, and a
//! tied or untied LM head.
//!
//! Parameter paths read like the usual checkpoints: `embed.weight`,
//! `layers.3.attn.wq.weight`, `layers.3.mlp.up.weight`, `layers.3.attn_norm.gamma`,
//! `norm.gamma`, `lm_head.weight` (absent when tied).
//!
//! Shared by the `llama` example and the benchmarks (`#[path = "../examples/llama/model.rs"]
//! mod model;`), so it holds no CLI code.

// Each includer uses a different subset of this file.
#![allow(dead_code)]

use burn::module::{Initializer, Module};
use burn::nn::{
    Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig, RotaryEncoding,
    RotaryEncodingConfig,
};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// Shapes of a LLaMA-style model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub dim: usize,
    /// Decoder blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when smaller than `n_heads`).
    pub n_kv_heads: usize,
    /// Hidden size of the SwiGLU MLP.
    pub ffn_dim: usize,
    /// Longest sequence (prompt + generated tokens) the rotary table covers.
    pub max_seq_len: usize,
    /// Rotary base.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub norm_eps: f64,
    /// Whether the LM head reuses the embedding matrix (`logits = h @ embed.weight^T`).
    pub tie_embeddings: bool,
}

/// Error for an unknown preset name or inconsistent shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl LlamaConfig {
    /// The preset names accepted by [`preset`](Self::preset).
    pub const PRESETS: &'static [&'static str] = &["tiny", "small", "1b", "7b", "50b"];

    /// A named preset:
    /// - `tiny`: 2 layers, dim 64, vocab 256, GQA and a tied head (runs in well under a second);
    /// - `small`: 4 layers, dim 512, vocab 8192, ~21 M parameters (CPU benchmarking);
    /// - `1b`: Llama-3.2-1B-shaped (dim 2048, 16 layers, GQA 32/8, ffn 8192, tied) with a
    ///   32000 vocabulary;
    /// - `7b`: LLaMA-2-7B (dim 4096, 32 layers, 32 heads, ffn 11008, vocab 32000, untied);
    /// - `50b`: larger than an 80 GB card in bf16 (50.4 B parameters, 100.7 GB): dim 8192, 72
    ///   layers, GQA 64/8, ffn 22016, vocab 32000, untied.
    pub fn preset(name: &str) -> Result<Self, ConfigError> {
        let config = match name.trim().to_ascii_lowercase().as_str() {
            "tiny" => Self {
                vocab_size: 256,
                dim: 64,
                n_layers: 2,
                n_heads: 4,
                n_kv_heads: 2,
                ffn_dim: 176,
                max_seq_len: 256,
                rope_theta: 10_000.0,
                norm_eps: 1e-5,
                tie_embeddings: true,
            },
            "small" => Self {
                vocab_size: 8192,
                dim: 512,
                n_layers: 4,
                n_heads: 8,
                n_kv_heads: 8,
                ffn_dim: 1408,
                max_seq_len: 1024,
                rope_theta: 10_000.0,
                norm_eps: 1e-5,
                tie_embeddings: false,
            },
            "1b" => Self {
                vocab_size: 32_000,
                dim: 2048,
                n_layers: 16,
                n_heads: 32,
                n_kv_heads: 8,
                ffn_dim: 8192,
                max_seq_len: 2048,
                rope_theta: 500_000.0,
                norm_eps: 1e-5,
                tie_embeddings: true,
            },
            "7b" => Self {
                vocab_size: 32_000,
                dim: 4096,
                n_layers: 32,
                n_heads: 32,
                n_kv_heads: 32,
                ffn_dim: 11_008,
                max_seq_len: 4096,
                rope_theta: 10_000.0,
                norm_eps: 1e-5,
                tie_embeddings: false,
            },
            "50b" => Self {
                vocab_size: 32_000,
                dim: 8192,
                n_layers: 72,
                n_heads: 64,
                n_kv_heads: 8,
                ffn_dim: 22_016,
                max_seq_len: 4096,
                rope_theta: 500_000.0,
                norm_eps: 1e-5,
                tie_embeddings: false,
            },
            other => {
                return Err(ConfigError(format!(
                    "unknown preset {other:?}: use one of {}",
                    Self::PRESETS.join(", ")
                )));
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks that the shapes fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: String| Err(ConfigError(m));
        if self.n_heads == 0 || !self.dim.is_multiple_of(self.n_heads) {
            return err(format!(
                "dim {} is not a multiple of n_heads {}",
                self.dim, self.n_heads
            ));
        }
        if self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return err(format!(
                "n_heads {} is not a multiple of n_kv_heads {}",
                self.n_heads, self.n_kv_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return err(format!("head_dim {} must be even (RoPE)", self.head_dim()));
        }
        if self.vocab_size == 0 || self.n_layers == 0 || self.ffn_dim == 0 {
            return err("vocab_size, n_layers and ffn_dim must be positive".into());
        }
        Ok(())
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// Number of parameters, computed from the shapes (no tensor is touched).
    pub fn num_params(&self) -> usize {
        let kv = self.n_kv_heads * self.head_dim();
        let attn = 2 * self.dim * self.dim + 2 * self.dim * kv;
        let mlp = 3 * self.dim * self.ffn_dim;
        let layer = attn + mlp + 2 * self.dim;
        let head = if self.tie_embeddings {
            0
        } else {
            self.vocab_size * self.dim
        };
        self.vocab_size * self.dim + self.n_layers * layer + self.dim + head
    }

    /// Creates the model on `device`. Every parameter is *lazy*: nothing is allocated until it
    /// is first read or loaded, so an offload policy can still retarget it to host memory.
    /// (Only the small rotary table, a constant, is computed here.)
    pub fn init<B: Backend>(&self, device: &B::Device) -> Llama<B> {
        let head_dim = self.head_dim();
        let linear = |i: usize, o: usize| LinearConfig::new(i, o).with_bias(false).init(device);
        let norm = || {
            RmsNormConfig::new(self.dim)
                .with_epsilon(self.norm_eps)
                .init(device)
        };
        let layers = (0..self.n_layers)
            .map(|_| DecoderLayer {
                attn_norm: norm(),
                attn: Attention {
                    wq: linear(self.dim, self.n_heads * head_dim),
                    wk: linear(self.dim, self.n_kv_heads * head_dim),
                    wv: linear(self.dim, self.n_kv_heads * head_dim),
                    wo: linear(self.n_heads * head_dim, self.dim),
                    n_heads: self.n_heads,
                    n_kv_heads: self.n_kv_heads,
                    head_dim,
                },
                mlp_norm: norm(),
                mlp: Mlp {
                    gate: linear(self.dim, self.ffn_dim),
                    up: linear(self.dim, self.ffn_dim),
                    down: linear(self.ffn_dim, self.dim),
                },
            })
            .collect();
        Llama {
            // LLaMA's N(0, 0.02) rather than Burn's default N(0, 1): with a tied head, a unit
            // embedding dominates the residual stream and greedy decoding just repeats tokens.
            embed: EmbeddingConfig::new(self.vocab_size, self.dim)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device),
            layers,
            norm: norm(),
            lm_head: (!self.tie_embeddings).then(|| linear(self.dim, self.vocab_size)),
            rope: RotaryEncodingConfig::new(self.max_seq_len, head_dim)
                .with_theta(self.rope_theta)
                .init(device),
            max_seq_len: self.max_seq_len,
        }
    }
}

/// The model. See the module docs for parameter paths.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// Token embedding, `[vocab, dim]`.
    pub embed: Embedding<B>,
    /// Decoder blocks.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final RMSNorm.
    pub norm: RmsNorm<B>,
    /// LM head, `[dim, vocab]`; `None` when tied to the embedding.
    pub lm_head: Option<Linear<B>>,
    /// Rotary table shared by all layers (a constant, not a parameter).
    pub rope: RotaryEncoding<B>,
    /// Positions the rotary table covers.
    pub max_seq_len: usize,
}

/// One pre-norm decoder block.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Norm before attention.
    pub attn_norm: RmsNorm<B>,
    /// Self-attention.
    pub attn: Attention<B>,
    /// Norm before the MLP.
    pub mlp_norm: RmsNorm<B>,
    /// SwiGLU MLP.
    pub mlp: Mlp<B>,
}

/// Causal rotary self-attention with grouped-query heads.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection, `[dim, n_heads * head_dim]`.
    pub wq: Linear<B>,
    /// Key projection, `[dim, n_kv_heads * head_dim]`.
    pub wk: Linear<B>,
    /// Value projection, `[dim, n_kv_heads * head_dim]`.
    pub wv: Linear<B>,
    /// Output projection, `[n_heads * head_dim, dim]`.
    pub wo: Linear<B>,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads.
    pub n_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
}

/// SwiGLU MLP: `down(silu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Gate projection, `[dim, ffn]`.
    pub gate: Linear<B>,
    /// Up projection, `[dim, ffn]`.
    pub up: Linear<B>,
    /// Down projection, `[ffn, dim]`.
    pub down: Linear<B>,
}

/// Keys and values of the positions processed so far, per layer, as
/// `[batch, n_kv_heads, positions, head_dim]`.
#[derive(Debug, Clone)]
pub struct Cache<B: Backend> {
    layers: Vec<Option<(Tensor<B, 4>, Tensor<B, 4>)>>,
    len: usize,
}

impl<B: Backend> Cache<B> {
    /// An empty cache for a model of `n_layers` blocks.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            len: 0,
        }
    }

    /// An empty cache for `model`.
    pub fn for_model(model: &Llama<B>) -> Self {
        Self::new(model.layers.len())
    }

    /// A cache of `len` positions of standard-normal keys and values for `batch` sequences of
    /// `model`, as if a prompt had been processed, without running one (a decode step then
    /// costs what it costs after a real prompt; the benchmarks use it so that their set-up
    /// runs no extra shapes through the backend).
    pub fn random(model: &Llama<B>, batch: usize, len: usize, device: &B::Device) -> Self {
        use burn::tensor::Distribution;
        let layers = model
            .layers
            .iter()
            .map(|layer| {
                let shape = [batch, layer.attn.n_kv_heads, len, layer.attn.head_dim];
                let kv = || Tensor::random(shape, Distribution::Normal(0.0, 1.0), device);
                Some((kv(), kv()))
            })
            .collect();
        Self { layers, len }
    }

    /// Positions cached so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<B: Backend> Llama<B> {
    /// Logits for every position of `tokens` (`[batch, seq]`), continuing after the cached
    /// positions: `[batch, seq, vocab]`. Updates `cache`.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>, cache: &mut Cache<B>) -> Tensor<B, 3> {
        let hidden = self.hidden(tokens, cache);
        self.head(hidden)
    }

    /// Logits for the last position only (`[batch, vocab]`): what generation needs; the LM
    /// head then runs on `batch` rows instead of `batch * seq`. Updates `cache`.
    pub fn forward_last(&self, tokens: Tensor<B, 2, Int>, cache: &mut Cache<B>) -> Tensor<B, 2> {
        let hidden = self.hidden(tokens, cache);
        let [batch, seq, dim] = hidden.dims();
        let last = hidden.slice([0..batch, seq - 1..seq, 0..dim]);
        let logits = self.head(last);
        let vocab = logits.dims()[2];
        logits.reshape([batch, vocab])
    }

    /// The final normed hidden states `[batch, seq, dim]`.
    pub fn hidden(&self, tokens: Tensor<B, 2, Int>, cache: &mut Cache<B>) -> Tensor<B, 3> {
        assert_eq!(
            cache.layers.len(),
            self.layers.len(),
            "the cache was made for a model with another number of layers"
        );
        let [_, seq] = tokens.dims();
        let start = cache.len;
        assert!(
            start + seq <= self.max_seq_len,
            "{} positions exceed max_seq_len {}",
            start + seq,
            self.max_seq_len
        );
        let mut x = self.embed.forward(tokens);
        let mask = (seq > 1).then(|| causal_mask::<B>(seq, start, &x.device()));
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(x, &self.rope, start, mask.clone(), kv);
        }
        cache.len = start + seq;
        self.norm.forward(x)
    }

    /// The LM head: `h @ lm_head.weight`, or `h @ embed.weight^T` when tied.
    pub fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.matmul(self.embed.weight.val().transpose().unsqueeze::<3>()),
        }
    }
}

/// Additive causal mask `[1, 1, seq, start + seq]` for `seq` new tokens after `start` cached
/// ones: query `i` sees keys `0..=start + i`.
fn causal_mask<B: Backend>(seq: usize, start: usize, device: &B::Device) -> Tensor<B, 4> {
    let total = start + seq;
    let values: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::<B, 2>::from_data(TensorData::new(values, [seq, total]), device)
        .reshape([1, 1, seq, total])
}

impl<B: Backend> DecoderLayer<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEncoding<B>,
        start: usize,
        mask: Option<Tensor<B, 4>>,
        kv: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .attn
                .forward(self.attn_norm.forward(x), rope, start, mask, kv);
        h.clone() + self.mlp.forward(self.mlp_norm.forward(h))
    }
}

impl<B: Backend> Attention<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RotaryEncoding<B>,
        start: usize,
        mask: Option<Tensor<B, 4>>,
        kv: &mut Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let heads = |t: Tensor<B, 3>, n: usize| t.reshape([batch, seq, n, hd]).swap_dims(1, 2);
        let q = rope.apply(heads(self.wq.forward(x.clone()), h), start);
        let k = rope.apply(heads(self.wk.forward(x.clone()), kvh), start);
        let v = heads(self.wv.forward(x), kvh);
        let (k, v) = match kv.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        *kv = Some((k.clone(), v.clone()));
        let (k, v) = (repeat_kv(k, h / kvh), repeat_kv(v, h / kvh));
        let scores = q.matmul(k.swap_dims(2, 3)).div_scalar((hd as f64).sqrt());
        let scores = match mask {
            Some(mask) => scores + mask,
            None => scores,
        };
        let out = softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, seq, h * hd]);
        self.wo.forward(out)
    }
}

/// `[b, kv_heads, t, hd]` -> `[b, kv_heads * n_rep, t, hd]`, each kv head repeated for the
/// `n_rep` query heads of its group.
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kvh, t, hd] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .repeat_dim(2, n_rep)
        .reshape([b, kvh * n_rep, t, hd])
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.down
            .forward(silu(self.gate.forward(x.clone())) * self.up.forward(x))
    }
}
