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
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
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
    /// Size of one attention head when it is not `dim / n_heads` (Hugging Face's `head_dim`).
    pub head_dim: Option<usize>,
    /// Biases on the query, key and value projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// A bias on the attention output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama's `mlp_bias`).
    pub mlp_bias: bool,
    /// How the rotary frequencies are scaled for long contexts.
    pub rope_scaling: RopeScaling,
    /// Each position attends to at most this many positions, itself included (Mistral's
    /// `sliding_window`); `None`: all earlier positions.
    pub sliding_window: Option<usize>,
}

/// Scaling of the rotary frequencies (Hugging Face's `rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// The plain frequencies `theta^(-2i/head_dim)`.
    None,
    /// Every frequency divided by `factor` (`rope_type: "linear"`).
    Linear {
        /// Divisor of the frequencies.
        factor: f32,
    },
    /// Llama 3.1's scaling (`rope_type: "llama3"`): low frequencies divided by `factor`, high
    /// ones kept, a smooth blend between.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f32,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
        low_freq_factor: f32,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// The context length the model was pretrained with.
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// The rotary inverse frequencies for `head_dim` and base `theta`, computed in f32 as
    /// transformers does (`1 / theta^(2i / head_dim)`, then the scaling).
    pub fn inv_freq(&self, theta: f32, head_dim: usize) -> Vec<f32> {
        let plain =
            (0..head_dim / 2).map(|i| 1.0f32 / theta.powf((2 * i) as f32 / head_dim as f32));
        match *self {
            Self::None => plain.collect(),
            Self::Linear { factor } => plain.map(|f| f / factor).collect(),
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = original_max_position_embeddings as f32;
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                plain
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_freq_wavelen {
                            f / factor
                        } else if wavelen < high_freq_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
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
    /// The fields the presets share: no biases, no explicit head size, plain RoPE, full
    /// attention (the shapes are placeholders every preset sets).
    const LLAMA: Self = Self {
        vocab_size: 0,
        dim: 0,
        n_layers: 0,
        n_heads: 0,
        n_kv_heads: 0,
        ffn_dim: 0,
        max_seq_len: 0,
        rope_theta: 10_000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        head_dim: None,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        rope_scaling: RopeScaling::None,
        sliding_window: None,
    };

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
                ..Self::LLAMA
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
                ..Self::LLAMA
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
                ..Self::LLAMA
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
                ..Self::LLAMA
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
                ..Self::LLAMA
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
        if self.n_heads == 0 || (self.head_dim.is_none() && !self.dim.is_multiple_of(self.n_heads))
        {
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
        if self.vocab_size == 0 || self.n_layers == 0 || self.ffn_dim == 0 || self.head_dim() == 0 {
            return err("vocab_size, n_layers, ffn_dim and head_dim must be positive".into());
        }
        if self.sliding_window == Some(0) {
            return err("sliding_window must be positive".into());
        }
        Ok(())
    }

    /// Size of one attention head: `head_dim` if given, else `dim / n_heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.dim / self.n_heads.max(1))
    }

    /// Number of parameters, computed from the shapes (no tensor is touched).
    pub fn num_params(&self) -> usize {
        let q = self.n_heads * self.head_dim();
        let kv = self.n_kv_heads * self.head_dim();
        let attn = 2 * self.dim * q
            + 2 * self.dim * kv
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { self.dim } else { 0 };
        let mlp = 3 * self.dim * self.ffn_dim
            + if self.mlp_bias {
                2 * self.ffn_dim + self.dim
            } else {
                0
            };
        let layer = attn + mlp + 2 * self.dim;
        let head = if self.tie_embeddings {
            0
        } else {
            self.vocab_size * self.dim
        };
        self.vocab_size * self.dim + self.n_layers * layer + self.dim + head
    }

    /// Bytes of the KV cache for `batch` sequences of `context` positions, in a float type of
    /// `dtype_size` bytes.
    pub fn kv_cache_bytes(&self, batch: usize, context: usize, dtype_size: usize) -> u64 {
        (2 * self.n_layers * batch * context * self.n_kv_heads * self.head_dim() * dtype_size)
            as u64
    }

    /// A rough estimate of the activation bytes of a run: a prefill of `prompt` tokens per
    /// sequence (hidden states and MLP intermediates of every row, the grouped keys and values
    /// repeated for all heads, the attention scores), then decode steps up to `context`
    /// positions whose logits are kept until the end.
    pub fn activation_bytes(
        &self,
        batch: usize,
        prompt: usize,
        context: usize,
        dtype_size: usize,
    ) -> u64 {
        let rows = batch * prompt;
        let q = self.n_heads * self.head_dim();
        let repeated_kv = 2 * batch * q * context;
        let hidden = rows * (5 * self.dim + q + 3 * self.ffn_dim);
        let scores = 3 * batch * self.n_heads * prompt * context;
        let logits = batch * self.vocab_size * (2 + context.saturating_sub(prompt));
        ((repeated_kv + hidden + scores + logits) * dtype_size) as u64
    }

    /// A rough estimate of the activation bytes of a training step on `batch` sequences of
    /// `seq` tokens: what autodiff keeps of every layer for the backward pass (the norms'
    /// inputs and outputs, queries, keys and values before and after RoPE, the keys and values
    /// repeated for all heads, the attention scores and their softmax, the attention output,
    /// the MLP's gate, up, activation and product, the residual stream), and the logits with
    /// their log-softmax and gradient.
    pub fn training_activation_bytes(&self, batch: usize, seq: usize, dtype_size: usize) -> u64 {
        let rows = batch * seq;
        let q = self.n_heads * self.head_dim();
        let kv = self.n_kv_heads * self.head_dim();
        let per_layer = rows * (7 * self.dim + 5 * q + 4 * kv + 4 * self.ffn_dim)
            + 2 * batch * self.n_heads * seq * seq;
        let logits = 3 * rows * self.vocab_size;
        ((self.n_layers * per_layer + logits) * dtype_size) as u64
    }

    /// Creates the model on `device`. Every parameter is *lazy*: nothing is allocated until it
    /// is first read or loaded, so an offload policy can still retarget it to host memory.
    /// (Only the small rotary table, a constant, is computed here.)
    pub fn init<B: Backend>(&self, device: &B::Device) -> Llama<B> {
        let head_dim = self.head_dim();
        let linear =
            |i: usize, o: usize, bias: bool| LinearConfig::new(i, o).with_bias(bias).init(device);
        let norm = || {
            RmsNormConfig::new(self.dim)
                .with_epsilon(self.norm_eps)
                .init(device)
        };
        let layers = (0..self.n_layers)
            .map(|_| DecoderLayer {
                attn_norm: norm(),
                attn: Attention {
                    wq: linear(self.dim, self.n_heads * head_dim, self.qkv_bias),
                    wk: linear(self.dim, self.n_kv_heads * head_dim, self.qkv_bias),
                    wv: linear(self.dim, self.n_kv_heads * head_dim, self.qkv_bias),
                    wo: linear(self.n_heads * head_dim, self.dim, self.o_bias),
                    n_heads: self.n_heads,
                    n_kv_heads: self.n_kv_heads,
                    head_dim,
                },
                mlp_norm: norm(),
                mlp: Mlp {
                    gate: linear(self.dim, self.ffn_dim, self.mlp_bias),
                    up: linear(self.dim, self.ffn_dim, self.mlp_bias),
                    down: linear(self.ffn_dim, self.dim, self.mlp_bias),
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
            lm_head: (!self.tie_embeddings).then(|| linear(self.dim, self.vocab_size, false)),
            rope: Rope::new(
                &self.rope_scaling.inv_freq(self.rope_theta, head_dim),
                self.max_seq_len,
                device,
            ),
            max_seq_len: self.max_seq_len,
            sliding_window: self.sliding_window,
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
    /// Rotary tables shared by all layers (constants, not parameters).
    pub rope: Rope<B>,
    /// Positions the rotary table covers.
    pub max_seq_len: usize,
    /// Each position attends to at most this many positions (itself included).
    pub sliding_window: Option<usize>,
}

/// Rotary position embedding in the rotate-half convention of Hugging Face's LLaMA family:
/// dimension `i` of a head turns with `i + head_dim / 2` (Meta's original checkpoints pair
/// neighbours instead; Hugging Face's conversion permuted the q/k weights to this form).
#[derive(Module, Debug)]
pub struct Rope<B: Backend> {
    /// `cos(position * inv_freq)`, `[max_seq_len, head_dim]` (the frequencies repeated twice).
    pub cos: Tensor<B, 2>,
    /// `sin(position * inv_freq)`, `[max_seq_len, head_dim]`.
    pub sin: Tensor<B, 2>,
}

impl<B: Backend> Rope<B> {
    /// Tables for positions `0..max_seq_len`, computed in f32 as transformers does.
    pub fn new(inv_freq: &[f32], max_seq_len: usize, device: &B::Device) -> Self {
        let head_dim = 2 * inv_freq.len();
        let angles: Vec<f32> = (0..max_seq_len)
            .flat_map(|p| (0..head_dim).map(move |i| p as f32 * inv_freq[i % inv_freq.len()]))
            .collect();
        let table = |f: fn(f32) -> f32| {
            let values: Vec<f32> = angles.iter().map(|&a| f(a)).collect();
            Tensor::from_data(TensorData::new(values, [max_seq_len, head_dim]), device)
        };
        Self {
            cos: table(f32::cos),
            sin: table(f32::sin),
        }
    }

    /// Rotates `x` (`[batch, heads, seq, head_dim]`) whose first position is `start`:
    /// `x * cos + rotate_half(x) * sin`, `rotate_half(x) = [-x2, x1]`.
    pub fn apply(&self, x: Tensor<B, 4>, start: usize) -> Tensor<B, 4> {
        let [batch, heads, seq, head_dim] = x.dims();
        let half = head_dim / 2;
        let rows = |t: &Tensor<B, 2>| {
            t.clone()
                .slice([start..start + seq, 0..head_dim])
                .reshape([1, 1, seq, head_dim])
        };
        let x1 = x.clone().slice([0..batch, 0..heads, 0..seq, 0..half]);
        let x2 = x
            .clone()
            .slice([0..batch, 0..heads, 0..seq, half..head_dim]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * rows(&self.cos) + rotated * rows(&self.sin)
    }
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
        // A single new token sees every cached one, unless the window is shorter.
        let windowed = self.sliding_window.is_some_and(|w| start + seq > w);
        let mask = (seq > 1 || windowed)
            .then(|| causal_mask::<B>(seq, start, self.sliding_window, &x.device()));
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(x, &self.rope, start, mask.clone(), kv);
        }
        cache.len = start + seq;
        self.norm.forward(x)
    }

    /// The LM head: `h @ lm_head.weight`, or `h @ embed.weight^T` when tied. A quantized
    /// table is dequantized first, as Burn's `Linear` and `Embedding` do with their weights
    /// (a no-op for a float one; with burn-offload a view that the matmul dequantizes as it
    /// reads).
    pub fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => hidden.matmul(
                self.embed
                    .weight
                    .val()
                    .dequantize()
                    .transpose()
                    .unsqueeze::<3>(),
            ),
        }
    }
}

/// Additive causal mask `[1, 1, seq, start + seq]` for `seq` new tokens after `start` cached
/// ones: query `i` sees keys `0..=start + i`, and with a sliding `window` only the last
/// `window` of them (Hugging Face's `kv_idx > q_idx - sliding_window`).
fn causal_mask<B: Backend>(
    seq: usize,
    start: usize,
    window: Option<usize>,
    device: &B::Device,
) -> Tensor<B, 4> {
    let total = start + seq;
    let values: Vec<f32> = (0..seq)
        .flat_map(|i| {
            (0..total).map(move |j| {
                let q = start + i;
                if j > q || window.is_some_and(|w| j + w <= q) {
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
        rope: &Rope<B>,
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
        rope: &Rope<B>,
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

/// Greedy decoding of `prompts` (equal lengths, one row per sequence): a prefill, then
/// `new_tokens - 1` decode steps through the KV cache. Returns, per sequence, the
/// `new_tokens` generated ids and the logits each was the argmax of.
pub fn greedy<B: Backend>(
    model: &Llama<B>,
    prompts: &[Vec<i64>],
    new_tokens: usize,
    device: &B::Device,
) -> (Vec<Vec<i64>>, Vec<Vec<Vec<f32>>>) {
    let batch = prompts.len();
    let len = prompts.first().map_or(0, Vec::len);
    assert!(
        prompts.iter().all(|p| p.len() == len) && len > 0,
        "prompts must be non-empty and of one length"
    );
    let mut tokens = vec![Vec::with_capacity(new_tokens); batch];
    let mut logits = vec![Vec::with_capacity(new_tokens); batch];
    let mut cache = Cache::for_model(model);
    let mut input =
        Tensor::<B, 2, Int>::from_data(TensorData::new(prompts.concat(), [batch, len]), device);
    for _ in 0..new_tokens {
        let step = model.forward_last(input, &mut cache);
        let next = step.clone().argmax(1);
        let values: Vec<f32> = step.into_data().iter::<f32>().collect();
        let ids: Vec<i64> = next.to_data().iter::<i64>().collect();
        let vocab = values.len() / batch;
        for b in 0..batch {
            tokens[b].push(ids[b]);
            logits[b].push(values[b * vocab..(b + 1) * vocab].to_vec());
        }
        input = next;
    }
    (tokens, logits)
}
