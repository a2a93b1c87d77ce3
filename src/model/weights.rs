//! Turns safetensors checkpoints (single or sharded) into tensors with HF names.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

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

/// Memory-maps safetensors files into a [`VarBuilder`], checking each file's header and extent first
/// so a truncated or corrupt download is reported with its path.
pub fn safetensors_var_builder(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    for f in files {
        // SAFETY: the file is only read; mutation by another process while mapped is the usual mmap caveat.
        unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }.map_err(|e| {
            Error::model_file(
                format!(
                    "cannot read safetensors weights (truncated or corrupt file? {})",
                    candle_text(&e)
                ),
                f,
            )
        })?;
    }
    // SAFETY: as above.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }?;
    Ok(vb)
}
