//! The app over time, driven headless with egui_kittest: a hundred sweeps back to back. Its own
//! test binary, because it counts the process's live heap and nothing else may run beside it.

mod common;

use common::app::{harness, wait_until};
use common::{IOI_CLEAN, IOI_CORRUPTED, TempDir, write_tiny};
use egui_kittest::kittest::Queryable;

/// The system allocator, counting the bytes live in this test process: a leak shows here whatever
/// the allocator keeps cached.
struct Counting;

static LIVE_BYTES: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged, only counting sizes.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as the caller promised for `layout`.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: as the caller promised for `ptr` and `layout`.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            std::sync::atomic::Ordering::Relaxed,
        );
        // SAFETY: as the caller promised for `ptr`, `layout` and `new_size`.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Resident memory in bytes (`VmRSS`), or None off Linux: after handing the allocator's free
/// memory back (as the app does after a model load), so it counts what is live rather than what
/// malloc keeps cached.
fn rss_bytes() -> Option<u64> {
    patchbay::release_free_memory();
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The app over time: 100 sweeps back to back, switching component every sweep, prompts every
/// third and the model every tenth (between two architectures), each drawing its estimate first.
/// The process's RSS after sweep 100 stays within 5% of that after sweep 10, and the heap's live
/// bytes grow by at most one step (a cache filling once) and otherwise ≤ 5% (a leak would grow
/// them sweep by sweep). Each of the 100 Runs must start a sweep: an earlier version clicked by pointer
/// position, sometimes hit Save figure… instead, and the file dialog's libdbus (~2 MiB of library
/// pages) was the 5–6% RSS step once seen here.
#[test]
fn a_hundred_sweeps_keep_memory_flat() {
    let (qwen_dir, llama_dir) = (TempDir::new("soak-qwen3"), TempDir::new("soak-llama"));
    let models = [
        write_tiny(&qwen_dir, "tiny-qwen3"),
        write_tiny(&llama_dir, "tiny-llama"),
    ];
    let components = patchbay::patching::Component::ALL;
    let prompts = [
        (IOI_CLEAN.to_owned(), IOI_CORRUPTED.to_owned()),
        (IOI_CORRUPTED.to_owned(), IOI_CLEAN.to_owned()),
        (
            "After Mary and John went to the store, Mary gave a bottle of milk to".to_owned(),
            "After Mary and John went to the store, John gave a bottle of milk to".to_owned(),
        ),
    ];
    let mut h = harness(&models[0]);
    wait_until(&mut h, "the model to load", |a| a.model().is_some());
    let (mut after_10, mut after_100) = (None, None);
    let live = || LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed);
    let (mut live_10, mut live_100) = (0, 0);
    let mut live_every_10 = Vec::new();
    for sweep in 1..=100 {
        if sweep % 10 == 0 {
            let next = &models[(sweep / 10) % 2];
            h.state_mut().load_model(next);
            wait_until(&mut h, "the model switch", |a| !a.is_busy() && a.model().is_some());
        }
        let settings = h.state_mut().settings_mut();
        settings.component = components[sweep % components.len()];
        let (clean, corrupted) = &prompts[(sweep / 3) % prompts.len()];
        (settings.clean, settings.corrupted) = (clean.clone(), corrupted.clone());
        h.run_steps(2);
        // Through accesskit, not a pointer at last frame's position: the left panel can still be
        // settling two frames after a settings change, and a pointer click then lands on the
        // button below Run (Save figure…), so that sweep silently never ran.
        let started = h.state().sweeps_started();
        h.get_by_label("Run").click_accesskit();
        wait_until(&mut h, "the sweep", |a| {
            a.sweeps_started() == started + 1 && a.result().is_some_and(|r| r.complete) && !a.is_busy()
        });
        assert!(
            h.state().sweep_error().is_none(),
            "sweep {sweep}: {:?}",
            h.state().sweep_error()
        );
        match sweep {
            10 => (after_10, live_10) = (rss_bytes(), live()),
            100 => (after_100, live_100) = (rss_bytes(), live()),
            _ => {}
        }
        if sweep % 10 == 0 {
            live_every_10.push(live());
            eprintln!(
                "soak: after sweep {sweep}: live heap {:.2} MiB, RSS {:.1} MiB",
                live() as f64 / (1 << 20) as f64,
                rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64
            );
        }
    }
    let mib = |b: f64| b / (1 << 20) as f64;
    if let (Some(at_10), Some(at_100)) = (after_10, after_100) {
        eprintln!(
            "soak: RSS after sweep 10 {:.1} MiB, after sweep 100 {:.1} MiB ({:+.2}%)",
            mib(at_10 as f64),
            mib(at_100 as f64),
            100.0 * (at_100 as f64 / at_10 as f64 - 1.0)
        );
        assert!(
            at_100 as f64 <= at_10 as f64 * 1.05,
            "RSS grew from {:.1} MiB to {:.1} MiB",
            mib(at_10 as f64),
            mib(at_100 as f64)
        );
    }
    eprintln!(
        "soak: live heap after sweep 10 {:.2} MiB, after sweep 100 {:.2} MiB ({:+.2}%)",
        mib(live_10 as f64),
        mib(live_100 as f64),
        100.0 * (live_100 as f64 / live_10 as f64 - 1.0)
    );
    // A leak grows the heap sweep after sweep; a cache that fills once (egui's font atlas grows
    // a step when new glyphs and sizes first show, ~1 MiB, at no fixed sweep) is one step. So: at
    // most one ten-sweep step of more than 2%, and without the largest step the heap grows ≤ 5%.
    let steps: Vec<f64> = live_every_10
        .windows(2)
        .map(|w| w[1] as f64 / w[0] as f64 - 1.0)
        .collect();
    let jumps = steps.iter().filter(|&&g| g > 0.02).count();
    let largest = steps.iter().copied().fold(0.0, f64::max);
    let growth = live_100 as f64 / live_10 as f64 / (1.0 + largest) - 1.0;
    assert!(
        jumps <= 1 && growth <= 0.05,
        "the live heap grew from {:.2} MiB to {:.2} MiB ({jumps} steps over 2%, {:.1}% besides the largest): {:?}",
        mib(live_10 as f64),
        mib(live_100 as f64),
        100.0 * growth,
        live_every_10.iter().map(|&b| mib(b as f64)).collect::<Vec<_>>()
    );
}
