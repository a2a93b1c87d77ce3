//! Teaching presets: classic patching tasks stored as data in `assets/presets.json`.

use serde::Deserialize;

use crate::patching::{Component, Direction};

/// One ready-made experiment with a note on what to look for.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Preset {
    pub name: String,
    pub clean: String,
    pub corrupted: String,
    pub correct: String,
    pub incorrect: String,
    pub component: Component,
    #[serde(default)]
    pub by_position: bool,
    #[serde(default)]
    pub direction: Direction,
    pub explanation: String,
}

/// The presets shipped in assets/presets.json.
pub fn presets() -> &'static [Preset] {
    static PRESETS: std::sync::OnceLock<Vec<Preset>> = std::sync::OnceLock::new();
    PRESETS.get_or_init(|| {
        serde_json::from_str(include_str!("../../assets/presets.json")).unwrap_or_else(|e| {
            eprintln!("assets/presets.json is invalid: {e}");
            Vec::new()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_include_the_classics() {
        let names: Vec<&str> = presets().iter().map(|p| p.name.as_str()).collect();
        assert!(names.len() >= 4, "{names:?}");
        assert!(names.iter().any(|n| n.contains("IOI")));
        assert!(names.iter().any(|n| n.contains("Factual")));
        assert!(
            presets().iter().any(|p| p.component == Component::HeadOut),
            "a head preset: {names:?}"
        );
        assert!(presets().iter().all(|p| !p.explanation.is_empty()));
    }
}
