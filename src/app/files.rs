//! Saving figures and data: the file dialog runs on its own thread (the UI never blocks), and so
//! does the write; the outcome comes back on a channel the app drains each frame.

use crossbeam_channel::bounded;

use super::{PatchbayApp, heatmap};
use crate::export;
use crate::patching::SweepResult;

impl PatchbayApp {
    pub(super) fn save_dialog(&mut self, figure: bool) {
        let Some(result) = self.result().cloned() else { return };
        let range = heatmap::color_range(&result, self.heatmap.auto_range);
        let name = format!(
            "patchbay-{}-{}",
            result.model.id.replace(['/', ' '], "_"),
            result.component
        );
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
                None => Err("nothing saved (dialog cancelled, or no file dialog available: install zenity or xdg-desktop-portal)".to_owned()),
                Some(path) => save_to(&result, &path, range),
            };
            let _ = tx.send(outcome);
        });
    }
}

/// Writes a figure or data file in the format the extension names; the message to show.
pub fn save_to(result: &SweepResult, path: &std::path::Path, range: f64) -> Result<String, String> {
    export::save(result, path, Some(range))
        .map(|()| format!("saved {}", path.display()))
        .map_err(|e| e.to_string())
}
