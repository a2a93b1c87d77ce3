//! Teaching presets: classic patching tasks stored as data in `assets/presets.json`.

use serde::Deserialize;

use crate::model::TextTokenizer;
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

impl Preset {
    /// Whether this preset can run on a model with `tokenizer`: each answer one token (a leading
    /// BOS aside), the two answers different, and the prompts equally long. The error says which
    /// and why, in the tokenizer's own tokens.
    pub fn fits(&self, tokenizer: &TextTokenizer, prepend_bos: bool) -> Result<(), String> {
        let show = |ids: &[u32]| {
            tokenizer
                .token_texts(ids)
                .iter()
                .map(|t| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(" + ")
        };
        let mut answers = Vec::new();
        for (which, text) in [("correct", &self.correct), ("incorrect", &self.incorrect)] {
            let mut ids = tokenizer.encode_plain(text).map_err(|e| e.to_string())?;
            if ids.len() > 1 && ids.first() == tokenizer.bos().as_ref() {
                ids.remove(0);
            }
            if ids.len() != 1 {
                return Err(format!(
                    "this model's tokenizer splits the {which} answer {text:?} into {} tokens ({}); answers \
                     must be one token",
                    ids.len(),
                    show(&ids)
                ));
            }
            answers.push(ids[0]);
        }
        if answers[0] == answers[1] {
            return Err(format!(
                "this model's tokenizer gives both answers the same token ({})",
                show(&answers[..1])
            ));
        }
        let clean = tokenizer
            .encode_prompt_with(&self.clean, prepend_bos)
            .map_err(|e| e.to_string())?;
        let corrupted = tokenizer
            .encode_prompt_with(&self.corrupted, prepend_bos)
            .map_err(|e| e.to_string())?;
        if clean.len() != corrupted.len() {
            return Err(format!(
                "this model's tokenizer makes the prompts different lengths (clean {}, corrupted {} tokens)",
                clean.len(),
                corrupted.len()
            ));
        }
        Ok(())
    }
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

    #[test]
    fn presets_say_which_do_not_fit_a_tokenizer_and_why() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_tokenizer.json");
        let tiny = TextTokenizer::from_file(&path).unwrap();
        let ioi = presets().iter().find(|p| p.name.contains("IOI")).unwrap();
        assert_eq!(ioi.fits(&tiny, false), Ok(()));
        // The tiny tokenizer's 400 tokens were trained on the IOI sentences: " she" is two.
        let misfits: Vec<String> = presets().iter().filter_map(|p| p.fits(&tiny, false).err()).collect();
        assert!(
            !misfits.is_empty(),
            "some preset needs tokens the tiny vocabulary lacks"
        );
        assert!(
            misfits
                .iter()
                .all(|why| why.contains("tokens") || why.contains("same token")),
            "{misfits:?}"
        );
        // Asking for a BOS the tokenizer does not have is an error, not a panic.
        assert!(ioi.fits(&tiny, true).is_err());
    }
}
