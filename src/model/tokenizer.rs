//! Tokenizers from an HF `tokenizer.json` or built from GGUF metadata, behind one small API.

use std::path::Path;

use candle_core::quantized::gguf_file;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::error::{Error, Result};

/// A tokenizer.json larger than this is refused (large vocabularies' are ~10 MiB).
const MAX_TOKENIZER_BYTES: u64 = 512 << 20;

/// GGUF `tokenizer.ggml.token_type` values for tokens that must never be split (control, user-defined).
const GGUF_TOKEN_CONTROL: i32 = 3;
const GGUF_TOKEN_USER_DEFINED: i32 = 4;

/// llama.cpp's `llama-bpe` pre-tokenizer regex (Llama 3.x).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's `qwen2` pre-tokenizer regex (Qwen2, Qwen2.5, Qwen3): single digits.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Turns text into token ids the way the model was trained, and ids back into display strings.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// The model's beginning-of-sequence token, when known (GGUF metadata, config.json).
    bos: Option<u32>,
    /// Prepend `bos` to every prompt where the tokenizer itself does not (GGUF `add_bos_token`).
    add_bos: bool,
}

impl TextTokenizer {
    /// Loads an HF `tokenizer.json`; its post-processor decides whether prompts get a BOS.
    pub fn from_file(path: &Path) -> Result<Self> {
        match std::fs::metadata(path) {
            Err(_) => return Err(Error::model_file("tokenizer.json is missing", path)),
            Ok(meta) if !meta.is_file() => {
                return Err(Error::model_file("tokenizer.json is not a regular file", path));
            }
            Ok(meta) if meta.len() > MAX_TOKENIZER_BYTES => {
                return Err(Error::model_file(
                    format!("tokenizer.json is {} bytes, far more than a tokenizer", meta.len()),
                    path,
                ));
            }
            Ok(_) => {}
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io("reading tokenizer.json", e, path))?;
        Self::from_json(&bytes).map_err(|why| Error::model_file(why, path))
    }

    /// A tokenizer from the contents of a tokenizer.json; the error says why it cannot be used.
    pub fn from_json(bytes: &[u8]) -> std::result::Result<Self, String> {
        // tokenizers panics on some malformed files (a truncated decoder section): refused like any
        // other unreadable one.
        let mut inner = crate::error::quietly(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|why| format!("cannot read tokenizer.json ({why})"))?
            .map_err(|e| format!("cannot read tokenizer.json ({e})"))?;
        // A sweep needs every token of its prompts: a tokenizer.json that truncates (or pads)
        // would cut or change them silently.
        inner
            .with_truncation(None)
            .map_err(|e| format!("cannot switch truncation off ({e})"))?;
        inner.with_padding(None);
        // A post-processor that adds a BOS names it: the first id of an empty encoding with
        // special tokens, when there is one.
        let bos = inner
            .encode("", true)
            .ok()
            .and_then(|e| e.get_ids().first().copied())
            .filter(|&id| {
                inner
                    .encode("", false)
                    .map_or(true, |e| e.get_ids().first() != Some(&id))
            });
        Ok(Self {
            inner,
            bos,
            add_bos: false,
        })
    }

    /// Builds the byte-level BPE tokenizer a GGUF file describes (`tokenizer.ggml.*`).
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let md = &content.metadata;
        let get_str = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).cloned();
        let model = get_str("tokenizer.ggml.model").unwrap_or_default();
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false);
        let bos = md.get("tokenizer.ggml.bos_token_id").and_then(|v| v.to_u32().ok());
        if model == "llama" {
            // SentencePiece (Gemma): built as HF transformers builds it.
            let inner = super::gguf_sentencepiece::sentencepiece_from_gguf(content).map_err(Error::Tokenizer)?;
            return Ok(Self {
                inner,
                bos,
                add_bos: add_bos && bos.is_some(),
            });
        }
        if model != "gpt2" {
            return Err(Error::Tokenizer(format!(
                "GGUF tokenizer model '{model}' is not supported (byte-level BPE 'gpt2', and Gemma's SentencePiece \
                 'llama')"
            )));
        }
        let strings = |k: &str| -> Result<Vec<String>> {
            let values = md
                .get(k)
                .and_then(|v| v.to_vec().ok())
                .ok_or_else(|| Error::Tokenizer(format!("GGUF metadata lacks '{k}'")))?;
            values
                .iter()
                .map(|v| {
                    v.to_string()
                        .cloned()
                        .map_err(|e| Error::Tokenizer(format!("{k}: {e}")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())))
            .collect();
        let types: Vec<i32> = md
            .get("tokenizer.ggml.token_type")
            .and_then(|v| v.to_vec().ok())
            .map(|v| v.iter().map(|t| t.to_i32().unwrap_or(1)).collect())
            .unwrap_or_default();
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| Error::Tokenizer(format!("building BPE from GGUF: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = get_str("tokenizer.ggml.pre").unwrap_or_default();
        let byte_level = |use_regex| PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, use_regex));
        let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
            Ok(PreTokenizerWrapper::Split(
                Split::new(
                    SplitPattern::Regex(pattern.to_owned()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| Error::Tokenizer(e.to_string()))?,
            ))
        };
        let pre_tokenizer = match pre.as_str() {
            "llama-bpe" | "llama3" | "smaug-bpe" => Sequence::new(vec![split(LLAMA3_SPLIT)?, byte_level(false)]),
            "qwen2" => Sequence::new(vec![split(QWEN2_SPLIT)?, byte_level(false)]),
            // SmolLM ("smollm") and GPT-2 style: digits one by one, then GPT-2's byte-level regex.
            _ => Sequence::new(vec![PreTokenizerWrapper::Digits(Digits::new(true)), byte_level(true)]),
        };
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevel::default()));
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, t)| **t == GGUF_TOKEN_CONTROL || **t == GGUF_TOKEN_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        inner
            .add_special_tokens(specials)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Self {
            inner,
            bos,
            add_bos: add_bos && bos.is_some(),
        })
    }

    /// A stand-in for models that come without one (synthetic benchmarks): token `i` is written
    /// `<i>`, and text is whitespace-separated `<i>` tokens.
    pub fn numbered(vocab_size: usize) -> Result<Self> {
        let model = WordLevel::builder()
            .vocab((0..vocab_size as u32).map(|i| (format!("<{i}>"), i)).collect())
            .unk_token("<0>".into())
            .build()
            .map_err(|e| Error::Tokenizer(format!("building a numbered vocabulary: {e}")))?;
        let mut inner = tokenizers::Tokenizer::new(model);
        inner.with_pre_tokenizer(Some(PreTokenizerWrapper::WhitespaceSplit(WhitespaceSplit)));
        Ok(Self {
            inner,
            bos: None,
            add_bos: false,
        })
    }

    /// Token ids of a prompt, with the BOS token when the model expects one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_prompt_with(text, false)
    }

    /// Token ids of a prompt, with the BOS token when the model expects one or `prepend_bos` asks
    /// for it (GPT-2's tokenizer adds none; TransformerLens prepends one by default).
    pub fn encode_prompt_with(&self, text: &str, prepend_bos: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if self.add_bos || prepend_bos {
            let bos = self.bos.ok_or_else(|| {
                Error::Input("this model's tokenizer names no BOS token, so none can be prepended".into())
            })?;
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// The beginning-of-sequence token, when the model has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// Whether prompts get a BOS without being asked (the tokenizer's post-processor or GGUF's
    /// `add_bos_token`).
    pub fn adds_bos(&self) -> bool {
        self.add_bos
            || self.bos.is_some_and(|bos| {
                self.inner
                    .encode("a", true)
                    .is_ok_and(|e| e.get_ids().first() == Some(&bos))
            })
    }

    /// Names `bos` as the beginning-of-sequence token where the tokenizer named none (config.json's
    /// `bos_token_id`).
    pub fn set_bos_if_unknown(&mut self, bos: Option<u32>) {
        if self.bos.is_none() {
            self.bos = bos.filter(|&id| self.inner.id_to_token(id).is_some());
        }
    }

    /// Token ids of a text with no special tokens added (answers, continuations).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text one token stands for, as a user reads it (" John", "\n").
    pub fn token_text(&self, id: u32) -> String {
        match self.inner.decode(&[id], false) {
            // A token holding part of a multi-byte character decodes to U+FFFD: show its vocabulary
            // spelling instead, which tells such tokens apart.
            Ok(s) if !s.is_empty() && !s.contains('\u{FFFD}') => s,
            _ => self.inner.id_to_token(id).unwrap_or_else(|| format!("<{id}>")),
        }
    }

    /// Display strings for a list of ids.
    pub fn token_texts(&self, ids: &[u32]) -> Vec<String> {
        ids.iter().map(|&id| self.token_text(id)).collect()
    }

    /// The vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
