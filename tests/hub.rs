//! The Hub download path, for real: `patchbay info --model owner/name` against a local HTTP server
//! that answers as the Hugging Face Hub does (`HF_ENDPOINT`), serving the tiny reference model.
//! Byte progress, a sharded checkpoint, a download cut off mid-file and resumed, a gated repo with
//! and without `HF_TOKEN`, an unknown repo, and a second start offline from the cache; then the app
//! on the same Hub, showing the same messages.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::Tensor;
use common::{TempDir, write_tiny};

/// The token the gated repo accepts.
const TOKEN: &str = "hf_test_token";
/// The commit every file claims to come from.
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// A Hub-like server on 127.0.0.1: `GET /{owner}/{name}/resolve/{revision}/{file}` with `Range`.
struct Hub {
    /// Files per repo id.
    repos: HashMap<String, HashMap<String, Vec<u8>>>,
    /// Repos that answer 401 without `Authorization: Bearer {TOKEN}`.
    gated: Vec<String>,
    /// Cut the next download of this file after half its bytes (once).
    cut: Mutex<Option<String>>,
    /// Requests served (the offline start must make none).
    requests: AtomicUsize,
}

impl Hub {
    /// Serves on a free port until the process ends; returns the endpoint URL.
    fn start(self) -> (String, Arc<Hub>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a local port");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let hub = Arc::new(self);
        let served = hub.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let hub = served.clone();
                std::thread::spawn(move || hub.answer(stream));
            }
        });
        (endpoint, hub)
    }

    fn answer(&self, mut stream: TcpStream) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).is_err() {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        let reply = |stream: &mut TcpStream, status: &str, extra: &str, body: &[u8]| {
            let head = format!(
                "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(body);
        };
        let [owner, name, "resolve", _revision, file] = parts[..] else {
            return reply(&mut stream, "404 Not Found", "", b"not found");
        };
        let repo_id = format!("{owner}/{name}");
        let Some(files) = self.repos.get(&repo_id) else {
            return reply(&mut stream, "404 Not Found", "X-Error-Code: RepoNotFound\r\n", b"");
        };
        let authorised = headers
            .get("authorization")
            .is_some_and(|a| a == &format!("Bearer {TOKEN}"));
        if self.gated.contains(&repo_id) && !authorised {
            return reply(&mut stream, "401 Unauthorized", "X-Error-Code: GatedRepo\r\n", b"");
        }
        let Some(bytes) = files.get(file) else {
            return reply(&mut stream, "404 Not Found", "X-Error-Code: EntryNotFound\r\n", b"");
        };
        let start: usize = headers
            .get("range")
            .and_then(|r| r.strip_prefix("bytes=")?.split('-').next()?.parse().ok())
            .unwrap_or(0);
        let end = match headers
            .get("range")
            .and_then(|r| r.split('-').nth(1)?.parse::<usize>().ok())
        {
            Some(last) => last + 1,
            None => bytes.len(),
        };
        let body = &bytes[start.min(bytes.len())..end.min(bytes.len())];
        let etag = format!("\"{:016x}{}\"", fnv(bytes), file.len());
        let extra = format!(
            "ETag: {etag}\r\nX-Repo-Commit: {COMMIT}\r\nContent-Range: bytes {start}-{}/{}\r\n",
            end.saturating_sub(1),
            bytes.len()
        );
        let cut_now = end - start > 1 && {
            let mut cut = self.cut.lock().unwrap();
            (cut.as_deref() == Some(file)).then(|| cut.take()).is_some()
        };
        if cut_now {
            // Promise the whole body, send half, hang up: a connection lost mid-download.
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body[..body.len() / 2]);
            let _ = stream.flush();
            return;
        }
        reply(&mut stream, "206 Partial Content", &extra, body);
    }
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The files of a model folder, by name.
fn read_folder(dir: &Path) -> HashMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The tiny model's weights split into two shards with a `model.safetensors.index.json`.
fn sharded(files: &HashMap<String, Vec<u8>>, scratch: &Path) -> HashMap<String, Vec<u8>> {
    let single = scratch.join("single.safetensors");
    std::fs::write(&single, &files["model.safetensors"]).unwrap();
    let tensors = candle_core::safetensors::load(&single, &candle_core::Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let mut out: HashMap<String, Vec<u8>> = files
        .iter()
        .filter(|(name, _)| *name != "model.safetensors")
        .map(|(n, b)| (n.clone(), b.clone()))
        .collect();
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let shard = format!("model-{:05}-of-00002.safetensors", i + 1);
        let part: HashMap<String, Tensor> = chunk.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        let path = scratch.join(&shard);
        candle_core::safetensors::save(&part, &path).unwrap();
        out.insert(shard.clone(), std::fs::read(&path).unwrap());
        for n in chunk {
            weight_map.insert((*n).clone(), shard.clone().into());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    out.insert("model.safetensors.index.json".into(), index.to_string().into_bytes());
    out
}

/// `patchbay info --model {repo}` with the Hub at `endpoint` and the cache in `cache`.
fn info(repo: &str, endpoint: &str, cache: &Path, extra_env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_patchbay"));
    cmd.args(["info", "--model", repo])
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_CACHE", cache)
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_HOME");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("patchbay runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn models_download_from_a_hub_and_load_offline_afterwards() {
    let model_dir = TempDir::new("hub-model");
    write_tiny(&model_dir, "tiny-qwen3");
    let files = read_folder(&model_dir.0);
    let scratch = TempDir::new("hub-scratch");
    let mut repos = HashMap::new();
    repos.insert("test/tiny".to_owned(), files.clone());
    repos.insert("test/sharded".to_owned(), sharded(&files, &scratch.0));
    repos.insert("test/gated".to_owned(), files.clone());
    let hub = Hub {
        repos,
        gated: vec!["test/gated".to_owned()],
        cut: Mutex::new(Some("model.safetensors".to_owned())),
        requests: AtomicUsize::new(0),
    };
    let (endpoint, hub) = hub.start();
    let cache = TempDir::new("hub-cache");

    // A download cut off half-way through the weights: resumed, and the model loads.
    let (code, stdout, stderr) = info("test/tiny", &endpoint, &cache.0, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("Qwen3ForCausalLM") && stdout.contains("layers         3"),
        "{stdout}"
    );
    // Byte progress for each file.
    assert!(
        stderr.contains("downloading model.safetensors:") && stderr.contains("MB"),
        "{stderr}"
    );
    assert!(hub.cut.lock().unwrap().is_none(), "the cut happened");
    let snapshot = cache.0.join("models--test--tiny").join("snapshots").join(COMMIT);
    assert_eq!(
        std::fs::read(snapshot.join("model.safetensors")).unwrap(),
        files["model.safetensors"],
        "the resumed download is the file, byte for byte"
    );

    // A sharded checkpoint.
    let (code, stdout, stderr) = info("test/sharded", &endpoint, &cache.0, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("Qwen3ForCausalLM"), "{stdout}");
    assert!(stderr.contains("model-00002-of-00002.safetensors"), "{stderr}");

    // A gated repo: refused without a token, saying what to do; loaded with one.
    let (code, _, stderr) = info("test/gated", &endpoint, &cache.0, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("needs authorisation") && stderr.contains("HF_TOKEN"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let (code, stdout, stderr) = info("test/gated", &endpoint, &cache.0, &[("HF_TOKEN", TOKEN)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("Qwen3ForCausalLM"), "{stdout}");

    // An unknown repo.
    let (code, _, stderr) = info("test/no-such-model", &endpoint, &cache.0, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("'test/no-such-model' has no file 'config.json'"),
        "{stderr}"
    );

    // A second start, offline: from the cache, without a single request.
    let before = hub.requests.load(Ordering::Relaxed);
    let (code, stdout, stderr) = info("test/tiny", &endpoint, &cache.0, &[("HF_HUB_OFFLINE", "1")]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("Qwen3ForCausalLM"), "{stdout}");
    assert_eq!(hub.requests.load(Ordering::Relaxed), before, "no request offline");
    // And with the Hub gone altogether.
    let (code, _, stderr) = info("test/sharded", "http://127.0.0.1:9", &cache.0, &[]);
    assert_eq!(code, 0, "{stderr}");

    // Offline and not cached: said plainly.
    let (code, _, stderr) = info("test/elsewhere", &endpoint, &cache.0, &[("HF_HUB_OFFLINE", "1")]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
        "{stderr}"
    );
}
