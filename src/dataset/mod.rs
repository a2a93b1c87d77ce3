//! Prompt-pair datasets: patching averaged over many pairs, as papers report it (the IOI paper's
//! templates × names × places × objects, both name orders).
//!
//! A [`Dataset`] is a list of [`PromptPair`]s from a file (JSONL or CSV, [`Dataset::load`]) or a
//! built-in template ([`templates`]), with the heatmap's columns: the token positions when every
//! pair has the same length, or the template's named positions (IO, S1, S2, END, …), each pair's
//! cell taken at its own token index. [`run`] sweeps every pair and aggregates them live.

pub mod result;
pub mod run;
pub mod templates;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One clean/corrupted pair with its answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptPair {
    pub clean: String,
    pub corrupted: String,
    pub correct: String,
    pub incorrect: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The token index of each of the dataset's named positions in this pair (templates).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub positions: Vec<usize>,
}

/// A pair left out of a dataset, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    /// Where it came from: "line 7" of a file, or the generated pair's text.
    pub what: String,
    pub why: String,
}

/// Pairs to sweep together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dataset {
    /// "ioi (n=32, seed 0)" or the file's name.
    pub name: String,
    pub pairs: Vec<PromptPair>,
    /// The heatmap's columns when the pairs' lengths differ: each pair gives their token indices in
    /// [`PromptPair::positions`]. Empty: columns are token positions, every pair equally long.
    #[serde(default)]
    pub position_names: Vec<String>,
    /// Pairs read or generated but left out, with the reason.
    #[serde(default)]
    pub dropped: Vec<Dropped>,
}

/// A file of pairs larger than this is not one (a few thousand pairs are a few hundred KiB).
const MAX_PAIRS_FILE_BYTES: u64 = 64 << 20;

impl Dataset {
    /// Reads pairs from a JSONL (one object per line) or CSV file (a header naming `clean`,
    /// `corrupted`, `correct`, `incorrect` and optionally `label`). A malformed line is named in
    /// [`Dataset::dropped`] with its field; the other pairs are kept.
    pub fn load(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io("reading the pairs file", e, path))?;
        if meta.len() > MAX_PAIRS_FILE_BYTES {
            return Err(Error::Input(format!(
                "{} is {} bytes, far more than a file of prompt pairs",
                path.display(),
                meta.len()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading the pairs file", e, path))?;
        let csv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("csv"));
        let (pairs, dropped, position_names) = if csv {
            let (p, d) = from_csv(&text)?;
            (p, d, Vec::new())
        } else {
            from_jsonl(&text)
        };
        let name = path
            .file_name()
            .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        if pairs.is_empty() {
            let first = dropped
                .first()
                .map_or_else(String::new, |d| format!(" ({}: {})", d.what, d.why));
            return Err(Error::Input(format!("{name} has no usable prompt pairs{first}")));
        }
        Ok(Self {
            name,
            pairs,
            position_names,
            dropped,
        })
    }

    /// The heatmap's column names, or `None` when columns are token positions.
    pub fn named_positions(&self) -> Option<&[String]> {
        (!self.position_names.is_empty()).then_some(self.position_names.as_slice())
    }
}

/// A JSONL line: a pair, optionally with named positions (`"position_names": ["IO", "S1", …],
/// "positions": [3, 5, …]`, this pair's token index of each).
#[derive(Deserialize)]
struct Line {
    #[serde(flatten)]
    pair: PromptPair,
    #[serde(default)]
    position_names: Vec<String>,
}

/// One JSON object per line; blank lines and `#` comments are skipped. Lines may name positions:
/// then every line must name the same ones, and the dataset's columns are those names.
fn from_jsonl(text: &str) -> (Vec<PromptPair>, Vec<Dropped>, Vec<String>) {
    let (mut pairs, mut dropped) = (Vec::new(), Vec::new());
    let mut names: Option<Vec<String>> = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let what = || format!("line {}", i + 1);
        let parsed = serde_json::from_str::<Line>(line)
            .map_err(|e| e.to_string())
            .and_then(|l| {
                let named = names.get_or_insert_with(|| l.position_names.clone());
                if l.position_names != *named {
                    Err(format!(
                        "it names the positions {:?} where the first line names {:?}",
                        l.position_names, named
                    ))
                } else if l.pair.positions.len() != named.len() {
                    Err(format!(
                        "it gives {} positions for {} named ones",
                        l.pair.positions.len(),
                        named.len()
                    ))
                } else {
                    Ok(l.pair)
                }
            });
        match parsed {
            Ok(p) => match missing_field(&p) {
                Some(field) => dropped.push(Dropped {
                    what: format!("line {}", i + 1),
                    why: format!("'{field}' is empty"),
                }),
                None => pairs.push(p),
            },
            Err(why) => dropped.push(Dropped { what: what(), why }),
        }
    }
    (pairs, dropped, names.unwrap_or_default())
}

/// A CSV with a header row; the csv crate handles quoting (commas and quotes in prompts).
fn from_csv(text: &str) -> Result<(Vec<PromptPair>, Vec<Dropped>)> {
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| Error::Input(format!("the CSV header cannot be read ({e})")))?
        .clone();
    let column = |name: &str| headers.iter().position(|h| h.trim() == name);
    let required = ["clean", "corrupted", "correct", "incorrect"];
    let missing: Vec<&str> = required.iter().copied().filter(|c| column(c).is_none()).collect();
    if !missing.is_empty() {
        return Err(Error::Input(format!(
            "the CSV header lacks the column(s) {}; it needs clean, corrupted, correct, incorrect (and may have label)",
            missing.join(", ")
        )));
    }
    let (mut pairs, mut dropped) = (Vec::new(), Vec::new());
    for (i, record) in reader.records().enumerate() {
        // Line 1 is the header.
        let what = format!("line {}", i + 2);
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                dropped.push(Dropped {
                    what,
                    why: e.to_string(),
                });
                continue;
            }
        };
        let get = |name: &str| column(name).and_then(|c| record.get(c)).map(str::to_owned);
        let fields: Vec<Option<String>> = required.iter().map(|c| get(c)).collect();
        if let Some(k) = fields.iter().position(Option::is_none) {
            dropped.push(Dropped {
                what,
                why: format!("the '{}' field is missing", required[k]),
            });
            continue;
        }
        let f = |k: usize| fields[k].clone().unwrap_or_default();
        let pair = PromptPair {
            clean: f(0),
            corrupted: f(1),
            correct: f(2),
            incorrect: f(3),
            label: get("label").filter(|l| !l.is_empty()),
            positions: Vec::new(),
        };
        match missing_field(&pair) {
            Some(field) => dropped.push(Dropped {
                what,
                why: format!("'{field}' is empty"),
            }),
            None => pairs.push(pair),
        }
    }
    Ok((pairs, dropped))
}

/// The first of a pair's required fields that is empty.
fn missing_field(p: &PromptPair) -> Option<&'static str> {
    [
        ("clean", &p.clean),
        ("corrupted", &p.corrupted),
        ("correct", &p.correct),
        ("incorrect", &p.incorrect),
    ]
    .into_iter()
    .find(|(_, v)| v.trim().is_empty())
    .map(|(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_and_csv_name_malformed_lines_and_keep_the_rest() {
        let jsonl = "{\"clean\": \"a b\", \"corrupted\": \"a c\", \"correct\": \" x\", \"incorrect\": \" y\"}\n\
                     \n# a comment\n\
                     {\"clean\": \"a b\", \"corrupted\": \"a c\"}\n\
                     {\"clean\": \"\", \"corrupted\": \"a c\", \"correct\": \" x\", \"incorrect\": \" y\", \"label\": \"e\"}\n";
        let (pairs, dropped, _) = from_jsonl(jsonl);
        assert_eq!(pairs.len(), 1);
        assert_eq!(dropped.len(), 2);
        assert_eq!(dropped[0].what, "line 4");
        assert!(dropped[0].why.contains("correct"), "{:?}", dropped[0]);
        assert_eq!(dropped[1].what, "line 5");
        assert!(dropped[1].why.contains("'clean' is empty"));
        let csv = "label,clean,corrupted,correct,incorrect\nfirst,\"a, b\",\"a, c\", x, y\nshort,a\n";
        let (pairs, dropped) = from_csv(csv).unwrap();
        assert_eq!(pairs[0].clean, "a, b");
        assert_eq!(pairs[0].label.as_deref(), Some("first"));
        assert_eq!(dropped[0].what, "line 3");
        assert!(
            dropped[0].why.contains("'corrupted' field is missing"),
            "{:?}",
            dropped[0]
        );
        let err = from_csv("clean,corrupted\na,b\n").unwrap_err().to_string();
        assert!(err.contains("correct, incorrect"), "{err}");
        // Named positions by label: every line names the same ones.
        let named = "{\"clean\": \"a b\", \"corrupted\": \"a c\", \"correct\": \" x\", \"incorrect\": \" y\", \
                     \"position_names\": [\"S\", \"END\"], \"positions\": [1, 2]}\n\
                     {\"clean\": \"d a b\", \"corrupted\": \"d a c\", \"correct\": \" x\", \"incorrect\": \" y\", \
                     \"position_names\": [\"S\", \"END\"], \"positions\": [2, 3]}\n\
                     {\"clean\": \"a b\", \"corrupted\": \"a c\", \"correct\": \" x\", \"incorrect\": \" y\"}\n";
        let (pairs, dropped, names) = from_jsonl(named);
        assert_eq!(names, ["S", "END"]);
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[1].positions, [2, 3]);
        assert_eq!(dropped[0].what, "line 3");
        assert!(dropped[0].why.contains("names the positions"), "{:?}", dropped[0]);
    }
}
