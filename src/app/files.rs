//! Saving figures and data: the file dialog runs on its own thread (the UI never blocks), and so
//! does the write; the outcome comes back on a channel the app drains each frame.

use crossbeam_channel::bounded;

use super::PatchbayApp;
use crate::export;
use crate::model::ModelSource;
use crate::patching::SweepResult;

impl PatchbayApp {
    /// Saves the current result to the path typed in "Save to" (relative to the folder the app
    /// started in), in the format its extension names: what works where no file dialog does.
    pub fn save_to_typed_path(&mut self) {
        let Some(result) = self.result().cloned() else { return };
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
        let Some(result) = self.result().cloned() else { return };
        let shown = self.shown();
        let name = format!(
            "patchbay-{}-{}-{}",
            result.model.id.replace(['/', ' '], "_"),
            result.component,
            result.direction
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

/// Writes a figure or data file in the format the extension names, unless `path` is one of the
/// `protected` files (the model's); the message to show.
pub fn save_to(
    result: &SweepResult,
    path: &std::path::Path,
    shown: &export::Shown,
    protected: &[std::path::PathBuf],
) -> Result<String, String> {
    export::check_outputs(&[path], protected)
        .and_then(|()| export::save(result, path, shown))
        .map(|()| format!("saved {}", path.display()))
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
        let result = SweepResult::empty_for_tests(2, 3);
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
