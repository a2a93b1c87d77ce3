//! Models from the Hugging Face Hub, through the same cache Python uses, offline-first.

use std::path::{Path, PathBuf};

use hf_hub::api::Progress;
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// Bytes received so far for one file of a model download.
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadProgress {
    /// The file being fetched ("model.safetensors").
    pub file: String,
    /// Bytes of this file received.
    pub downloaded: u64,
    /// Size of this file in bytes.
    pub total: u64,
}

/// The Hub cache folder, resolved as huggingface_hub does: `HF_HUB_CACHE`, else `HF_HOME/hub`,
/// else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache").join("huggingface").join("hub")
}

/// Whether `HF_HUB_OFFLINE` forbids network access (huggingface_hub's truthy spellings).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
        .unwrap_or(false)
}

/// Whether a string looks like a Hub repo id (`owner/name`) rather than a path.
pub fn is_repo_id(s: &str) -> bool {
    let mut parts = s.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |p: &str| {
        !p.is_empty() && !p.starts_with('.') && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(owner) && ok(name)
}

struct Reporter<'a> {
    file: String,
    downloaded: u64,
    total: u64,
    on_progress: &'a mut dyn FnMut(&DownloadProgress),
}

impl Progress for Reporter<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.total = size as u64;
        self.downloaded = 0;
        self.report();
    }
    fn update(&mut self, size: usize) {
        self.downloaded += size as u64;
        self.report();
    }
    fn finish(&mut self) {
        self.downloaded = self.total;
        self.report();
    }
}

impl Reporter<'_> {
    fn report(&mut self) {
        (self.on_progress)(&DownloadProgress {
            file: self.file.clone(),
            downloaded: self.downloaded,
            total: self.total,
        });
    }
}

/// Returns the snapshot folder holding `config.json`, `tokenizer.json` and the safetensors weights
/// of `repo_id`, downloading what the cache lacks unless offline.
pub fn fetch_model(repo_id: &str, revision: &str, on_progress: &mut dyn FnMut(&DownloadProgress)) -> Result<PathBuf> {
    let dir = cache_dir();
    let cache = Cache::new(dir.clone());
    let repo = Repo::with_revision(repo_id.to_owned(), RepoType::Model, revision.to_owned());
    let cached = cache.repo(repo.clone());

    // Offline-first: a complete cached snapshot needs no network at all.
    if let Some(config) = cached.get("config.json")
        && let Some(folder) = config.parent()
        && snapshot_complete(folder)
    {
        return Ok(folder.to_owned());
    }
    if offline() {
        return Err(Error::Hub(format!(
            "'{repo_id}' is not in the Hugging Face cache and HF_HUB_OFFLINE is set, so it cannot be downloaded. \
             Download it once with network access, or open a local model folder or .gguf file instead (cache: {})",
            dir.display()
        )));
    }

    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| cache.token());
    let mut builder = ApiBuilder::from_cache(cache.clone())
        .with_progress(false)
        .with_token(token)
        .with_retries(1);
    // A mirror or a test server instead of huggingface.co, as huggingface_hub reads it.
    if let Some(endpoint) = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()) {
        builder = builder.with_endpoint(endpoint.trim_end_matches('/').to_owned());
    }
    let api = builder
        .build()
        .map_err(|e| Error::Hub(format!("cannot set up Hub access: {e}")))?;
    let remote = api.repo(repo.clone());
    let mut get = |file: &str| -> Result<PathBuf> {
        if let Some(path) = cached.get(file) {
            return Ok(path);
        }
        let reporter = Reporter {
            file: file.to_owned(),
            downloaded: 0,
            total: 0,
            on_progress: &mut *on_progress,
        };
        remote
            .download_with_progress(file, reporter)
            .map_err(|e| hub_error(repo_id, file, &dir, e))
    };
    let config = get("config.json")?;
    get("tokenizer.json")?;
    match get("model.safetensors.index.json") {
        Ok(index) => {
            for shard in shard_names(&index)? {
                get(&shard)?;
            }
        }
        Err(_) => {
            get("model.safetensors")?;
        }
    }
    config
        .parent()
        .map(Path::to_owned)
        .ok_or_else(|| Error::Hub(format!("unexpected cache layout for '{repo_id}'")))
}

/// Whether a snapshot folder holds config, tokenizer and every weight file.
fn snapshot_complete(folder: &Path) -> bool {
    if !folder.join("config.json").is_file() || !folder.join("tokenizer.json").is_file() {
        return false;
    }
    let index = folder.join("model.safetensors.index.json");
    if index.is_file() {
        return shard_names(&index).is_ok_and(|names| names.iter().all(|n| folder.join(n).is_file()));
    }
    folder.join("model.safetensors").is_file()
}

fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io("reading the shard index", e, index))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::model_file(format!("shard index is not valid JSON ({e})"), index))?;
    let mut names: Vec<String> = json["weight_map"]
        .as_object()
        .map(|m| m.values().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    names.sort();
    names.dedup();
    Ok(names)
}

fn hub_error(repo_id: &str, file: &str, cache: &Path, err: ApiError) -> Error {
    let detail = err.to_string();
    let status = match &err {
        ApiError::RequestError(e) => match e.as_ref() {
            ureq::Error::Status(code, _) => Some(*code),
            ureq::Error::Transport(_) => None,
        },
        _ => None,
    };
    let message = match status {
        Some(401) | Some(403) => format!(
            "'{repo_id}' needs authorisation on the Hugging Face Hub (gated or private): set HF_TOKEN or run `huggingface-cli login`"
        ),
        Some(404) => format!("'{repo_id}' has no file '{file}' on the Hugging Face Hub, or the repo does not exist"),
        _ if matches!(err, ApiError::RequestError(_) | ApiError::TooManyRetries(_)) => format!(
            "cannot reach the Hugging Face Hub to download '{repo_id}' ({detail}), and it is not in the cache at {}. \
             Connect to the network, or open a local model folder or .gguf file",
            cache.display()
        ),
        _ => format!("downloading '{file}' of '{repo_id}' failed: {detail}"),
    };
    Error::Hub(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_told_from_paths() {
        assert!(is_repo_id("Qwen/Qwen3-0.6B"));
        assert!(is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!is_repo_id("model.gguf"));
        assert!(!is_repo_id("/abs/path"));
        assert!(!is_repo_id("./rel/path"));
        assert!(!is_repo_id("a/b/c"));
    }
}
