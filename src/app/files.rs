//! Saving figures and data: the file dialog runs on its own thread (the UI never blocks), and so
//! does the write; the outcome comes back on a channel the app drains each frame.

use crossbeam_channel::bounded;

use super::PatchbayApp;
use crate::dataset::result::DatasetResult;
use crate::export;
use crate::model::ModelSource;
use crate::patching::SweepResult;

impl PatchbayApp {
    /// Saves the current result to the path typed in "Save to" (relative to the folder the app
    /// started in), in the format its extension names: what works where no file dialog does.
    pub fn save_to_typed_path(&mut self) {
        let Some(result) = self.saveable() else { return };
        let path = std::path::PathBuf::from(self.settings.save_path.trim());
        let shown = self.shown();
        let protected = ModelSource::parse(&self.settings.model).map_or_else(|_| Vec::new(), |s| s.files());
        let (tx, rx) = bounded(1);
        self.file_task = Some(rx);
        std::thread::spawn(move || {
            let outcome = save_to(&result, &path, &shown, &protected).map(|saved| match std::fs::canonicalize(&path) {
                Ok(full) => format!("saved {}", full.display()),
                Err(_) => saved,
            });
            let _ = tx.send(outcome);
        });
    }

    pub(super) fn save_dialog(&mut self, figure: bool) {
        let Some(result) = self.saveable() else { return };
        let shown = self.shown();
        let r = result.sweep();
        let name = format!(
            "patchbay-{}-{}-{}",
            r.model.id.replace(['/', ' ', '(', ')', ',', '='], "_"),
            r.component,
            r.direction
        );
        // The model being swept is never written over (nor is anything else but a plain file).
        let protected = ModelSource::parse(&self.settings.model).map_or_else(|_| Vec::new(), |s| s.files());
        let (tx, rx) = bounded(1);
        self.file_task = Some(rx);
        std::thread::spawn(move || {
            let dialog = rfd::FileDialog::new();
            let dialog = if figure {
                dialog
                    .add_filter("PNG image", &["png"])
                    .add_filter("SVG image", &["svg"])
                    .set_file_name(format!("{name}.png"))
            } else {
                dialog
                    .add_filter("JSON (everything)", &["json"])
                    .add_filter("CSV (one row per cell)", &["csv"])
                    .add_filter("NumPy (values matrix)", &["npy"])
                    .set_file_name(format!("{name}.json"))
            };
            let outcome = match dialog.save_file() {
                None => Err(
                    "nothing saved: the dialog was cancelled, or this desktop has no file dialog (no portal, no \
                     zenity); type a file name in \"Save to\" below instead"
                        .to_owned(),
                ),
                Some(path) => save_to(&result, &path, &shown, &protected),
            };
            let _ = tx.send(outcome);
        });
    }
}

/// What Save writes: the sweep on the heatmap, or a dataset sweep (its pairs and aggregate as
/// data, its mean as the figure) while the mean over pairs is shown.
#[derive(Clone)]
pub enum Saveable {
    /// The sweep as data, and as drawn (its estimate or exact − estimate, when asked for).
    Sweep(Box<SweepResult>, Box<SweepResult>),
    Dataset(Box<DatasetResult>, Box<SweepResult>),
}

impl Saveable {
    /// The sweep result drawn (the mean over pairs for a dataset).
    pub fn sweep(&self) -> &SweepResult {
        match self {
            Saveable::Sweep(_, r) | Saveable::Dataset(_, r) => r,
        }
    }
}

impl PatchbayApp {
    /// What Save writes now.
    fn saveable(&self) -> Option<Saveable> {
        let result = self.result()?;
        Some(match self.dataset_result() {
            Some(d) if self.dataset_shows_mean() => Saveable::Dataset(Box::new(d.clone()), Box::new(result.clone())),
            _ => {
                let drawn =
                    crate::patching::estimate::with_view(result, self.figure_view).unwrap_or_else(|| result.clone());
                Saveable::Sweep(Box::new(result.clone()), Box::new(drawn))
            }
        })
    }
}

/// Writes a figure or data file in the format the extension names, unless `path` is one of the
/// `protected` files (the model's); the message to show.
pub fn save_to(
    result: &Saveable,
    path: &std::path::Path,
    shown: &export::Shown,
    protected: &[std::path::PathBuf],
) -> Result<String, String> {
    export::check_outputs(&[path], protected).map_err(|e| e.to_string())?;
    match result {
        Saveable::Sweep(data, drawn) => export::Format::from_path(path).and_then(|format| {
            let r = match format {
                export::Format::Json | export::Format::Csv => data,
                _ => drawn,
            };
            export::save_as(r, path, format, shown).map(|()| format!("saved {}", path.display()))
        }),
        Saveable::Dataset(d, _) => export::Format::from_path(path).and_then(|format| {
            d.save(path, format, shown).map(|written| {
                let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
                format!("saved {}", names.join(", "))
            })
        }),
    }
    .map_err(|e| e.to_string())
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saving_follows_the_cli_rules() {
        let dir = std::env::temp_dir().join(format!("patchbay-app-save-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let model = dir.join("model.gguf");
        std::fs::write(&model, b"weights").unwrap();
        let empty = Box::new(SweepResult::empty_for_tests(2, 3));
        let result = Saveable::Sweep(empty.clone(), empty);
        let refused = save_to(&result, &model, &export::Shown::default(), std::slice::from_ref(&model)).unwrap_err();
        assert!(refused.contains("over the model being swept"), "{refused}");
        assert_eq!(std::fs::read(&model).unwrap(), b"weights");
        // Through a link, the link stays and its target is written.
        std::os::unix::fs::symlink("figure.svg", dir.join("link.svg")).unwrap();
        let saved = save_to(&result, &dir.join("link.svg"), &export::Shown::default(), &[model]).unwrap();
        assert!(saved.starts_with("saved"), "{saved}");
        assert!(
            std::fs::symlink_metadata(dir.join("link.svg"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(
            std::fs::read_to_string(dir.join("figure.svg"))
                .unwrap()
                .contains("<svg")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
