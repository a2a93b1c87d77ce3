//! The command line, as a user meets it: refusals before any work, outputs written safely, the
//! progress and estimate, Ctrl-C and SIGTERM, the benchmark. Each test runs the `patchbay` binary.

mod common;

use std::process::Command;

use common::{
    IOI_ARGS, IOI_CLEAN, IOI_CORRUPTED, TempDir, fixture_json, ioi_request, load_folder, write_tiny, write_tiny_model,
};
use patchbay::patching::{Component, Sweep};

/// `patchbay sweep --model <model>` on the IOI prompts, then `extra`.
fn ioi_sweep<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["sweep", "--model", model];
    args.extend(IOI_ARGS);
    args.extend(extra);
    args
}

fn patchbay(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_patchbay"));
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("patchbay runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// candle appends a backtrace to its errors when `RUST_BACKTRACE` is set, as it often is on a
/// developer's machine; the message a user reads stays one line.
#[test]
fn cli_errors_stay_one_line_with_rust_backtrace_set() {
    let dir = TempDir::new("cli-backtrace");
    let fake = dir.0.join("fake.gguf");
    std::fs::write(&fake, b"this is not a gguf file at all").unwrap();
    let (code, _, stderr) = patchbay(&["info", "--model", fake.to_str().unwrap()], &[("RUST_BACKTRACE", "1")]);
    assert_eq!(code, 1, "{stderr}");
    let error: Vec<&str> = stderr.lines().filter(|l| !l.ends_with("...")).collect();
    assert_eq!(error.len(), 1, "{stderr}");
    assert!(
        error[0].starts_with("error: not a readable GGUF file (unknown magic") && error[0].ends_with("fake.gguf"),
        "{stderr}"
    );
}

/// Options name typed choices: a misspelt component, schedule, device or dtype is refused by the
/// argument parser, listing the valid values, before any model is loaded.
#[test]
fn cli_refuses_unknown_choices_listing_the_valid_ones() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["--component", "resid"],
            "resid_post, resid_pre, resid_mid, attn_out, mlp_out, block, head_out",
        ),
        (
            &["--metric", "accuracy"],
            "logit_diff, normalized, logprob, prob, kl, rank",
        ),
        (&["--schedule", "quick"], "fast, naive"),
        (&["--dtype", "f64"], "auto, f32, bf16, f16"),
        (&["--device", "tpu"], "use cpu, cuda or cuda:N"),
        (
            &["--dtype", "bfloat16", "--device", "cuda:x"],
            "use cpu, cuda or cuda:N",
        ),
    ];
    for (extra, expected) in cases {
        let (code, _, stderr) = patchbay(&ioi_sweep("no/such-model", extra), &[]);
        assert_eq!(code, 2, "{extra:?}: {stderr}");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
    // The app's launch checks them before a window opens.
    let (code, _, stderr) = patchbay(&["gui", "--component", "attn"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("attn_out"), "{stderr}");
    let (code, _, stderr) = patchbay(&["bench", "--schedules", "fast,slow"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("fast, naive"), "{stderr}");
}

/// An output that cannot be written is refused before the sweep when that can be known (a
/// missing folder, a folder given as the file); when the write itself fails after the sweep, the
/// results are saved to the temporary folder instead and the error says where.
#[test]
fn cli_unwritable_outputs_lose_no_results() {
    let dir = TempDir::new("cli-unwritable");
    let model = write_tiny(&dir, "tiny-qwen3");
    // The model's folder, given as the output file.
    let (code, stdout, stderr) = patchbay(&ioi_sweep(&model, &["--out", &model]), &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("this is a folder"), "{stderr}");
    assert!(!stdout.contains("timing"), "refused before the sweep: {stdout}");

    // A file name longer than the file system allows: the folder exists, the write fails.
    let too_long = dir.0.join(format!("{}.json", "x".repeat(300)));
    let (code, stdout, stderr) = patchbay(&ioi_sweep(&model, &["--out", too_long.to_str().unwrap()]), &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.contains("timing"), "the sweep ran: {stdout}");
    let saved = stderr
        .split("The results are saved in ")
        .nth(1)
        .and_then(|rest| rest.split(" instead").next())
        .unwrap_or_else(|| panic!("no rescue file named in: {stderr}"));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(saved).unwrap()).unwrap();
    std::fs::remove_file(saved).unwrap();
    assert_eq!(json["complete"], true);
    assert_eq!(json["shape"], serde_json::json!([3, 16]));

    // The JSON written, the CSV not: the error says so, and the JSON holds the results.
    let out = dir.0.join("r.json");
    let csv_too_long = dir.0.join(format!("{}.csv", "x".repeat(300)));
    let (code, stdout, stderr) = patchbay(
        &ioi_sweep(
            &model,
            &["--out", out.to_str().unwrap(), "--csv", csv_too_long.to_str().unwrap()],
        ),
        &[],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.contains("wrote") && stdout.contains("r.json"), "{stdout}");
    assert!(
        stderr.contains("File name too long") && !stderr.contains("saved in"),
        "{stderr}"
    );
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(json["complete"], true);
}

#[test]
fn cli_unknown_repo_offline_says_so_without_panicking() {
    let cache = TempDir::new("empty-hf-cache");
    let cache_path = cache.0.to_string_lossy().into_owned();
    let (code, _, stderr) = patchbay(
        &ioi_sweep("nobody/no-such-model", &[]),
        &[("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", &cache_path)],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("'nobody/no-such-model' is not in the Hugging Face cache"),
        "{stderr}"
    );
    assert!(stderr.contains("HF_HUB_OFFLINE"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn cli_cuda_without_cuda_is_explained() {
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = TempDir::new("cli-cuda");
    let model = write_tiny(&dir, "tiny-qwen3");
    let (code, _, stderr) = patchbay(&ioi_sweep(&model, &["--device", "cuda"]), &[]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("no CUDA support") && stderr.contains("--features cuda"),
        "{stderr}"
    );
}

#[test]
fn cli_sweep_writes_json_csv_npy_and_refuses_multi_token_answers() {
    let dir = TempDir::new("cli-sweep");
    let reference = fixture_json("tiny_reference.json");
    let model_dir = dir.0.join("model");
    write_tiny_model(&model_dir, &reference["models"][1]["config"]);
    let model = model_dir.to_string_lossy().into_owned();
    let out = dir.0.join("r.json");
    let csv = dir.0.join("r.csv");
    let npy = dir.0.join("r.npy");
    let png = dir.0.join("r.png");
    let svg = dir.0.join("r.svg");
    let (code, stdout, stderr) = patchbay(
        &ioi_sweep(
            &model,
            &[
                "--component",
                "mlp_out",
                "--out",
                out.to_str().unwrap(),
                "--csv",
                csv.to_str().unwrap(),
                "--npy",
                npy.to_str().unwrap(),
                "--png",
                png.to_str().unwrap(),
                "--svg",
                svg.to_str().unwrap(),
            ],
        ),
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    // Figures: a real PNG and an SVG whose title names model, component and metric.
    let png_bytes = std::fs::read(&png).unwrap();
    assert!(
        png_bytes.starts_with(b"\x89PNG\r\n\x1a\n") && png_bytes.len() > 5_000,
        "{} bytes",
        png_bytes.len()
    );
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.starts_with("<svg") || svg_text.contains("<svg"), "SVG");
    assert!(svg_text.contains("mlp_out (denoising), normalized"), "title in SVG");
    assert!(svg_text.contains("bottle_12"), "token tick labels in SVG");
    assert!(stdout.contains("mlp_out patching"), "{stdout}");
    assert!(stderr.contains("cells"), "progress bar on stderr: {stderr}");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(json["component"], "mlp_out");
    assert_eq!(json["shape"], serde_json::json!([3, 16]));
    assert_eq!(json["clean"]["token_ids"].as_array().unwrap().len(), 16);
    let expected = reference["models"][1]["patched_logit_diff"]["mlp_out"][2][15]
        .as_f64()
        .unwrap();
    assert!((json["patched_logit_diff"][2][15].as_f64().unwrap() - expected).abs() < 2e-4);
    let csv_text = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv_text.lines().count(), 1 + 3 * 16);
    let npy_bytes = std::fs::read(&npy).unwrap();
    assert!(npy_bytes.starts_with(b"\x93NUMPY"));
    assert_eq!(npy_bytes.len() % 16, (128 + 3 * 16 * 8) % 16);

    let (code, _, stderr) = patchbay(
        &[
            "sweep",
            "--model",
            &model,
            "--clean",
            IOI_CLEAN,
            "--corrupted",
            IOI_CORRUPTED,
            "--correct",
            " Johnathan",
            "--incorrect",
            " Mary",
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(stderr.contains("exactly one token"), "{stderr}");
}

#[test]
fn cli_loads_a_hub_repo_id_from_a_populated_cache_offline() {
    // The Hugging Face cache layout Python writes: refs/main names a snapshot holding the files.
    let cache = TempDir::new("hf-cache");
    let repo = cache.0.join("models--tiny--qwen3");
    let snapshot = repo.join("snapshots").join("0123456789abcdef");
    let reference = fixture_json("tiny_reference.json");
    write_tiny_model(&snapshot, &reference["models"][0]["config"]);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123456789abcdef").unwrap();
    let cache_path = cache.0.to_string_lossy().into_owned();
    let (code, stdout, stderr) = patchbay(
        &["info", "--model", "tiny/qwen3"],
        &[("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", &cache_path)],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("Qwen3ForCausalLM") && stdout.contains("tiny/qwen3"),
        "{stdout}"
    );
    // HF_HOME/hub is used when HF_HUB_CACHE is unset.
    let home = TempDir::new("hf-home");
    std::fs::rename(&cache.0, home.0.join("hub")).unwrap();
    let home_path = home.0.to_string_lossy().into_owned();
    let (code, _, stderr) = patchbay(
        &["info", "--model", "tiny/qwen3"],
        &[("HF_HUB_OFFLINE", "1"), ("HF_HOME", &home_path), ("HF_HUB_CACHE", "")],
    );
    assert_eq!(code, 0, "{stderr}");
}

/// `patchbay bench` end to end on a tiny model: the notebook-loop naive baseline (no-op cells run)
/// and its no-op-free time, the speed-up lines, the schedules' gap; `--naive-noops skip` drops them.
#[test]
fn cli_bench_reports_the_notebook_baseline_and_its_no_op_share() {
    let dir = TempDir::new("cli-bench");
    let model = write_tiny(&dir, "tiny-qwen3");
    let (code, stdout, stderr) = patchbay(&["bench", "--model", &model, "--rounds", "1"], &[]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let naive_round = stdout
        .lines()
        .find(|l| l.starts_with("round 1   naive"))
        .unwrap_or_else(|| panic!("no naive round in:\n{stdout}"));
    assert!(
        naive_round.contains("    0 skipped") && naive_round.contains("(no-op cells "),
        "{naive_round}"
    );
    for expected in [
        "no-op cells included (a notebook loop)",
        "without the no-op cells' forwards",
        "speed-up naive / fast = ",
        "speed-up with naive's no-op cells left out = ",
        "largest raw logit-difference gap between naive and fast",
        "warm-up ",
        "where round 1's time went",
        "  naive baselines ",
        "  fast  baselines ",
        "median forward ",
        "token-layers/s), cells ",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?} in:\n{stdout}");
    }

    let (code, stdout, stderr) = patchbay(
        &[
            "bench",
            "--model",
            &model,
            "--rounds",
            "1",
            "--naive-noops",
            "skip",
            "--no-warmup",
        ],
        &[],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains("no-op cells skipped"), "{stdout}");
    assert!(!stdout.contains("warm-up"), "{stdout}");
    assert!(!stdout.contains("without the no-op cells' forwards"), "{stdout}");
    let (code, _, stderr) = patchbay(&["bench", "--model", &model, "--naive-noops", "maybe"], &[]);
    assert_ne!(code, 0);
    assert!(stderr.contains("maybe"), "{stderr}");
}

/// Ctrl-C during `patchbay sweep` stops it after the forward in flight and still writes what was
/// computed (`"complete": false`), exiting 130 as a shell expects of an interrupted program.
#[cfg(unix)]
#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the SmolLM2 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn cli_ctrl_c_mid_sweep_writes_the_cells_computed_so_far() {
    interrupt_mid_sweep(libc::SIGINT);
}

#[cfg(unix)]
#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the SmolLM2 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn cli_sigterm_mid_sweep_writes_the_cells_computed_so_far() {
    interrupt_mid_sweep(libc::SIGTERM);
}

/// Ctrl-C while the model loads quits at once, cleanly, writing nothing.
#[cfg(unix)]
#[test]
#[cfg_attr(
    skip_model_tests,
    ignore = "needs the SmolLM2 test model; PATCHBAY_SKIP_MODEL_TESTS is set"
)]
fn cli_ctrl_c_while_loading_quits_cleanly() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let dir = TempDir::new("cli-interrupt-load");
    let out = dir.0.join("never.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_patchbay"))
        .args(["sweep", "--model", common::smollm2_gguf().to_str().unwrap()])
        .args(IOI_ARGS)
        .args(["--out", out.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("patchbay starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    // The first loading stage; dequantizing follows, for a second or more in a debug build.
    while !seen.contains("reading GGUF") {
        assert!(stderr.read_line(&mut seen).unwrap() > 0, "patchbay ended early: {seen}");
    }
    // SAFETY: signals our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) }, 0);
    let status = child.wait().unwrap();
    std::io::Read::read_to_string(&mut stderr, &mut seen).unwrap();
    assert_eq!(status.code(), Some(130), "{seen}");
    assert!(seen.contains("cancelled while loading the model"), "{seen}");
    assert!(!seen.contains("panicked"), "{seen}");
    assert!(!out.exists());
}

/// Sends `signal` to a naive SmolLM2 sweep once its cells have started: it stops and writes what
/// it computed, with `"complete": false` and exit status 130.
#[cfg(unix)]
fn interrupt_mid_sweep(signal: libc::c_int) {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;

    let gguf = common::smollm2_gguf();
    let dir = TempDir::new("cli-interrupt");
    let out = dir.0.join("partial.json");
    // The naive schedule, one forward per cell: minutes in a debug build, so it is still running
    // when the signal comes.
    let mut child = Command::new(env!("CARGO_BIN_EXE_patchbay"))
        .args([
            "sweep",
            "--model",
            gguf.to_str().unwrap(),
            "--schedule",
            "naive",
            "--quiet",
        ])
        .args(IOI_ARGS)
        .args(["--out", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("patchbay starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    // The "answers" line comes after the baselines, just before the cells.
    while !seen.contains("answers") {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "patchbay ended early: {seen}");
        seen.push_str(&line);
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: signals our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, signal) }, 0);
    let status = child.wait().unwrap();
    stdout.read_to_string(&mut seen).unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "stdout: {seen}\nstderr: {stderr}");
    assert!(
        stderr.contains("cancelled:") && stderr.contains("partial.json"),
        "{stderr}"
    );
    assert!(seen.contains("wrote") && seen.contains("timing"), "{seen}");

    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(written["complete"], false);
    assert!(written["error"].is_null());
    let cells: Vec<&serde_json::Value> = written["patched_logit_diff"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap())
        .collect();
    let done = cells.iter().filter(|v| v.is_number()).count();
    // The no-op cells (9 positions × 30 layers) at least, and far from all 480.
    assert!((270..480).contains(&done), "{done} cells written");
}

/// Outputs never replace what their path points to: a symlink's target is written and the link
/// kept, a device or FIFO is written directly, `-` is standard output; an output naming the model
/// or another output is refused before the sweep.
#[test]
fn cli_outputs_never_clobber_what_the_path_points_to() {
    use std::os::unix::fs::FileTypeExt;

    let dir = TempDir::new("cli-outputs");
    let model_dir = TempDir::new("cli-outputs-model");
    let model = write_tiny(&model_dir, "tiny-qwen3");
    let path = |name: &str| dir.0.join(name).to_string_lossy().into_owned();

    // A symlink: the file it points to gets the results, the link stays a link.
    std::fs::write(dir.0.join("real.json"), "old").unwrap();
    std::os::unix::fs::symlink("real.json", dir.0.join("link.json")).unwrap();
    let (code, _, stderr) = patchbay(&ioi_sweep(&model, &["--out", &path("link.json"), "-q"]), &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        std::fs::symlink_metadata(dir.0.join("link.json"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.0.join("real.json")).unwrap()).unwrap();
    assert_eq!(written["shape"], serde_json::json!([3, 16]));

    // A FIFO is written into, not replaced by a file.
    let fifo = dir.0.join("pipe.csv");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    let (code, _, stderr) = patchbay(&ioi_sweep(&model, &["--csv", fifo.to_str().unwrap(), "-q"]), &[]);
    assert_eq!(code, 0, "{stderr}");
    let csv = reader.join().unwrap();
    assert!(
        csv.starts_with("layer,position,") && csv.lines().count() == 1 + 3 * 16,
        "{csv}"
    );
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());

    // A device stays a device (CI runs as root, who could replace it).
    let (code, _, stderr) = patchbay(&ioi_sweep(&model, &["--out", "/dev/null", "-q"]), &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());

    // /dev/stdout names a pipe here: written into, as any device.
    let (code, stdout, stderr) = patchbay(&ioi_sweep(&model, &["--out", "/dev/stdout", "-q"]), &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("\"format\": \"patchbay.sweep.v1\""), "{stdout}");

    // `-`: the JSON on standard output, the report on stderr.
    let (code, stdout, stderr) = patchbay(&ioi_sweep(&model, &["--out", "-", "-q"]), &[]);
    assert_eq!(code, 0, "{stderr}");
    let json: serde_json::Value = serde_json::from_str(&stdout).expect("stdout is the JSON alone");
    assert_eq!(json["component"], "resid_post");
    assert!(stderr.contains("timing"), "{stderr}");

    // Refused before the sweep: the model's own files, two outputs on one file.
    let config = model_dir.0.join("config.json");
    let before = std::fs::read(&config).unwrap();
    let (code, _, stderr) = patchbay(&ioi_sweep(&model, &["--out", config.to_str().unwrap()]), &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("over the model being swept"), "{stderr}");
    assert_eq!(std::fs::read(&config).unwrap(), before);
    let (code, _, stderr) = patchbay(
        &ioi_sweep(&model, &["--out", &path("same"), "--csv", &path("./same")]),
        &[],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("two outputs name the same file"), "{stderr}");
    assert!(!dir.0.join("same").exists());
}

/// Work is bounded: a sweep with more cells than `--max-cells` is refused with its count and an
/// estimate, and top-k has a ceiling (in the CLI's parser and in the engine).
#[test]
fn cli_bounds_the_work_a_sweep_may_take() {
    let dir = TempDir::new("cli-bounds");
    let model = write_tiny(&dir, "tiny-qwen3");
    // IOI on the 3-layer model: 3 layers × positions 9..16.
    let (code, stdout, stderr) = patchbay(&ioi_sweep(&model, &["-q"]), &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("cells     21 to compute (27 skipped as no-ops), about"),
        "{stdout}"
    );
    let (code, _, stderr) = patchbay(&ioi_sweep(&model, &["--max-cells", "20"]), &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("this sweep has 21 cells to compute, about") && stderr.contains("--max-cells 21"),
        "{stderr}"
    );
    let (code, _, stderr) = patchbay(&ioi_sweep(&model, &["--top-k", "101"]), &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("0..=100"), "{stderr}");
    let loaded = load_folder(std::path::Path::new(&model));
    match Sweep::prepare(&loaded, &ioi_request(Component::ResidPost), 101) {
        Err(e) => assert!(e.to_string().contains("at most 100"), "{e}"),
        Ok(_) => panic!("top-k 101 accepted"),
    }
}

/// Head sweeps from the command line: `--by-position` on a component without heads is refused
/// with a message; a noising head sweep by position writes a `[layer][position][head]` JSON with
/// every metric, and the `--metric` grid as a 3-D `.npy`.
#[test]
fn cli_head_sweeps_by_position_noising_under_kl() {
    let dir = TempDir::new("cli-heads");
    let model = write_tiny(&dir, "tiny-qwen3");
    let (code, _, stderr) = patchbay(&ioi_sweep(&model, &["--component", "resid_post", "--by-position"]), &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--by-position applies to head components"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // A config without head counts: the model is refused with the field named, before any sweep.
    let headless = TempDir::new("cli-heads-missing");
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(std::path::Path::new(&model).join(file), headless.0.join(file)).unwrap();
    }
    let config_path = headless.0.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config.as_object_mut().unwrap().remove("num_attention_heads");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let (code, _, stderr) = patchbay(
        &ioi_sweep(headless.0.to_str().unwrap(), &["--component", "head_out"]),
        &[],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("lacks the integer field 'num_attention_heads'"),
        "{stderr}"
    );

    let (json, npy) = (dir.0.join("heads.json"), dir.0.join("heads.npy"));
    let extra = [
        "--component",
        "head_v",
        "--by-position",
        "--direction",
        "noising",
        "--metric",
        "kl",
        "--out",
        json.to_str().unwrap(),
        "--npy",
        npy.to_str().unwrap(),
    ];
    let (code, stdout, stderr) = patchbay(&ioi_sweep(&model, &extra), &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("head_v patching (noising), kl"), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // tiny-qwen3: 3 layers, 16 positions, 2 key/value heads each serving 2 query heads.
    assert_eq!(r["shape"], serde_json::json!([3, 16, 2]));
    assert_eq!(r["axes"], serde_json::json!(["layer", "position", "head"]));
    assert_eq!(r["query_heads_of_kv_head"], serde_json::json!([[0, 1], [2, 3]]));
    assert_eq!(r["direction"], "noising");
    for m in ["logit_diff", "normalized", "logprob", "prob", "kl", "rank"] {
        assert_eq!(r["metrics"][m][2][15].as_array().map(Vec::len), Some(2), "{m}");
    }
    // A no-op cell of a noising sweep is the clean run: KL(clean ‖ clean) = 0, to f32 rounding.
    assert!(r["metrics"]["kl"][0][0][0].as_f64().unwrap().abs() < 1e-5);
    let bytes = std::fs::read(&npy).unwrap();
    let header = String::from_utf8_lossy(&bytes[10..80]);
    assert!(header.contains("'shape': (3, 16, 2)"), "{header}");
    assert_eq!(bytes.len() % 64, (3 * 16 * 2 * 8) % 64);
}

/// `--estimate` draws the estimate, `--exact top:K --sample S` verifies the top K and S more, the
/// JSON and CSV carry the estimate and the verified mask, and `--show` draws the estimate or the
/// difference (refused without an estimate).
#[test]
fn cli_estimate_verifies_the_top_cells_and_writes_the_estimate() {
    let dir = TempDir::new("cli-estimate");
    let model = write_tiny(&dir, "tiny-qwen3");
    let (json, csv, npy) = (dir.0.join("r.json"), dir.0.join("r.csv"), dir.0.join("est.npy"));
    let args = ioi_sweep(
        &model,
        &[
            "--estimate",
            "atp-star",
            "--exact",
            "top:4",
            "--sample",
            "2",
            "--show",
            "estimate",
            "--out",
            json.to_str().unwrap(),
            "--csv",
            csv.to_str().unwrap(),
            "--npy",
            npy.to_str().unwrap(),
            "-q",
        ],
    );
    let (code, stdout, stderr) = patchbay(&args, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("estimate  AtP* in"), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["estimate"]["method"], "atp_star");
    let verified: Vec<bool> = r["verified"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_bool().unwrap()))
        .collect();
    let skipped = r["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().clone())
        .filter(|v| v.as_bool().unwrap())
        .count();
    // No-op cells, the last layer's 7 (free with the baselines), the top 4 and 2 sampled.
    assert_eq!(verified.iter().filter(|v| **v).count(), skipped + 7 + 4 + 2);
    let header = std::fs::read_to_string(&csv).unwrap();
    assert!(
        header
            .lines()
            .next()
            .unwrap()
            .ends_with("estimate_logit_diff,estimate_normalized,verified")
    );
    // The .npy holds the estimate of every cell (no NaN where a cell was not verified).
    let bytes = std::fs::read(&npy).unwrap();
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let values: Vec<f64> = bytes[10 + header_len..]
        .chunks_exact(8)
        .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(values.len(), verified.len());
    assert!(values.iter().all(|v| v.is_finite()), "{values:?}");

    let (code, _, stderr) = patchbay(&ioi_sweep(&model, &["--show", "difference", "-q"]), &[]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("--show estimate and --show difference need an estimate"),
        "{stderr}"
    );
}

/// `--template ioi --n 6`: pairs generated for the model's tokenizer, misfits dropped and counted,
/// the mean written with every pair; `--pairs` names a malformed line and runs the others.
#[test]
fn cli_dataset_sweeps_every_pair_and_writes_the_mean_and_each_pair() {
    let dir = TempDir::new("cli-dataset");
    let model = write_tiny(&dir, "tiny-qwen3");
    let json = dir.0.join("ds.json");
    let (code, stdout, stderr) = patchbay(
        &[
            "sweep",
            "--model",
            &model,
            "--template",
            "ioi",
            "--n",
            "6",
            "--seed",
            "1",
            "--out",
            json.to_str().unwrap(),
            "-q",
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("columns   IO, S1, S1+1, S2, END"), "{stdout}");
    assert!(
        stdout.contains("dropped") && stdout.contains("tokens"),
        "misfits are counted: {stdout}"
    );
    assert!(stdout.contains("mean over pairs"), "{stdout}");
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["format"], "patchbay-dataset/1");
    let pairs = r["pairs"].as_array().unwrap();
    assert!(!pairs.is_empty());
    assert!(
        pairs[0]["result"]["values"].is_array(),
        "each pair in the single-sweep schema"
    );
    assert!(r["aggregate"]["mean"]["normalized"].is_array());
    assert!(r["aggregate"]["sd"]["logit_diff"].is_array());
    assert!(r["aggregate"]["n"]["kl"].is_array());

    let file = dir.0.join("pairs.csv");
    let request = common::tiny_request(Component::ResidPost);
    std::fs::write(
        &file,
        format!(
            "clean,corrupted,correct,incorrect\n\"{}\",\"{}\", John, Mary\nonly one field\n",
            request.clean, request.corrupted
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = patchbay(
        &["sweep", "--model", &model, "--pairs", file.to_str().unwrap(), "-q"],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("dropped   line 3"), "{stdout}");
    assert!(stdout.contains("swept     1 pairs"), "{stdout}");
}
