//! GGUF files: metadata and tensors, dequantized at load, with llama.cpp's tensor names mapped to
//! HF's and its Q/K row permutation undone, so one rotary convention serves every checkpoint.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::{ArchConfig, Family};
use crate::error::{Error, Result, candle_text};

/// An opened GGUF file: its metadata plus a reader for tensor data.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    file: File,
}

impl GgufFile {
    /// Opens and parses the header of a `.gguf` file.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::io("opening the GGUF file", e, path))?;
        let len = match file.metadata() {
            Ok(m) if m.is_file() => m.len(),
            _ => return Err(Error::model_file("not a regular file", path)),
        };
        let content = read_header(&mut file, len).map_err(|why| Error::model_file(why, path))?;
        Ok(Self {
            path: path.to_owned(),
            content,
            file,
        })
    }

    /// Every tensor the decoder would read, by its HF name, with its shape (`[out, in]` as in HF
    /// checkpoints).
    pub fn tensors(&self, family: Family) -> Vec<(String, Vec<usize>)> {
        tensor_list(&self.content, family)
    }

    /// Whether the file has a separate unembedding (`output.weight`).
    pub fn has_output_weight(&self) -> bool {
        self.content.tensor_infos.contains_key("output.weight")
    }

    /// Dequantizes every tensor to f32 (then `dtype` on `device`), renamed to HF names.
    pub fn var_builder(&mut self, cfg: &ArchConfig, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let mut tensors = HashMap::new();
        let mut names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        names.sort();
        for name in names {
            let Some(hf_name) = hf_name(&name, cfg.family) else {
                continue; // e.g. rope_freqs: derived from metadata instead
            };
            let q = self.content.tensor(&mut self.file, &name, &Device::Cpu).map_err(|e| {
                let len = self.file.metadata().map_or(0, |m| m.len());
                let why = if extent(&self.content, &name, len).is_some() {
                    "its quantization type or layout is not supported"
                } else {
                    "it runs past the end of the file: truncated?"
                };
                Error::model_file(
                    format!("cannot read tensor '{name}' ({why}: {})", candle_text(&e)),
                    &self.path,
                )
            })?;
            let mut t = q.dequantize(&Device::Cpu)?;
            // llama.cpp stores Llama's Q/K rows permuted for its interleaved rotation; undo it so the
            // HF half-split rotation applies (Qwen GGUF files are not permuted).
            if cfg.family == Family::Llama {
                if hf_name.contains("self_attn.q_proj.") {
                    t = unpermute_rows(&t, cfg.num_heads)?;
                } else if hf_name.contains("self_attn.k_proj.") {
                    t = unpermute_rows(&t, cfg.num_kv_heads)?;
                }
            }
            // llama.cpp's converter stores Gemma's norm weights as 1 + w; the decoder applies
            // Gemma's (1 + w) itself, as HF does, so take the 1 back off.
            if cfg.family.is_gemma() && hf_name.ends_with("norm.weight") {
                t = (t - 1.0)?;
            }
            tensors.insert(hf_name, t.to_dtype(dtype)?.to_device(device)?);
        }
        Ok(VarBuilder::from_tensors(tensors, dtype, device))
    }
}

/// Parses a GGUF header from `reader` (a file of `len` bytes) and checks that every tensor's data
/// lies inside it, no two overlapping, before anything is read. The error says why, for a message
/// that names the file.
pub fn read_header<R: std::io::Read + std::io::Seek>(
    reader: &mut R,
    len: u64,
) -> std::result::Result<gguf_file::Content, String> {
    // candle's header reader panics on some malformed headers (a zero `general.alignment`
    // divides by zero): such a file is refused like any other unreadable one.
    let start = reader
        .stream_position()
        .map_err(|e| format!("cannot read the file ({e})"))?;
    let content = crate::error::quietly(|| gguf_file::Content::read(reader))
        .map_err(|why| format!("not a readable GGUF file (malformed header: {why})"))?
        .map_err(|e| {
            unknown_type(&candle_text(&e)).unwrap_or_else(|| format!("not a readable GGUF file ({})", candle_text(&e)))
        })?;
    // candle keeps the last of two entries with one key: a file that says two things is refused.
    reader
        .seek(std::io::SeekFrom::Start(start))
        .map_err(|e| format!("cannot read the file ({e})"))?;
    if let Some(key) = duplicate_key(reader)? {
        return Err(format!("GGUF metadata has the key '{key}' twice"));
    }
    let mut extents: Vec<(u64, u64, &str)> = Vec::with_capacity(content.tensor_infos.len());
    for name in content.tensor_infos.keys() {
        let Some((start, end)) = extent(&content, name, len) else {
            return Err(format!(
                "tensor '{name}' lies outside the file (truncated, or a corrupt header)"
            ));
        };
        extents.push((start, end, name));
    }
    extents.sort();
    for pair in extents.windows(2) {
        let ((_, end, a), (start, _, b)) = (pair[0], pair[1]);
        if start < end {
            return Err(format!(
                "tensors '{a}' and '{b}' overlap in the file (a corrupt header)"
            ));
        }
    }
    Ok(content)
}

/// A GGUF header's tensors the decoder would read, by their HF names, with their shapes.
pub fn tensor_list(content: &gguf_file::Content, family: Family) -> Vec<(String, Vec<usize>)> {
    content
        .tensor_infos
        .iter()
        .filter_map(|(name, info)| Some((hf_name(name, family)?, info.shape.dims().to_vec())))
        .collect()
}

/// The first metadata key a GGUF header (which candle has already read without error) repeats.
fn duplicate_key<R: std::io::Read>(reader: &mut R) -> std::result::Result<Option<String>, String> {
    fn bytes<R: std::io::Read, const N: usize>(r: &mut R) -> std::result::Result<[u8; N], String> {
        let mut b = [0u8; N];
        r.read_exact(&mut b)
            .map_err(|e| format!("GGUF header cut short ({e})"))?;
        Ok(b)
    }
    let magic = bytes::<R, 4>(reader)?;
    let version = u32::from_le_bytes(bytes::<R, 4>(reader)?);
    // Version 1 writes lengths and counts as u32, later ones as u64.
    let wide = magic == *b"GGUF" && version >= 2;
    let mut length = |r: &mut R| -> std::result::Result<u64, String> {
        Ok(if wide {
            u64::from_le_bytes(bytes::<R, 8>(r)?)
        } else {
            u64::from(u32::from_le_bytes(bytes::<R, 4>(r)?))
        })
    };
    let _tensors = length(reader)?;
    let entries = length(reader)?;
    let mut keys = std::collections::HashSet::new();
    for _ in 0..entries {
        let key_len = length(reader)?;
        let mut key = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut *reader, key_len), &mut key)
            .map_err(|e| format!("GGUF header cut short ({e})"))?;
        let key = String::from_utf8_lossy(&key).into_owned();
        let value_type = u32::from_le_bytes(bytes::<R, 4>(reader)?);
        skip_value(reader, value_type, &mut length, 0)?;
        if !keys.insert(key.clone()) {
            return Ok(Some(key));
        }
    }
    Ok(None)
}

/// Reads past one GGUF metadata value of `value_type` (arrays nest at most a few levels deep).
fn skip_value<R: std::io::Read>(
    reader: &mut R,
    value_type: u32,
    length: &mut dyn FnMut(&mut R) -> std::result::Result<u64, String>,
    depth: usize,
) -> std::result::Result<(), String> {
    const MAX_DEPTH: usize = 4;
    let skip = |n: u64, r: &mut R| -> std::result::Result<(), String> {
        let copied =
            std::io::copy(&mut std::io::Read::take(&mut *r, n), &mut std::io::sink()).map_err(|e| e.to_string())?;
        if copied == n {
            Ok(())
        } else {
            Err("GGUF header cut short".into())
        }
    };
    match value_type {
        0 | 1 | 7 => skip(1, reader), // u8, i8, bool
        2 | 3 => skip(2, reader),     // u16, i16
        4..=6 => skip(4, reader),     // u32, i32, f32
        10..=12 => skip(8, reader),   // u64, i64, f64
        8 => {
            let n = length(reader)?;
            skip(n, reader)
        }
        9 if depth < MAX_DEPTH => {
            let mut t = [0u8; 4];
            reader
                .read_exact(&mut t)
                .map_err(|e| format!("GGUF header cut short ({e})"))?;
            let element = u32::from_le_bytes(t);
            let count = length(reader)?;
            for _ in 0..count {
                skip_value(reader, element, length, depth + 1)?;
            }
            Ok(())
        }
        other => Err(format!("GGUF metadata value of unknown type {other}")),
    }
}

/// The ggml tensor types candle dequantizes.
const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

/// The message for candle's "unknown dtype for tensor N": which ggml type was found, what is supported.
fn unknown_type(candle_message: &str) -> Option<String> {
    let id: u32 = candle_message
        .split("unknown dtype for tensor ")
        .nth(1)?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    // ggml.h's enum ggml_type.
    let name = match id {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    };
    Some(format!(
        "a tensor is stored as ggml type {id} ({name}), which Patchbay cannot dequantize (supported: \
         {SUPPORTED_TYPES}); use another quantization of the model"
    ))
}

/// Where tensor `name`'s data lies in a file of `len` bytes, `(start, end)`; None when it does not
/// lie inside it.
fn extent(content: &gguf_file::Content, name: &str, len: u64) -> Option<(u64, u64)> {
    let info = content.tensor_infos.get(name)?;
    let dtype = info.ggml_dtype;
    let elements = info
        .shape
        .dims()
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))?;
    let bytes = (elements / dtype.block_size().max(1) as u64).checked_mul(dtype.type_size() as u64)?;
    let start = content.tensor_data_offset.checked_add(info.offset)?;
    let end = start.checked_add(bytes)?;
    (end <= len).then_some((start, end))
}

/// Inverse of llama.cpp's `permute`: rows grouped per head as (half, 2) go back to (2, half).
fn unpermute_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / heads / 2;
    Ok(t.reshape((heads, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// GGUF tensor name → HF checkpoint name of `family`.
fn hf_name(gguf: &str, family: Family) -> Option<String> {
    let simple = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_owned());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf_part = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "attn_norm" => "input_layernorm",
        // Gemma: norms after attention and MLP, and its MLP's input norm is "pre-feedforward".
        "post_attention_norm" if family.is_gemma() => "post_attention_layernorm",
        "ffn_norm" if family.is_gemma() => "pre_feedforward_layernorm",
        "post_ffw_norm" if family.is_gemma() => "post_feedforward_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf_part}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_names_map_to_hf_names() {
        assert_eq!(
            hf_name("blk.3.attn_q.weight", Family::Llama).as_deref(),
            Some("model.layers.3.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("blk.0.ffn_down.weight", Family::Llama).as_deref(),
            Some("model.layers.0.mlp.down_proj.weight")
        );
        assert_eq!(
            hf_name("blk.1.attn_k.bias", Family::Llama).as_deref(),
            Some("model.layers.1.self_attn.k_proj.bias")
        );
        assert_eq!(
            hf_name("token_embd.weight", Family::Llama).as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("rope_freqs.weight", Family::Llama), None);
        assert_eq!(
            hf_name("blk.2.ffn_norm.weight", Family::Gemma3).as_deref(),
            Some("model.layers.2.pre_feedforward_layernorm.weight")
        );
        assert_eq!(
            hf_name("blk.2.ffn_norm.weight", Family::Llama).as_deref(),
            Some("model.layers.2.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_name("blk.0.post_ffw_norm.weight", Family::Gemma3).as_deref(),
            Some("model.layers.0.post_feedforward_layernorm.weight")
        );
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> Result<()> {
        // llama.cpp: w.reshape(heads, 2, half, in).swapaxes(1, 2).reshape(out, in)
        let (heads, hd, input) = (2usize, 4usize, 3usize);
        let hf = Tensor::arange(0f32, (heads * hd * input) as f32, &Device::Cpu)?.reshape((heads * hd, input))?;
        let permuted = hf
            .reshape((heads, 2, hd / 2, input))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((heads * hd, input))?;
        let back = unpermute_rows(&permuted, heads)?;
        assert_eq!(back.to_vec2::<f32>()?, hf.to_vec2::<f32>()?);
        Ok(())
    }
}
