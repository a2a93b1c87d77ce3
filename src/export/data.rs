//! Sweep results as JSON (everything), CSV (one row per cell) and NPY (the `[layer, position]` matrix).

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::patching::{Component, Metric, SweepResult};

/// Writes `bytes` to `path` without ever replacing what the path points to:
/// - `-` is standard output;
/// - a symlink is followed, and its target written (the link stays);
/// - an existing file that is not a regular one (a device such as /dev/null, a FIFO) is written
///   directly, never renamed over;
/// - a regular file (or a new one) is written to a temporary file beside it and renamed into
///   place, so a failed write never leaves a half-written file where a good one was.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if path == Path::new(STDOUT) {
        let mut out = std::io::stdout().lock();
        return out
            .write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(|e| Error::io("writing to standard output", e, path));
    }
    // What the path names, every link followed by the OS (including /dev/stdout's, which point
    // at pipes and terminals rather than paths).
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(Error::Io {
            message: "cannot write results: this is a folder; give a file name in it".into(),
            path: path.to_owned(),
        }),
        Ok(meta) if !meta.is_file() => {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| Error::io("opening the file", e, path))?;
            f.write_all(bytes).map_err(|e| Error::io("writing the file", e, path))
        }
        _ => write_atomic(&resolve_links(path)?, bytes),
    }
}

/// The path written for `-`: standard output.
pub const STDOUT: &str = "-";

/// `path` with its symlinks followed (a dangling link resolves to the file it names, which is
/// then created); other paths as they are.
pub fn resolve_links(path: &Path) -> Result<PathBuf> {
    let mut current = path.to_owned();
    // A bound on link chains, as the OS has (ELOOP).
    for _ in 0..40 {
        match std::fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let link = std::fs::read_link(&current).map_err(|e| Error::io("reading the link", e, &current))?;
                current = match current.parent() {
                    Some(dir) if link.is_relative() => dir.join(link),
                    _ => link,
                };
            }
            _ => return Ok(current),
        }
    }
    Err(Error::Io {
        message: "too many levels of symbolic links".into(),
        path: path.to_owned(),
    })
}

/// Writes a regular file via a temporary file in the same folder and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.partial"));
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io("creating the file", e, &tmp))?;
    let written = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("writing the file", e, &tmp));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("renaming into place", e, path)
    })
}

/// The full result as pretty JSON.
pub fn to_json(result: &SweepResult) -> Result<String> {
    serde_json::to_string_pretty(result).map_err(|e| Error::Internal(format!("serializing results: {e}")))
}

/// One row per cell: where it is (component for block sweeps, layer, position, head), the tokens
/// at its position, the normalized value, the raw logit difference, skipped, then one column per
/// metric.
pub fn to_csv(result: &SweepResult) -> Result<String> {
    let mut out = csv::Writer::from_writer(Vec::new());
    let fail = |e: csv::Error| Error::Internal(format!("writing CSV: {e}"));
    let layout = result.layout();
    let block = result.component == Component::Block;
    let heads = result.component.has_heads();
    let mut header: Vec<&str> = Vec::new();
    if block {
        header.push("component");
    }
    header.extend(["layer", "position"]);
    if heads {
        header.push("head");
    }
    header.extend([
        "clean_token",
        "corrupted_token",
        "value",
        "patched_logit_diff",
        "skipped",
    ]);
    header.extend(Metric::ALL.iter().map(|m| m.name()));
    let estimate = result.estimate.as_ref();
    if estimate.is_some() {
        header.extend(["estimate_logit_diff", "estimate_normalized", "verified"]);
    }
    out.write_record(&header).map_err(fail)?;
    let num = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    for (i, at) in layout.cells().enumerate() {
        let mut row: Vec<String> = Vec::with_capacity(header.len());
        if block {
            row.push(layout.component_of(at).name().to_owned());
        }
        row.push(at.layer.to_string());
        // Head sweeps without by-position patch every position: the position column is empty.
        row.push(at.position.map(|p| p.to_string()).unwrap_or_default());
        if heads {
            row.push(at.head.map(|h| h.to_string()).unwrap_or_default());
        }
        let token = |tokens: &[String]| at.position.and_then(|p| tokens.get(p).cloned()).unwrap_or_default();
        row.push(token(&result.clean.tokens));
        row.push(token(&result.corrupted.tokens));
        row.push(num(result.values.flat()[i]));
        row.push(num(result.patched_logit_diff.flat()[i]));
        row.push(result.skipped.flat()[i].to_string());
        row.extend(Metric::ALL.iter().map(|&m| num(result.metric_at(m, i))));
        if let Some(e) = estimate {
            row.push(num(e.logit_diff.flat()[i]));
            row.push(num(e.normalized.flat()[i]));
            row.push(result.verified.as_ref().is_none_or(|v| v.flat()[i]).to_string());
        }
        out.write_record(&row).map_err(fail)?;
    }
    let bytes = out
        .into_inner()
        .map_err(|e| Error::Internal(format!("writing CSV: {e}")))?;
    String::from_utf8(bytes).map_err(|e| Error::Internal(format!("writing CSV: {e}")))
}

/// One metric's grid as a NumPy `.npy` file: float64, the result's shape (`(layers, positions)`,
/// `(layers, heads)`, …), NaN where not computed or undefined. `np.load(path)` reads it.
pub fn to_npy(result: &SweepResult, metric: Metric) -> Vec<u8> {
    let cells: usize = result.shape.iter().product();
    let values = result.metric_grid(metric).map(|g| g.flat());
    npy(
        &result.shape,
        (0..cells).map(|i| values.and_then(|v| v.get(i).copied().flatten()).unwrap_or(f64::NAN)),
    )
}

/// A float64 `.npy` array of `shape` holding `values` row-major.
pub fn npy(shape: &[usize], values: impl Iterator<Item = f64>) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = if dims.len() == 1 {
        format!("{},", dims[0])
    } else {
        dims.join(", ")
    };
    let mut header = format!("{{'descr': '<f8', 'fortran_order': False, 'shape': ({tuple}), }}");
    // Magic (6) + version (2) + header length (2) + header + '\n' must be a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let cells: usize = shape.iter().product();
    let mut out = Vec::with_capacity(10 + header.len() + cells * 8);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Reads a sweep JSON written by [`super::save`].
pub fn load_json(path: &Path) -> Result<SweepResult> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading results", e, path))?;
    serde_json::from_str(&text)
        .and_then(SweepResult::from_json_value)
        .map_err(|e| Error::Io {
            message: format!("not a Patchbay sweep file ({e})"),
            path: path.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_round_trips_awkward_tokens() {
        // A result shaped like a real one, with tokens a CSV writer must quote.
        let tokens = [" John", "a,b", "say \"hi\"", "line\nbreak", ""];
        let mut result = SweepResult::empty_for_tests(2, tokens.len());
        result.clean.tokens = tokens.iter().map(|t| t.to_string()).collect();
        result.corrupted.tokens = result.clean.tokens.clone();
        result.values[1][3] = Some(0.25);
        result.patched_logit_diff[1][3] = Some(1.5);
        let text = to_csv(&result).unwrap();
        let mut reader = csv::Reader::from_reader(text.as_bytes());
        let rows: Vec<csv::StringRecord> = reader.records().map(|r| r.unwrap()).collect();
        assert_eq!(rows.len(), 2 * tokens.len());
        for (p, token) in tokens.iter().enumerate() {
            assert_eq!(&rows[p][2], *token, "clean token at position {p}");
        }
        assert_eq!(&rows[tokens.len() + 3][4], "0.25");
        assert_eq!(&rows[0][4], "", "not computed: empty");
    }
}
