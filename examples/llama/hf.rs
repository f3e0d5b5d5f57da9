//! Hugging Face LLaMA-family model directories: `config.json`, `model.safetensors` or shards
//! listed in `model.safetensors.index.json`, and an optional `tokenizer.json`.
//!
//! [`HfModel::open`] reads the config and every shard's safetensors *header* (not the weights)
//! and checks, before anything is allocated, that each tensor the config implies is there,
//! with the right shape and a float dtype, and that no file is truncated. [`HfModel::load`]
//! then loads the weights with burn-store into a [`Llama`] built from [`HfModel::config`]
//! (normally lazy and already placed by an offload policy): each shard is memory-mapped, each
//! tensor read from the map, converted to the model's float type and, for linear layers,
//! transposed from PyTorch's `[out, in]`, then created where its parameter lives (host memory
//! for offloaded ones). Tensors are handled one at a time: the transient copies (read out of the
//! map, converted, transposed) are of one tensor, never of the model.
//!
//! Architectures: `LlamaForCausalLM` (Llama 2 and 3, `rope_scaling` of type `llama3` or
//! `linear`, explicit `head_dim`, `attention_bias`, `mlp_bias`, grouped-query attention, tied
//! or untied head), `MistralForCausalLM` (sliding window) and `Qwen2ForCausalLM` (q/k/v
//! biases). Hugging Face's rotate-half RoPE is what [`Rope`](super::model::Rope) computes, so
//! no q/k permutation is needed.
//!
//! This lives beside the example's model rather than in the library: it maps checkpoints onto
//! this one model definition, which is the example's. What a user of the library needs from a
//! loader (lazy parameters that an offload policy has already placed, loaded tensor by tensor
//! into host memory) is ordinary burn-store use, which this file shows.

// The benchmarks include model.rs only; the tests and the example use all of this.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use burn::tensor::DType;
use burn::tensor::backend::Backend;
use burn_store::{
    ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore, TensorSnapshot,
};
use serde_json::Value;

use super::model::{Llama, LlamaConfig, RopeScaling};

/// What can be wrong with a model directory. Every message names the file, and the tensor
/// where one is at fault.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `config.json` or the shard index is not what a LLaMA-family model has.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong, and what would do.
        message: String,
    },
    /// The directory has no safetensors checkpoint.
    #[error(
        "{dir}: no model.safetensors or model.safetensors.index.json (only safetensors \
         checkpoints are read; convert a pytorch_model.bin with transformers' \
         `save_pretrained(dir, safe_serialization=True)`)"
    )]
    NoCheckpoint {
        /// The directory.
        dir: PathBuf,
    },
    /// A safetensors file's header is unreadable.
    #[error("{file}: not a safetensors file: {message}")]
    Header {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor's bytes extend past the end of its file.
    #[error(
        "{file} is truncated: tensor {tensor} ends at byte {needed} but the file has {len} \
         bytes (download it again)"
    )]
    Truncated {
        /// The tensor.
        tensor: String,
        /// The file.
        file: PathBuf,
        /// Where the tensor's bytes end.
        needed: u64,
        /// The file's length.
        len: u64,
    },
    /// A tensor the config implies is in no file.
    #[error("tensor {tensor} is missing: {file} does not have it")]
    MissingTensor {
        /// The tensor.
        tensor: String,
        /// Where it was looked for (the shard the index names, or the index itself).
        file: PathBuf,
    },
    /// A tensor's shape does not follow from the config.
    #[error(
        "tensor {tensor} in {file} has shape {found:?}, but config.json implies {expected:?} \
         (is config.json the one of this checkpoint?)"
    )]
    ShapeMismatch {
        /// The tensor.
        tensor: String,
        /// Its file.
        file: PathBuf,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor is not f32, f16 or bf16.
    #[error("tensor {tensor} in {file} is {found}: only F32, F16 and BF16 weights are read")]
    Dtype {
        /// The tensor.
        tensor: String,
        /// Its file.
        file: PathBuf,
        /// The dtype in the header.
        found: String,
    },
    /// burn-store failed on a file.
    #[error("loading {file}: {message}")]
    Load {
        /// The file.
        file: PathBuf,
        /// What burn-store said.
        message: String,
    },
}

/// One tensor of the checkpoint, from its file's header.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    /// The file that holds it.
    pub file: PathBuf,
    /// `F32`, `F16` or `BF16`.
    pub dtype: String,
    /// Its shape (PyTorch layout).
    pub shape: Vec<usize>,
}

/// A model directory whose config and headers have been checked.
#[derive(Debug, Clone)]
pub struct HfModel {
    /// The directory.
    pub dir: PathBuf,
    /// `LlamaForCausalLM`, `MistralForCausalLM` or `Qwen2ForCausalLM`.
    pub architecture: String,
    /// The model's shapes; `max_seq_len` is `max_position_embeddings` (lower it to the context
    /// a run needs before `init`: the rotary tables cover `max_seq_len` positions).
    pub config: LlamaConfig,
    /// `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// The checkpoint's files, in order.
    pub files: Vec<PathBuf>,
    /// Every tensor the model reads, by Hugging Face name.
    pub tensors: BTreeMap<String, TensorEntry>,
    /// `tokenizer.json`, if the directory has one.
    pub tokenizer: Option<PathBuf>,
}

/// Hugging Face name → this model's parameter path, as burn-store key remappings (applied to
/// every name in a file; names that match none, like a tied checkpoint's `lm_head.weight`,
/// are left unused).
const REMAP: &[(&str, &str)] = &[
    (r"^model\.embed_tokens\.weight$", "embed.weight"),
    (r"^model\.norm\.weight$", "norm.gamma"),
    (
        r"^model\.layers\.(\d+)\.input_layernorm\.weight$",
        "layers.$1.attn_norm.gamma",
    ),
    (
        r"^model\.layers\.(\d+)\.post_attention_layernorm\.weight$",
        "layers.$1.mlp_norm.gamma",
    ),
    (
        r"^model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)$",
        "layers.$1.attn.w$2.$3",
    ),
    (
        r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)$",
        "layers.$1.mlp.$2.$3",
    ),
];

impl HfModel {
    /// Reads `dir`'s config.json only (and finds its tokenizer.json), not the checkpoint: for
    /// a model whose weights come from elsewhere (a quantized burnpack the example wrote).
    /// [`files`](Self::files) and [`tensors`](Self::tensors) are empty; [`load`](Self::load)
    /// would load nothing.
    pub fn open_config(dir: impl AsRef<Path>) -> Result<Self, HfError> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        let raw: Value =
            serde_json::from_str(&read_string(&config_path)?).map_err(|e| HfError::Config {
                path: config_path.clone(),
                message: format!("not valid JSON: {e}"),
            })?;
        let (architecture, config, max_position_embeddings) =
            parse_config(&raw).map_err(|message| HfError::Config {
                path: config_path.clone(),
                message,
            })?;
        let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
        Ok(Self {
            dir,
            architecture,
            config,
            max_position_embeddings,
            files: Vec::new(),
            tensors: BTreeMap::new(),
            tokenizer,
        })
    }

    /// Reads `dir`'s config and checkpoint headers and checks them against each other.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, HfError> {
        let Self {
            dir,
            architecture,
            config,
            max_position_embeddings,
            tokenizer,
            ..
        } = Self::open_config(dir)?;

        // Which file holds which tensor.
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let (files, located): (Vec<PathBuf>, Option<BTreeMap<String, PathBuf>>) =
            if index_path.is_file() {
                let map = read_index(&index_path, &dir)?;
                let files = map.values().cloned().collect::<BTreeSet<_>>();
                (files.into_iter().collect(), Some(map))
            } else if single.is_file() {
                (vec![single], None)
            } else {
                return Err(HfError::NoCheckpoint { dir });
            };
        let mut headers = BTreeMap::new();
        for file in &files {
            for (name, entry) in read_header(file)? {
                headers.insert(name, entry);
            }
        }

        let mut tensors = BTreeMap::new();
        for (name, expected) in expected_tensors(&config) {
            let missing_in = match &located {
                Some(map) => map
                    .get(&name)
                    .cloned()
                    .unwrap_or_else(|| index_path.clone()),
                None => files[0].clone(),
            };
            let entry = headers.get(&name).ok_or_else(|| HfError::MissingTensor {
                tensor: name.clone(),
                file: missing_in,
            })?;
            if !matches!(entry.dtype.as_str(), "F32" | "F16" | "BF16") {
                return Err(HfError::Dtype {
                    tensor: name,
                    file: entry.file.clone(),
                    found: entry.dtype.clone(),
                });
            }
            if entry.shape != expected {
                return Err(HfError::ShapeMismatch {
                    tensor: name,
                    file: entry.file.clone(),
                    expected,
                    found: entry.shape.clone(),
                });
            }
            tensors.insert(name, entry.clone());
        }
        Ok(Self {
            dir,
            architecture,
            config,
            max_position_embeddings,
            files,
            tensors,
            tokenizer,
        })
    }

    /// Bytes of the weights once loaded as `dtype` (what the progress bar counts).
    pub fn loaded_bytes(&self, dtype: DType) -> u64 {
        self.tensors
            .values()
            .map(|t| (t.shape.iter().product::<usize>() * dtype.size()) as u64)
            .sum()
    }

    /// Loads every weight into `model` (made from [`config`](Self::config)), converted to
    /// `dtype` (the model's float type); `progress` is told the bytes of each tensor loaded.
    pub fn load<B: Backend>(
        &self,
        model: Llama<B>,
        dtype: DType,
        progress: impl Fn(u64) + Send + Sync + Clone + 'static,
    ) -> Result<Llama<B>, HfError> {
        let mut model = model;
        let mut applied = BTreeSet::new();
        for file in &self.files {
            let mut store = SafetensorsStore::from_file(file).allow_partial(true);
            for (from, to) in REMAP {
                store = store.with_key_remapping(*from, *to);
            }
            let store = store.with_from_adapter(PyTorchToBurnAdapter.chain(Convert {
                dtype,
                progress: progress.clone(),
            }));
            let mut store = store;
            let result = model.load_from(&mut store).map_err(|e| HfError::Load {
                file: file.clone(),
                message: e.to_string(),
            })?;
            if !result.errors.is_empty() {
                let errors: Vec<String> = result.errors.iter().map(|e| e.to_string()).collect();
                return Err(HfError::Load {
                    file: file.clone(),
                    message: errors.join("; "),
                });
            }
            applied.extend(result.applied);
        }
        // `open` checked every tensor is in some file; a parameter still not loaded would mean
        // a name mapping and the model disagree, and it would keep random values.
        let left: Vec<String> = burn_offload::fit::fit_params(&model, &[])
            .into_iter()
            .map(|p| p.path)
            .filter(|p| !applied.contains(p))
            .collect();
        if !left.is_empty() {
            return Err(HfError::Load {
                file: self.dir.clone(),
                message: format!("no checkpoint tensor was mapped to parameters {left:?}"),
            });
        }
        Ok(model)
    }
}

/// Converts each tensor to the model's float type as it is read, and reports its bytes.
#[derive(Clone)]
struct Convert<P> {
    dtype: DType,
    progress: P,
}

impl<P: Fn(u64) + Send + Sync + Clone + 'static> ModuleAdapter for Convert<P> {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let read = snapshot.clone_data_fn();
        let (dtype, progress) = (self.dtype, self.progress.clone());
        let data_fn = Rc::new(move || {
            let data = read()?;
            let data = if data.dtype == dtype {
                data
            } else {
                data.convert_dtype(dtype)
            };
            progress(data.bytes.len() as u64);
            Ok(data)
        });
        TensorSnapshot::from_closure(
            data_fn,
            dtype,
            snapshot.shape.clone(),
            snapshot.path_stack.clone().unwrap_or_default(),
            snapshot.container_stack.clone().unwrap_or_default(),
            snapshot.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

fn read_string(path: &Path) -> Result<String, HfError> {
    std::fs::read_to_string(path).map_err(|source| HfError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// `weight_map` of a shard index: tensor name → shard file.
fn read_index(path: &Path, dir: &Path) -> Result<BTreeMap<String, PathBuf>, HfError> {
    let err = |message: String| HfError::Config {
        path: path.to_path_buf(),
        message,
    };
    let raw: Value =
        serde_json::from_str(&read_string(path)?).map_err(|e| err(format!("not JSON: {e}")))?;
    let map = raw
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| err("no \"weight_map\" object".into()))?;
    map.iter()
        .map(|(name, file)| {
            let file = file
                .as_str()
                .filter(|f| !f.contains('/') && !f.contains('\\') && *f != "..")
                .ok_or_else(|| err(format!("{name}: the shard must be a file name")))?;
            Ok((name.clone(), dir.join(file)))
        })
        .collect()
}

/// The tensors of a safetensors file, from its header; checks that each tensor's bytes are
/// inside the file.
fn read_header(file: &Path) -> Result<Vec<(String, TensorEntry)>, HfError> {
    let io = |source| HfError::Io {
        path: file.to_path_buf(),
        source,
    };
    let bad = |message: String| HfError::Header {
        file: file.to_path_buf(),
        message,
    };
    let mut f = File::open(file).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| {
        bad(format!(
            "{len} bytes, shorter than the 8-byte header length"
        ))
    })?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > len {
        return Err(bad(format!(
            "the header claims {n} bytes but the file has {len} (truncated?)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(io)?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header is not JSON: {e}")))?;
    let data_start = 8 + n;
    let mut out = Vec::new();
    for (name, info) in header {
        if name == "__metadata__" {
            continue;
        }
        let field = |key: &str| {
            info.get(key)
                .ok_or_else(|| bad(format!("tensor {name} has no {key:?}")))
        };
        let dtype = field("dtype")?
            .as_str()
            .ok_or_else(|| bad(format!("tensor {name}: dtype is not a string")))?
            .to_string();
        let numbers = |key: &str| -> Result<Vec<u64>, HfError> {
            field(key)?
                .as_array()
                .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>())
                .ok_or_else(|| bad(format!("tensor {name}: {key} is not a list of integers")))
        };
        let shape: Vec<usize> = numbers("shape")?.into_iter().map(|d| d as usize).collect();
        let offsets = numbers("data_offsets")?;
        let [begin, end] = offsets[..] else {
            return Err(bad(format!(
                "tensor {name}: data_offsets must have two entries"
            )));
        };
        if begin > end {
            return Err(bad(format!("tensor {name}: data_offsets {begin} > {end}")));
        }
        let element = match dtype.as_str() {
            "F64" | "I64" | "U64" => Some(8),
            "F32" | "I32" | "U32" => Some(4),
            "F16" | "BF16" | "I16" | "U16" => Some(2),
            "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => Some(1),
            _ => None,
        };
        let elements = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
        if let (Some(size), Some(n)) = (element, elements)
            && n.checked_mul(size) != Some(end - begin)
        {
            return Err(bad(format!(
                "tensor {name}: {} bytes between its data_offsets, but shape {shape:?} of \
                 {dtype} takes {}",
                end - begin,
                n.saturating_mul(size)
            )));
        }
        let needed = data_start.saturating_add(end);
        if needed > len {
            return Err(HfError::Truncated {
                tensor: name,
                file: file.to_path_buf(),
                needed,
                len,
            });
        }
        out.push((
            name,
            TensorEntry {
                file: file.to_path_buf(),
                dtype,
                shape,
            },
        ));
    }
    Ok(out)
}

/// Every tensor the model reads, by Hugging Face name, with its shape in the checkpoint.
fn expected_tensors(c: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (q, kv) = (c.n_heads * c.head_dim(), c.n_kv_heads * c.head_dim());
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, c.dim],
    )];
    for l in 0..c.n_layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        out.push((p("input_layernorm.weight"), vec![c.dim]));
        out.push((p("post_attention_layernorm.weight"), vec![c.dim]));
        for (name, rows, cols, bias) in [
            ("self_attn.q_proj", q, c.dim, c.qkv_bias),
            ("self_attn.k_proj", kv, c.dim, c.qkv_bias),
            ("self_attn.v_proj", kv, c.dim, c.qkv_bias),
            ("self_attn.o_proj", c.dim, q, c.o_bias),
            ("mlp.gate_proj", c.ffn_dim, c.dim, c.mlp_bias),
            ("mlp.up_proj", c.ffn_dim, c.dim, c.mlp_bias),
            ("mlp.down_proj", c.dim, c.ffn_dim, c.mlp_bias),
        ] {
            out.push((p(&format!("{name}.weight")), vec![rows, cols]));
            if bias {
                out.push((p(&format!("{name}.bias")), vec![rows]));
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![c.dim]));
    if !c.tie_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, c.dim]));
    }
    out
}

/// The architecture, the model's config and `max_position_embeddings` from `config.json`.
fn parse_config(raw: &Value) -> Result<(String, LlamaConfig, usize), String> {
    let architecture = raw
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
    let kind = match (model_type, architecture.as_str()) {
        ("llama", _) | (_, "LlamaForCausalLM") => "llama",
        ("mistral", _) | (_, "MistralForCausalLM") => "mistral",
        ("qwen2", _) | (_, "Qwen2ForCausalLM") => "qwen2",
        _ => {
            return Err(format!(
                "unsupported architecture {architecture:?} (model_type {model_type:?}): this \
                 loader reads LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM"
            ));
        }
    };
    let usize_field = |key: &str| -> Result<Option<usize>, String> {
        match raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| format!("{key} must be a non-negative integer, not {v}")),
        }
    };
    let required = |key: &str| usize_field(key)?.ok_or_else(|| format!("{key} is missing"));
    let float_field = |v: Option<&Value>, key: &str| -> Result<Option<f64>, String> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("{key} must be a number, not {v}")),
        }
    };
    let bool_field = |key: &str| -> Result<Option<bool>, String> {
        match raw.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| format!("{key} must be true or false, not {v}")),
        }
    };

    let act = raw
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("silu");
    if act != "silu" {
        return Err(format!(
            "hidden_act {act:?} is not supported: the model's MLP is SwiGLU (silu)"
        ));
    }
    if let Some(f) = float_field(raw.get("partial_rotary_factor"), "partial_rotary_factor")?
        && f != 1.0
    {
        return Err(format!(
            "partial_rotary_factor {f} is not supported (RoPE over the whole head only)"
        ));
    }
    if kind == "qwen2" && bool_field("use_sliding_window")? == Some(true) {
        return Err(
            "use_sliding_window: true is not supported for Qwen2 (it applies to some \
                    layers only); set it to false"
                .into(),
        );
    }

    // RoPE: transformers 5 writes `rope_parameters` (theta inside); older configs
    // `rope_theta` and `rope_scaling`.
    let (rope, theta_value) = match raw.get("rope_parameters") {
        Some(p @ Value::Object(_)) => (
            Some(p),
            p.get("rope_theta").or_else(|| raw.get("rope_theta")),
        ),
        _ => (
            raw.get("rope_scaling").filter(|v| !v.is_null()),
            raw.get("rope_theta"),
        ),
    };
    let rope_theta = float_field(theta_value, "rope_theta")?.unwrap_or(10_000.0) as f32;
    let rope_scaling = match rope {
        None => RopeScaling::None,
        Some(p) => {
            let kind = p
                .get("rope_type")
                .or_else(|| p.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            let num = |key: &str| -> Result<f32, String> {
                float_field(p.get(key), key)?
                    .map(|v| v as f32)
                    .ok_or_else(|| format!("rope scaling {kind:?} needs {key}"))
            };
            match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear {
                    factor: num("factor")?,
                },
                "llama3" => RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    // transformers falls back to max_position_embeddings.
                    original_max_position_embeddings: match p
                        .get("original_max_position_embeddings")
                    {
                        None | Some(Value::Null) => required("max_position_embeddings")?,
                        Some(_) => num("original_max_position_embeddings")? as usize,
                    },
                },
                other => {
                    return Err(format!(
                        "rope type {other:?} is not supported: default, linear and llama3 are"
                    ));
                }
            }
        }
    };

    let n_heads = required("num_attention_heads")?;
    // transformers' defaults when the key is absent: Llama's is the number of heads, Mistral's
    // 8, Qwen2's 32; an explicit null means the number of heads in all three.
    let n_kv_heads = match raw.get("num_key_value_heads") {
        None => match kind {
            "mistral" => 8,
            "qwen2" => 32,
            _ => n_heads,
        },
        Some(_) => usize_field("num_key_value_heads")?.unwrap_or(n_heads),
    };
    let attention_bias = bool_field("attention_bias")?.unwrap_or(false);
    let max_position_embeddings = required("max_position_embeddings")?;
    let config = LlamaConfig {
        vocab_size: required("vocab_size")?,
        dim: required("hidden_size")?,
        n_layers: required("num_hidden_layers")?,
        n_heads,
        n_kv_heads,
        ffn_dim: required("intermediate_size")?,
        max_seq_len: max_position_embeddings,
        rope_theta,
        norm_eps: float_field(raw.get("rms_norm_eps"), "rms_norm_eps")?.unwrap_or(1e-6),
        tie_embeddings: bool_field("tie_word_embeddings")?.unwrap_or(false),
        head_dim: usize_field("head_dim")?,
        // Mistral's attention has no biases, whatever the config says.
        qkv_bias: kind == "qwen2" || (kind == "llama" && attention_bias),
        o_bias: kind == "llama" && attention_bias,
        mlp_bias: kind == "llama" && bool_field("mlp_bias")?.unwrap_or(false),
        rope_scaling,
        // Mistral's default window is 4096 positions; an explicit null is none.
        sliding_window: match (kind, raw.get("sliding_window")) {
            ("mistral", None) => Some(4096),
            ("mistral", Some(_)) => usize_field("sliding_window")?,
            _ => None,
        },
    };
    config.validate().map_err(|e| e.0)?;
    Ok((architecture, config, max_position_embeddings))
}
