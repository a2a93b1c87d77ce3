//! Writing results: data files that load straight into a notebook, and figures. [`save`] picks the
//! format from the file name's extension; [`save_as`] takes it explicitly (the CLI's `--csv` and
//! friends).

pub mod colormap;
pub mod data;
pub mod figure;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::patching::{Metric, SweepResult};

/// A file format results can be saved in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Everything, as the CLI's `--out` writes it.
    Json,
    /// One row per cell.
    Csv,
    /// The normalized `[layer, position]` matrix as a NumPy array.
    Npy,
    /// The figure as a PNG image.
    Png,
    /// The figure as SVG.
    Svg,
}

impl Format {
    /// The data formats, as file dialogs offer them.
    pub const DATA: [Format; 3] = [Format::Json, Format::Csv, Format::Npy];
    /// The figure formats.
    pub const FIGURES: [Format; 2] = [Format::Png, Format::Svg];

    /// The file name extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Csv => "csv",
            Format::Npy => "npy",
            Format::Png => "png",
            Format::Svg => "svg",
        }
    }

    /// The format `path`'s extension names.
    pub fn from_path(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        [Format::DATA.as_slice(), Format::FIGURES.as_slice()]
            .concat()
            .into_iter()
            .find(|f| f.extension() == ext)
            .ok_or_else(|| Error::Io {
                message: "unknown file type: results are saved as .json, .csv or .npy, figures as .png or .svg".into(),
                path: path.to_owned(),
            })
    }

    /// Whether this is a figure rather than data.
    pub fn is_figure(self) -> bool {
        Format::FIGURES.contains(&self)
    }
}

/// What a figure or a `.npy` file shows of a result: one metric, and for a grid of three axes one
/// view of it (a block sweep's component, a by-position head sweep's position).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Shown {
    pub metric: Metric,
    /// The view ([`crate::patching::Layout::view`]) a figure draws.
    pub view: usize,
    /// Fit the colour scale to the data rather than the metric's fixed one.
    pub auto_range: bool,
}

/// Saves `result` to `path` in the format its extension names, figures and `.npy` showing `shown`.
pub fn save(result: &SweepResult, path: &Path, shown: &Shown) -> Result<()> {
    save_as(result, path, Format::from_path(path)?, shown)
}

/// Saves `result` to `path` in `format`, whatever the extension ([`data::write_file`]: `-` is
/// standard output, links are followed, devices and FIFOs written directly, regular files replaced
/// atomically).
pub fn save_as(result: &SweepResult, path: &Path, format: Format, shown: &Shown) -> Result<()> {
    let bytes = match format {
        Format::Json => data::to_json(result)?.into_bytes(),
        Format::Csv => data::to_csv(result)?.into_bytes(),
        Format::Npy => data::to_npy(result, shown.metric),
        Format::Png => figure::to_png(result, shown)?,
        Format::Svg => figure::to_svg(result, shown)?.into_bytes(),
    };
    data::write_file(path, &bytes)
}

/// Checks, before any work, that results can be written to `outputs`: each one's folder exists,
/// none is a folder, no two name the same file (after following links), at most one is `-`
/// (standard output), and none is one of the `protected` files (the model being swept).
pub fn check_outputs(outputs: &[&Path], protected: &[PathBuf]) -> Result<()> {
    let protected: Vec<Identity> = protected.iter().filter_map(|p| identity(p)).collect();
    let mut seen: Vec<(Option<Identity>, &Path)> = Vec::new();
    for &path in outputs {
        if path == Path::new(data::STDOUT) {
            if seen.iter().any(|(_, p)| *p == path) {
                return Err(Error::Input("only one output can go to standard output (-)".into()));
            }
            seen.push((None, path));
            continue;
        }
        check_writable(path)?;
        let Some(id) = identity(path) else { continue };
        if protected.contains(&id) {
            return Err(Error::Io {
                message: "refusing to write results over the model being swept".into(),
                path: path.to_owned(),
            });
        }
        if let Some((_, first)) = seen.iter().find(|(other, _)| other.as_ref() == Some(&id)) {
            return Err(Error::Io {
                message: format!(
                    "two outputs name the same file ({} and this one); give each its own",
                    first.display()
                ),
                path: path.to_owned(),
            });
        }
        seen.push((Some(id), path));
    }
    Ok(())
}

/// Fails when an output file cannot be created: its folder is missing, or it is a folder. An
/// existing device, FIFO or terminal (/dev/null, /dev/stdout) is written as it is.
fn check_writable(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Err(Error::Io {
            message: "cannot write results: this is a folder; give a file name in it".into(),
            path: path.to_owned(),
        }),
        Ok(meta) if !meta.is_file() => Ok(()),
        _ => {
            let target = data::resolve_links(path)?;
            let dir = target
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if dir.is_dir() {
                Ok(())
            } else {
                Err(Error::Io {
                    message: "cannot write results: the folder does not exist".into(),
                    path: dir.to_owned(),
                })
            }
        }
    }
}

/// What a path names, to tell when two name the same file: an existing file by its device and
/// inode (whatever links lead to it), a new one by its folder made absolute and its name. None when
/// its folder is missing.
#[derive(Debug, PartialEq)]
enum Identity {
    Existing(u64, u64),
    New(PathBuf),
}

fn identity(path: &Path) -> Option<Identity> {
    #[cfg(unix)]
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::MetadataExt;
        return Some(Identity::Existing(meta.dev(), meta.ino()));
    }
    let target = data::resolve_links(path).ok()?;
    if let Ok(full) = std::fs::canonicalize(&target) {
        return Some(Identity::New(full));
    }
    let dir = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Some(Identity::New(
        std::fs::canonicalize(dir).ok()?.join(target.file_name()?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_extension_names_the_format() {
        assert_eq!(Format::from_path(Path::new("out/r.JSON")).unwrap(), Format::Json);
        assert_eq!(Format::from_path(Path::new("r.npy")).unwrap(), Format::Npy);
        assert!(Format::from_path(Path::new("fig.svg")).unwrap().is_figure());
        let e = Format::from_path(Path::new("r.txt")).unwrap_err().to_string();
        assert!(e.contains(".json, .csv or .npy") && e.ends_with("r.txt"), "{e}");
        assert!(Format::from_path(Path::new("no_extension")).is_err());
    }

    #[test]
    fn save_writes_each_format_by_its_extension() {
        let dir = std::env::temp_dir().join(format!("patchbay-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut result = SweepResult::empty_for_tests(3, 4);
        result.values[2][1] = Some(0.5);
        result.patched_logit_diff[2][1] = Some(0.5);
        let magic: [(&str, &[u8]); 5] = [
            ("json", b"{"),
            ("csv", b"layer,position"),
            ("npy", b"\x93NUMPY"),
            ("png", b"\x89PNG"),
            ("svg", b"<svg"),
        ];
        for (ext, start) in magic {
            let path = dir.join(format!("r.{ext}"));
            save(&result, &path, &Shown::default()).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            assert!(bytes.starts_with(start), "{ext}");
        }
        let back = data::load_json(&dir.join("r.json")).unwrap();
        assert_eq!(back, result);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
