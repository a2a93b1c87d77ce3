//! What to sweep, and its validation against a model: one checked request shared by the CLI, the
//! app and the tests, whether given as text or as token ids.

use serde::{Deserialize, Serialize};

use super::result::{AnswerRecord, PromptRecord};
use super::{Component, Direction};
use crate::error::{Error, Result};
use crate::model::Model;

/// What to sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRequest {
    pub clean: String,
    pub corrupted: String,
    /// The answer the clean prompt should produce (" John").
    pub correct: String,
    /// The answer the corrupted prompt produces (" Mary").
    pub incorrect: String,
    pub component: Component,
    /// Which run is patched (default: denoising, clean into corrupted).
    #[serde(default)]
    pub direction: Direction,
    /// Head components: one cell per (layer, position, head) rather than per (layer, head).
    #[serde(default)]
    pub by_position: bool,
    /// Put the model's BOS token before both prompts where its tokenizer adds none (GPT-2's adds
    /// none, and TransformerLens prepends one by default); off by default, as in HF.
    #[serde(default)]
    pub prepend_bos: bool,
}

/// A sweep given as token ids rather than text (models without a tokenizer, synthetic benchmarks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenSweepRequest {
    pub clean_ids: Vec<u32>,
    pub corrupted_ids: Vec<u32>,
    pub correct_id: u32,
    pub incorrect_id: u32,
    pub component: Component,
    #[serde(default)]
    pub direction: Direction,
    #[serde(default)]
    pub by_position: bool,
}

/// A request checked against a model: prompts tokenized (non-empty, equally long, within the
/// model's positions), answers single tokens of its vocabulary and distinct.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidRequest {
    /// Whether a BOS was put before the prompts on request.
    pub prepend_bos: bool,
    pub clean: PromptRecord,
    pub corrupted: PromptRecord,
    pub correct: AnswerRecord,
    pub incorrect: AnswerRecord,
    pub component: Component,
    pub direction: Direction,
    pub by_position: bool,
}

impl SweepRequest {
    /// Tokenizes the prompts and answers with `model`'s tokenizer and checks them.
    pub fn validate(&self, model: &Model) -> Result<ValidRequest> {
        let mut valid = ValidRequest::new(
            [
                prompt_tokens(model, "clean", &self.clean, self.prepend_bos)?,
                prompt_tokens(model, "corrupted", &self.corrupted, self.prepend_bos)?,
            ],
            [
                answer_token(model, "correct", &self.correct)?,
                answer_token(model, "incorrect", &self.incorrect)?,
            ],
            (self.component, self.direction, self.by_position),
        )?;
        valid.prepend_bos = self.prepend_bos;
        Ok(valid)
    }
}

impl TokenSweepRequest {
    /// Checks the token ids against `model`'s vocabulary and positions.
    pub fn validate(&self, model: &Model) -> Result<ValidRequest> {
        let vocab = model.config.vocab_size;
        let max = model.config.max_position_embeddings;
        let prompt = |which: &str, ids: &[u32]| -> Result<PromptRecord> {
            if ids.is_empty() || ids.len() > max {
                return Err(Error::Input(format!(
                    "the {which} prompt has {} tokens; give 1 to {max}",
                    ids.len()
                )));
            }
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(Error::Input(format!(
                    "the {which} prompt has token id {bad}; the vocabulary has {vocab}"
                )));
            }
            let tokens = model.tokenizer.token_texts(ids);
            Ok(PromptRecord {
                text: tokens.concat(),
                token_ids: ids.to_vec(),
                tokens,
            })
        };
        let answer = |which: &str, id: u32| -> Result<AnswerRecord> {
            if id as usize >= vocab {
                return Err(Error::Input(format!(
                    "the {which} answer is token id {id}; the vocabulary has {vocab}"
                )));
            }
            let token = model.tokenizer.token_text(id);
            Ok(AnswerRecord {
                text: token.clone(),
                token_id: id,
                token,
            })
        };
        ValidRequest::new(
            [
                prompt("clean", &self.clean_ids)?,
                prompt("corrupted", &self.corrupted_ids)?,
            ],
            [
                answer("correct", self.correct_id)?,
                answer("incorrect", self.incorrect_id)?,
            ],
            (self.component, self.direction, self.by_position),
        )
    }
}

impl ValidRequest {
    /// Checks what the prompts and answers must be to each other: equally long, distinct answers.
    fn new(
        [clean, corrupted]: [PromptRecord; 2],
        [correct, incorrect]: [AnswerRecord; 2],
        (component, direction, by_position): (Component, Direction, bool),
    ) -> Result<Self> {
        if by_position && !component.has_heads() {
            return Err(Error::Input(format!(
                "--by-position applies to head components (head_out, head_q, head_k, head_v, head_pattern); \
                 {component} is already patched one position at a time"
            )));
        }
        if clean.token_ids.len() != corrupted.token_ids.len() {
            return Err(Error::Input(format!(
                "the prompts have different token lengths (clean {}, corrupted {}); patching compares them \
                 position by position, so they must tokenize to the same length.\n  clean:     {}\n  corrupted: {}",
                clean.token_ids.len(),
                corrupted.token_ids.len(),
                token_list(&clean),
                token_list(&corrupted)
            )));
        }
        if correct.token_id == incorrect.token_id {
            return Err(Error::Input(format!(
                "the correct and incorrect answers are the same token ({:?}); the logit difference would always be 0",
                correct.token
            )));
        }
        Ok(Self {
            prepend_bos: false,
            clean,
            corrupted,
            correct,
            incorrect,
            component,
            direction,
            by_position,
        })
    }

    /// The first position where the prompts' tokens differ (their length when they are identical).
    pub fn first_diff(&self) -> usize {
        let (a, b) = (&self.clean.token_ids, &self.corrupted.token_ids);
        a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len())
    }
}

/// Checks one answer is a single token and returns it.
fn answer_token(model: &Model, which: &str, text: &str) -> Result<AnswerRecord> {
    if text.is_empty() {
        return Err(Error::Input(format!(
            "the {which} answer is empty: give one token, e.g. \" John\""
        )));
    }
    let mut ids = model.tokenizer.encode_plain(text)?;
    // A tokenizer that puts BOS even before a plain encoding (Gemma's SentencePiece) does not make
    // the answer two tokens.
    if ids.len() > 1 && ids.first() == model.tokenizer.bos().as_ref() {
        ids.remove(0);
    }
    check_in_vocabulary(model, &ids, text)?;
    match ids.as_slice() {
        [id] => Ok(AnswerRecord {
            text: text.to_owned(),
            token_id: *id,
            token: model.tokenizer.token_text(*id),
        }),
        _ => {
            let parts: Vec<String> = ids
                .iter()
                .map(|&i| format!("{:?}", model.tokenizer.token_text(i)))
                .collect();
            let hint = ids
                .first()
                .map(|&i| format!(" Its first token is {:?}.", model.tokenizer.token_text(i)))
                .unwrap_or_default();
            Err(Error::Input(format!(
                "the {which} answer {text:?} is {} tokens ({}); answers must be exactly one token.{hint}",
                ids.len(),
                parts.join(" + ")
            )))
        }
    }
}

/// Refuses token ids the model has no embedding for: its tokenizer and weights disagree.
fn check_in_vocabulary(model: &Model, ids: &[u32], text: &str) -> Result<()> {
    let vocab = model.config.vocab_size;
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(id) => Err(Error::ModelConfig(format!(
            "the model's tokenizer gives {text:?} the token id {id}, outside its {vocab}-token vocabulary: the \
             tokenizer does not belong to these weights"
        ))),
        None => Ok(()),
    }
}

/// Tokenizes a prompt, refusing empty ones.
fn prompt_tokens(model: &Model, which: &str, text: &str, prepend_bos: bool) -> Result<PromptRecord> {
    if text.trim().is_empty() {
        return Err(Error::Input(format!("the {which} prompt is empty")));
    }
    let token_ids = model.tokenizer.encode_prompt_with(text, prepend_bos)?;
    check_in_vocabulary(model, &token_ids, text)?;
    if token_ids.is_empty() {
        return Err(Error::Input(format!("the {which} prompt has no tokens")));
    }
    let max = model.config.max_position_embeddings;
    if token_ids.len() > max {
        return Err(Error::Input(format!(
            "the {which} prompt is {} tokens; the model takes at most {max}",
            token_ids.len()
        )));
    }
    Ok(PromptRecord {
        text: text.to_owned(),
        tokens: model.tokenizer.token_texts(&token_ids),
        token_ids,
    })
}

/// "[0]'After' [1]' John' …" for messages.
fn token_list(p: &PromptRecord) -> String {
    p.tokens
        .iter()
        .enumerate()
        .map(|(i, t)| format!("[{i}]{t:?}"))
        .collect::<Vec<_>>()
        .join(" ")
}
