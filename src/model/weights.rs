//! Turns safetensors checkpoints (single or sharded) into tensors with HF names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::config::ArchConfig;
use super::families::{canonical_name, is_buffer, layer_prefix, tensor_shapes};
use crate::error::{Error, Result, candle_text};

/// The safetensors files of a checkpoint folder: the shards listed in
/// `model.safetensors.index.json`, else every `*.safetensors` file in the folder.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    let mut files: Vec<PathBuf> = if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io("reading the shard index", e, &index))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::model_file(format!("shard index is not valid JSON ({e})"), &index))?;
        let map = json["weight_map"]
            .as_object()
            .ok_or_else(|| Error::model_file("shard index has no 'weight_map'", &index))?;
        let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io("listing the model folder", e, dir))?;
        let mut found: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        found.sort();
        found
    };
    if files.is_empty() {
        return Err(Error::model_file("no *.safetensors weights in the model folder", dir));
    }
    for f in &files {
        if !f.is_file() {
            return Err(Error::model_file("weight shard is missing", f));
        }
    }
    files.dedup();
    Ok(files)
}

/// The name and shape of every tensor in safetensors `files`, read from their headers (each
/// file's header and extent checked, so a truncated or corrupt download is reported with its path).
pub fn safetensors_tensors(files: &[PathBuf]) -> Result<Vec<(String, Vec<usize>)>> {
    let mut tensors = Vec::new();
    for f in files {
        // SAFETY: the file is only read; mutation by another process while mapped is the usual mmap caveat.
        let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }.map_err(|e| {
            Error::model_file(
                format!(
                    "cannot read safetensors weights (truncated or corrupt file? {})",
                    candle_text(&e)
                ),
                f,
            )
        })?;
        tensors.extend(float_tensors(mapped.tensors()).map_err(|why| Error::model_file(why, f))?);
    }
    Ok(tensors)
}

/// The names and shapes of the tensors in one safetensors file's contents (`bytes`), checked as
/// [`safetensors_tensors`] checks files; the error says why they cannot be used.
pub fn safetensors_header(bytes: &[u8]) -> std::result::Result<Vec<(String, Vec<usize>)>, String> {
    let parsed = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| format!("cannot read safetensors weights (truncated or corrupt file? {e})"))?;
    float_tensors(parsed.tensors())
}

/// Names and shapes, refusing weights that are not floating point: an integer or boolean tensor
/// where a weight should be would be converted to floats without a word.
fn float_tensors(
    views: Vec<(String, safetensors::tensor::TensorView<'_>)>,
) -> std::result::Result<Vec<(String, Vec<usize>)>, String> {
    use safetensors::Dtype as D;
    views
        .into_iter()
        .map(|(name, view)| match view.dtype() {
            D::F32 | D::F16 | D::BF16 | D::F64 => Ok((name, view.shape().to_vec())),
            other => Err(format!(
                "tensor {name} is stored as {other:?}; weights must be floating point"
            )),
        })
        .collect()
}

/// Checks a checkpoint's tensors against what `cfg` describes before any weight is read: the same
/// number of layers, every tensor the decoder needs with its shape, and nothing it would ignore
/// (a wrong architecture name or layer count shows as tensors left over). Biases beside expected
/// weights (Llama's `attention_bias`/`mlp_bias`), a tied model's `lm_head.weight` and RoPE's
/// `inv_freq` buffers are allowed.
pub fn check_checkpoint(cfg: &ArchConfig, present: &[(String, Vec<usize>)]) -> Result<()> {
    let present: Vec<(String, Vec<usize>)> = present
        .iter()
        .filter(|(name, _)| !is_buffer(name))
        .map(|(name, shape)| (canonical_name(cfg.family, name), shape.clone()))
        .collect();
    let prefix = layer_prefix(cfg.family);
    let layers_present = present
        .iter()
        .filter_map(|(name, _)| name.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |l| l + 1);
    // Every family's layer has at least this many tensors (Llama's two norms, four attention and
    // three MLP matrices; GPT-2's and NeoX's twelve with biases): a configuration claiming more
    // layers than the tensors could fill is refused before the expected list is built.
    const TENSORS_PER_LAYER: usize = 9;
    if cfg.num_layers > present.len() / TENSORS_PER_LAYER {
        return Err(Error::ModelConfig(format!(
            "the configuration says {} layers; the weights hold only {} tensors",
            cfg.num_layers,
            present.len()
        )));
    }
    if layers_present != cfg.num_layers {
        return Err(Error::ModelConfig(format!(
            "the configuration says {} layers, the weights have {layers_present}",
            cfg.num_layers
        )));
    }
    let expected_in_order = tensor_shapes(cfg);
    let expected: HashMap<&str, &Vec<usize>> = expected_in_order.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let found: HashMap<&str, &Vec<usize>> = present.iter().map(|(n, s)| (n.as_str(), s)).collect();
    let mut missing: Vec<&str> = expected
        .keys()
        .copied()
        .filter(|n| !found.contains_key(n) && !n.ends_with(".bias"))
        .collect();
    if !missing.is_empty() {
        missing.sort();
        return Err(Error::ModelConfig(format!(
            "the weights lack {} tensor(s) this architecture needs: {}",
            missing.len(),
            list(&missing)
        )));
    }
    for (name, shape) in &expected_in_order {
        if let Some(got) = found.get(name.as_str()).filter(|got| **got != shape) {
            return Err(Error::ModelConfig(format!(
                "tensor {name} has shape {got:?} where the configuration implies {shape:?}"
            )));
        }
    }
    let mut unused: Vec<&str> = present
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| !expected.contains_key(*n))
        .filter(|n| {
            let bias_of_expected = n
                .strip_suffix(".bias")
                .is_some_and(|stem| expected.contains_key(format!("{stem}.weight").as_str()));
            !(bias_of_expected || *n == "lm_head.weight" || n.ends_with("rotary_emb.inv_freq"))
        })
        .collect();
    if !unused.is_empty() {
        unused.sort();
        return Err(Error::ModelConfig(format!(
            "the weights have {} tensor(s) this {} architecture does not use (a wrong architecture or layer \
             count?): {}",
            unused.len(),
            cfg.family.hf_class(),
            list(&unused)
        )));
    }
    Ok(())
}

/// Up to five names, then how many more.
fn list(names: &[&str]) -> String {
    let shown = names.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    match names.len() {
        n if n > 5 => format!("{shown} and {} more", n - 5),
        _ => shown,
    }
}

/// Memory-maps safetensors files into a [`VarBuilder`] (after [`safetensors_tensors`] checked them).
pub fn safetensors_var_builder(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: as above.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }?;
    Ok(vb)
}
