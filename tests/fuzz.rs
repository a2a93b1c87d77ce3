//! Fuzzing that keeps going, on stable Rust under `cargo test`: each loader is fed mutations of its
//! seed corpus (tests/fuzz/corpus/<target>/, written by `cargo run --example write_fuzz_corpus`)
//! and must answer every one with a value or an error, never a panic, an abort or an allocation
//! beyond [`MAX_ALLOCATION`]. The targets: the GGUF header reader (then its architecture, tokenizer
//! and tensor checks), config.json parsing, the safetensors header (then the tensor checks), and
//! tokenizer.json loading (then an encode).
//!
//! `cargo test --test fuzz` runs a bounded smoke version (a few seconds a target, what CI runs);
//! `PATCHBAY_FUZZ_EXECUTIONS=1000000 cargo test --release --test fuzz -- --nocapture` runs a
//! million executions per target and prints the counts (docs/FUZZING.md has the last run's).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Cursor;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use patchbay::model::config::ArchConfig;
use patchbay::model::{TextTokenizer, gguf, weights};

/// Any single allocation larger than this fails, which aborts the test process: a loader that
/// sizes a buffer from a number in the file, unchecked, is caught here.
const MAX_ALLOCATION: usize = 1 << 30;
/// The smoke run's time per target.
const SMOKE_SECONDS: f64 = 8.0;

/// The system allocator, refusing allocations over [`MAX_ALLOCATION`].
struct Capped;

// SAFETY: forwards to the system allocator, only refusing (null) what is over the cap, as an
// allocator may.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: as the caller promised for `layout`.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as the caller promised.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            return std::ptr::null_mut();
        }
        // SAFETY: as the caller promised.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Capped = Capped;

/// A deterministic random stream (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Numbers that find edge cases when written over a length, count or offset.
const INTERESTING: [u64; 10] = [
    0,
    1,
    2,
    0x7f,
    0xff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 32,
    1 << 62,
    u64::MAX,
];

/// One to four random edits of `input`: bit flips, bytes set, ranges deleted or repeated,
/// interesting little-endian integers written, a slice of another seed spliced in.
fn mutate(rng: &mut Rng, input: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len().max(1);
        let at = rng.below(len);
        match rng.below(7) {
            0 if !out.is_empty() => out[at] ^= 1 << rng.below(8),
            1 if !out.is_empty() => out[at] = [0, 0xff, 0x7f, 0x80, b'"', b'{', b'-'][rng.below(7)],
            2 => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at.min(end)..end);
            }
            3 => {
                let end = (at + 1 + rng.below(32)).min(out.len());
                let copy = out[at.min(end)..end].to_vec();
                out.splice(at..at, copy);
            }
            4 => {
                let value = INTERESTING[rng.below(INTERESTING.len())].to_le_bytes();
                let width = [1, 2, 4, 8][rng.below(4)];
                for (i, b) in value.iter().take(width).enumerate() {
                    if let Some(slot) = out.get_mut(at + i) {
                        *slot = *b;
                    }
                }
            }
            5 => {
                let other = &seeds[rng.below(seeds.len())];
                let from = rng.below(other.len().max(1));
                let end = (from + 1 + rng.below(64)).min(other.len());
                out.splice(at..at, other[from.min(end)..end].iter().copied());
            }
            _ => out.truncate(at),
        }
    }
    out
}

/// The seed corpus of `target`.
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = common::root().join("tests").join("fuzz").join("corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let seeds: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

/// How long and how much: `PATCHBAY_FUZZ_EXECUTIONS` runs that many, else the smoke run's time.
fn budget() -> (Option<u64>, Duration) {
    match std::env::var("PATCHBAY_FUZZ_EXECUTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(n) => (Some(n), Duration::MAX),
        None => (None, Duration::from_secs_f64(SMOKE_SECONDS)),
    }
}

/// Feeds `target` every seed, then mutations of them until the budget is spent. A panic fails the
/// test, naming the input (saved under the temporary folder to replay).
fn fuzz(name: &str, target: impl Fn(&[u8]) -> bool) {
    let seeds = seeds(name);
    let (executions, time) = budget();
    let mut rng = Rng(0x5eed ^ name.len() as u64);
    let started = Instant::now();
    let (mut runs, mut accepted) = (0u64, 0u64);
    loop {
        let input = match seeds.get(runs as usize) {
            Some(seed) => seed.clone(),
            None => {
                let seed = rng.below(seeds.len());
                mutate(&mut rng, &seeds[seed], &seeds)
            }
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input))) {
            Ok(ok) => accepted += u64::from(ok),
            Err(_) => {
                let path = std::env::temp_dir().join(format!("patchbay-fuzz-{name}-crash-{runs}.bin"));
                let _ = std::fs::write(&path, &input);
                panic!("{name}: execution {runs} panicked; the input is in {}", path.display());
            }
        }
        runs += 1;
        let done = match executions {
            Some(n) => runs >= n,
            None => runs % 64 == 0 && started.elapsed() >= time,
        };
        if done {
            break;
        }
    }
    eprintln!(
        "fuzz {name}: {runs} executions in {:.1} s ({} seeds, {accepted} inputs accepted, the rest refused with an error)",
        started.elapsed().as_secs_f64(),
        seeds.len()
    );
}

#[test]
fn gguf_header() {
    fuzz("gguf", |bytes| {
        let Ok(content) = gguf::read_header(&mut Cursor::new(bytes), bytes.len() as u64) else {
            return false;
        };
        let has_output = content.tensor_infos.contains_key("output.weight");
        let tokenizer = TextTokenizer::from_gguf(&content).map(|t| t.encode_prompt("ab a"));
        match ArchConfig::from_gguf(&content, has_output) {
            Ok(cfg) => {
                weights::check_checkpoint(&cfg, &gguf::tensor_list(&content, cfg.family)).is_ok() && tokenizer.is_ok()
            }
            Err(_) => false,
        }
    });
}

#[test]
fn config_json() {
    fuzz("config", |bytes| {
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(bytes) else {
            return false;
        };
        ArchConfig::from_hf_config(&json).map(|c| c.summary()).is_ok()
    });
}

#[test]
fn safetensors_header() {
    let cfg = common::fuzz_arch();
    fuzz("safetensors", |bytes| {
        weights::safetensors_header(bytes).is_ok_and(|tensors| weights::check_checkpoint(&cfg, &tensors).is_ok())
    });
}

#[test]
fn tokenizer_json() {
    fuzz("tokenizer", |bytes| {
        TextTokenizer::from_json(bytes).is_ok_and(|t| t.encode_prompt("ab a ba").is_ok())
    });
}
