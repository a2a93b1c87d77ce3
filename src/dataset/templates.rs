//! Built-in pair generators for the loaded tokenizer: IOI (templates × names × places × objects,
//! both name orders), greater-than (years) and factual recall (landmark → city). The same template,
//! n and seed give the same pairs. Pairs whose answers are not single tokens, or whose prompts
//! differ in length, are dropped, and the dataset says how many and why. Columns are the template's
//! named positions (IOI: IO, S1, S1+1, S2, END), each pair's cell taken at its own token index.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::{Dataset, Dropped, PromptPair};
use crate::error::{Error, Result};
use crate::model::TextTokenizer;

/// The templates Patchbay generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum Template {
    /// Indirect object identification (Wang et al. 2022): the subject repeated (clean) or the
    /// indirect object repeated (corrupted); correct = the indirect object.
    Ioi,
    /// Greater-than (Hanna et al. 2023): "from the year 1780 to the year 17" → a later year's digit.
    GreaterThan,
    /// Factual recall: "The Eiffel Tower is located in the city of" → " Paris".
    Factual,
}

impl Template {
    pub const ALL: [Template; 3] = [Template::Ioi, Template::GreaterThan, Template::Factual];

    pub fn name(self) -> &'static str {
        match self {
            Template::Ioi => "ioi",
            Template::GreaterThan => "greater-than",
            Template::Factual => "factual",
        }
    }
}

/// Tries per pair asked for before giving up (most draws fit; a tokenizer may reject many).
const ATTEMPTS_PER_PAIR: usize = 50;

const NAMES: &[&str] = &[
    "John", "Mary", "Tom", "Anna", "James", "Sarah", "David", "Lisa", "Michael", "Emma", "Paul", "Kate", "Mark",
    "Laura", "Peter", "Alice", "Daniel", "Rachel", "Robert", "Susan", "George", "Helen", "Frank", "Jane",
];
const PLACES: &[&str] = &[
    "store",
    "park",
    "school",
    "office",
    "beach",
    "market",
    "station",
    "library",
    "garden",
    "hospital",
    "restaurant",
    "house",
];
const OBJECTS: &[&str] = &[
    "a bottle of milk",
    "a book",
    "a drink",
    "a letter",
    "an apple",
    "a ball",
    "a gift",
    "a pen",
    "a ring",
    "a necklace",
];
/// IOI templates: {A} and {B} the two names in order, {S} the repeated name, {PLACE}, {OBJECT}.
const IOI_TEMPLATES: &[&str] = &[
    "When{A} and{B} went to the {PLACE},{S} gave {OBJECT} to",
    "After{A} and{B} went to the {PLACE},{S} gave {OBJECT} to",
    "Then,{A} and{B} had a long day at the {PLACE}.{S} gave {OBJECT} to",
    "While{A} and{B} were working at the {PLACE},{S} gave {OBJECT} to",
];
const EVENTS: &[&str] = &[
    "war",
    "expedition",
    "drought",
    "strike",
    "project",
    "voyage",
    "trial",
    "festival",
    "siege",
    "famine",
];
const LANDMARKS: &[(&str, &str)] = &[
    ("Eiffel Tower", "Paris"),
    ("Colosseum", "Rome"),
    ("Big Ben", "London"),
    ("Brandenburg Gate", "Berlin"),
    ("Kremlin", "Moscow"),
    ("Acropolis", "Athens"),
    ("Sagrada Familia", "Barcelona"),
    ("Forbidden City", "Beijing"),
    ("Space Needle", "Seattle"),
    ("Alhambra", "Granada"),
    ("Louvre", "Paris"),
    ("Vatican", "Rome"),
    ("Tower Bridge", "London"),
    ("Prado Museum", "Madrid"),
    ("Rijksmuseum", "Amsterdam"),
    ("Little Mermaid statue", "Copenhagen"),
];

/// The generator's named positions.
pub fn position_names(template: Template) -> Vec<String> {
    let names: &[&str] = match template {
        Template::Ioi => &["IO", "S1", "S1+1", "S2", "END"],
        Template::GreaterThan => &["event", "year", "year last", "END"],
        Template::Factual => &["subject", "subject last", "END"],
    };
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// A candidate pair before it is checked, with the byte ranges of its named positions in the
/// clean prompt: (start, end) of the text whose first (or last) token names the position.
struct Draft {
    pair: PromptPair,
    /// For each named position but END: (byte offset, whether it is the last token before it).
    marks: Vec<(usize, bool)>,
}

/// Generates `n` pairs of `template` for `tokenizer` with `seed`.
pub fn generate(
    template: Template,
    n: usize,
    seed: u64,
    tokenizer: &TextTokenizer,
    prepend_bos: bool,
) -> Result<Dataset> {
    if n == 0 {
        return Err(Error::Input("--n must be at least 1".into()));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pairs = Vec::with_capacity(n);
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n * ATTEMPTS_PER_PAIR {
        if pairs.len() == n {
            break;
        }
        let draft = match template {
            Template::Ioi => ioi(&mut rng),
            Template::GreaterThan => greater_than(&mut rng),
            Template::Factual => factual(&mut rng),
        };
        if !seen.insert((draft.pair.clean.clone(), draft.pair.corrupted.clone())) {
            continue; // the same pair drawn twice
        }
        match check(draft, tokenizer, prepend_bos) {
            Ok(pair) => pairs.push(pair),
            Err(why) => *reasons.entry(why).or_default() += 1,
        }
    }
    let dropped = reasons
        .into_iter()
        .map(|(why, count)| Dropped {
            what: format!("{count} generated pair(s)"),
            why,
        })
        .collect::<Vec<_>>();
    if pairs.is_empty() {
        return Err(Error::Input(format!(
            "no {} pair fits this model's tokenizer: {}",
            template.name(),
            dropped
                .iter()
                .map(|d| format!("{} dropped, {}", d.what, d.why))
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    Ok(Dataset {
        name: format!("{} (n={}, seed {seed})", template.name(), pairs.len()),
        pairs,
        position_names: position_names(template),
        dropped,
    })
}

/// Fills `template`'s slots in order, recording where each starts and ends (bytes).
fn fill(template: &str, values: &[(&str, &str)]) -> (String, BTreeMap<String, (usize, usize)>) {
    let mut out = String::new();
    let mut at = BTreeMap::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = open + rest[open..].find('}').unwrap_or(0);
        let slot = &rest[open + 1..close];
        let value = values.iter().find(|(k, _)| *k == slot).map_or("", |(_, v)| *v);
        let start = out.len();
        out.push_str(value);
        at.insert(slot.to_owned(), (start, out.len()));
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    (out, at)
}

fn ioi(rng: &mut StdRng) -> Draft {
    let template = IOI_TEMPLATES.choose(rng).copied().unwrap_or(IOI_TEMPLATES[0]);
    let mut names = NAMES.choose_multiple(rng, 2).copied();
    let (io, s) = (names.next().unwrap_or("John"), names.next().unwrap_or("Mary"));
    // Both orders: ABBA (IO first) and BABA (the subject first).
    let abba: bool = rng.random();
    let (a, b) = if abba { (io, s) } else { (s, io) };
    let place = PLACES.choose(rng).copied().unwrap_or("store");
    let object = OBJECTS.choose(rng).copied().unwrap_or("a book");
    let sp = |n: &str| format!(" {n}");
    let (a, b, s_sp, io_sp) = (sp(a), sp(b), sp(s), sp(io));
    let values = |repeated: &str| {
        fill(
            template,
            &[
                ("A", &a),
                ("B", &b),
                ("S", repeated),
                ("PLACE", place),
                ("OBJECT", object),
            ],
        )
    };
    let (clean, at) = values(&s_sp);
    let (corrupted, _) = values(&io_sp);
    let (io_slot, s1_slot) = if abba { ("A", "B") } else { ("B", "A") };
    let span = |slot: &str| at.get(slot).copied().unwrap_or((0, 0));
    Draft {
        pair: PromptPair {
            clean,
            corrupted,
            correct: io_sp.clone(),
            incorrect: s_sp.clone(),
            label: Some(format!(
                "{} {}… IO {io}, S {s}",
                if abba { "ABBA" } else { "BABA" },
                template.split('{').next().unwrap_or("")
            )),
            positions: Vec::new(),
        },
        // IO, S1, S1+1 (the token after S1), S2.
        marks: vec![
            (span(io_slot).0, false),
            (span(s1_slot).0, false),
            (span(s1_slot).1, false),
            (span("S").0, false),
        ],
    }
}

fn greater_than(rng: &mut StdRng) -> Draft {
    let event = EVENTS.choose(rng).copied().unwrap_or("war");
    let century = rng.random_range(15..19);
    let late = rng.random_range(5..9);
    let early = rng.random_range(0..2);
    let text = |tens: u32| {
        fill(
            // Slots start at their word's space, where byte-level and SentencePiece tokens start.
            "The{EVENT} lasted from the year{YEAR} to the year {C}",
            &[
                ("EVENT", &format!(" {event}")),
                ("YEAR", &format!(" {century}{tens}0")),
                ("C", &century.to_string()),
            ],
        )
    };
    let (clean, at) = text(late);
    let (corrupted, _) = text(early);
    let year = at.get("YEAR").copied().unwrap_or((0, 0));
    Draft {
        pair: PromptPair {
            clean,
            corrupted,
            correct: "9".into(),
            incorrect: "2".into(),
            label: Some(format!("{event} {century}{late}0 vs {century}{early}0")),
            positions: Vec::new(),
        },
        marks: vec![
            (at.get("EVENT").map_or(0, |e| e.0), false),
            (year.0, false),
            (year.1, true),
        ],
    }
}

fn factual(rng: &mut StdRng) -> Draft {
    let mut two = LANDMARKS.choose_multiple(rng, 2);
    let (a, b) = (two.next().unwrap_or(&LANDMARKS[0]), two.next().unwrap_or(&LANDMARKS[1]));
    let text = |landmark: &str| {
        fill(
            "The{SUBJECT} is located in the city of",
            &[("SUBJECT", &format!(" {landmark}"))],
        )
    };
    let (clean, at) = text(a.0);
    let (corrupted, _) = text(b.0);
    let subject = at.get("SUBJECT").copied().unwrap_or((0, 0));
    Draft {
        pair: PromptPair {
            clean,
            corrupted,
            correct: format!(" {}", a.1),
            incorrect: format!(" {}", b.1),
            label: Some(format!("{} vs {}", a.0, b.0)),
            positions: Vec::new(),
        },
        marks: vec![(subject.0, false), (subject.1, true)],
    }
}

/// Tokenizes a draft: its answers must be single (and different) tokens, its prompts equally long,
/// and each named position a token boundary; returns the pair with its token indices.
fn check(draft: Draft, tok: &TextTokenizer, prepend_bos: bool) -> std::result::Result<PromptPair, String> {
    let Draft { mut pair, marks } = draft;
    let encode = |s: &str| tok.encode_prompt_with(s, prepend_bos).map_err(|e| e.to_string());
    let answer = |s: &str| -> std::result::Result<u32, String> {
        let mut ids = tok.encode_plain(s).map_err(|e| e.to_string())?;
        if ids.len() > 1 && ids.first() == tok.bos().as_ref() {
            ids.remove(0);
        }
        match ids.as_slice() {
            [id] => Ok(*id),
            _ => Err(format!("the answer {s:?} is {} tokens", ids.len())),
        }
    };
    if answer(&pair.correct)? == answer(&pair.incorrect)? {
        return Err("both answers are the same token".into());
    }
    let (clean, corrupted) = (encode(&pair.clean)?, encode(&pair.corrupted)?);
    if clean.len() != corrupted.len() {
        return Err("the clean and corrupted prompts tokenize to different lengths".into());
    }
    let mut positions = Vec::with_capacity(marks.len() + 1);
    for (byte, last_before) in marks {
        let prefix = encode(&pair.clean[..byte])?;
        if prefix.len() > clean.len() || clean[..prefix.len()] != prefix[..] {
            return Err("a named position falls inside a token".into());
        }
        let index = if last_before {
            prefix.len().checked_sub(1)
        } else {
            Some(prefix.len())
        };
        match index.filter(|&i| i < clean.len()) {
            Some(i) => positions.push(i),
            None => return Err("a named position is outside the prompt".into()),
        }
    }
    positions.push(clean.len() - 1); // END
    pair.positions = positions;
    Ok(pair)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> TextTokenizer {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_tokenizer.json");
        TextTokenizer::from_file(&path).unwrap()
    }

    #[test]
    fn ioi_pairs_are_reproducible_use_both_orders_and_name_their_positions() {
        let t = tiny();
        let a = generate(Template::Ioi, 16, 7, &t, false).unwrap();
        assert_eq!(
            a,
            generate(Template::Ioi, 16, 7, &t, false).unwrap(),
            "same seed, same pairs"
        );
        assert_ne!(a.pairs, generate(Template::Ioi, 16, 8, &t, false).unwrap().pairs);
        assert_eq!(a.position_names, ["IO", "S1", "S1+1", "S2", "END"]);
        assert!(a.pairs.iter().any(|p| p.label.as_deref().unwrap().starts_with("ABBA")));
        assert!(a.pairs.iter().any(|p| p.label.as_deref().unwrap().starts_with("BABA")));
        for p in &a.pairs {
            let ids = t.encode_prompt(&p.clean).unwrap();
            let token = |i: usize| t.token_text(ids[p.positions[i]]);
            assert_eq!(token(0), p.correct, "IO is the correct answer's name: {p:?}");
            assert_eq!(token(1), p.incorrect, "S1 is the subject");
            assert_eq!(token(3), p.incorrect, "S2 repeats the subject in the clean prompt");
            assert_eq!(p.positions[4], ids.len() - 1);
        }
        // The tiny vocabulary knows few of the names: most draws are dropped, and the reasons say why.
        assert!(a.dropped.iter().any(|d| d.why.contains("tokens")), "{:?}", a.dropped);
    }
}
