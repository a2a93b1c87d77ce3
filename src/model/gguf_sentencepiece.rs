//! A `tokenizers::Tokenizer` for the SentencePiece-style vocabulary of a Gemma GGUF file
//! (`tokenizer.ggml.model` = "llama", tokens + scores + token types, no merges), built the way HF
//! transformers builds it when it loads the file (transformers 5.x,
//! `integrations/gguf/gguf_tokenizer_mapping.py`: `gemma_tokenizer` → `GemmaTokenizer`):
//!
//! - vocabulary: the file's tokens, except that a token made only of whitespace that holds a space
//!   (Gemma stores its runs of 2..31 spaces as real spaces) is respelled as that many '▁';
//! - model: BPE with byte fallback, `fuse_unk`, unk = the file's unknown token, and merges derived
//!   from the vocabulary (transformers' `generate_merges`): every split of every token into two
//!   pieces that are both tokens, ranked by the token's position in the file (earlier first; Gemma's
//!   scores are not used) and, within one token, longer left piece first;
//! - normalizer: Replace(' ' → '▁'); no prefix space is prepended;
//! - pre-tokenizer: Split(' ', merged with previous), which after that normalizer never splits;
//! - decoder: Replace('▁' → ' '), ByteFallback, Fuse;
//! - added tokens: CONTROL tokens (type 3) as special tokens, USER_DEFINED ones (type 4: "\n" runs,
//!   tab runs, HTML tags, `[multimodal]`, …) whose spelling is in the vocabulary as non-special added
//!   tokens, all matched in the raw text (not normalized). The space runs are USER_DEFINED too, but
//!   after the respelling their spelling is not in the vocabulary, so (as in transformers) they are
//!   not added tokens: BPE reaches them through the '▁' merges.
//!
//! No post-processor: nothing adds BOS (transformers' GemmaTokenizer does, through a template);
//! the caller prepends `tokenizer.ggml.bos_token_id` when `tokenizer.ggml.add_bos_token` is true.

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior};

/// GGUF `tokenizer.ggml.token_type` values.
const GGUF_TOKEN_CONTROL: i32 = 3;
const GGUF_TOKEN_USER_DEFINED: i32 = 4;

/// Architectures whose SentencePiece GGUF vocabulary transformers turns into a `GemmaTokenizer`.
const GEMMA_ARCHITECTURES: &[&str] = &["gemma", "gemma2", "gemma3"];

/// Builds the tokenizer HF transformers builds for a Gemma GGUF's SentencePiece vocabulary, without
/// BOS handling (see the module documentation). The error says why the file cannot be used.
pub fn sentencepiece_from_gguf(content: &gguf_file::Content) -> std::result::Result<tokenizers::Tokenizer, String> {
    let md = &content.metadata;
    let get_str = |k: &str| md.get(k).and_then(|v| v.to_string().ok()).map(String::as_str);
    let model = get_str("tokenizer.ggml.model").unwrap_or_default();
    if model != "llama" {
        return Err(format!("GGUF tokenizer model '{model}' is not SentencePiece ('llama')"));
    }
    let arch = get_str("general.architecture").unwrap_or_default();
    if !GEMMA_ARCHITECTURES.contains(&arch) {
        // Llama-style SentencePiece files get LlamaTokenizer in transformers (a Metaspace
        // pre-tokenizer and score-ranked merges): a different tokenizer, not built here.
        return Err(format!(
            "SentencePiece GGUF vocabularies are supported for Gemma models only, not '{arch}'"
        ));
    }
    if md.contains_key("tokenizer.ggml.merges") {
        return Err("this Gemma GGUF lists merges; only files without them are supported".into());
    }
    let tokens: Vec<&str> = md
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .ok_or("GGUF metadata lacks 'tokenizer.ggml.tokens'")?
        .iter()
        .map(|v| {
            v.to_string()
                .map(String::as_str)
                .map_err(|e| format!("tokenizer.ggml.tokens: {e}"))
        })
        .collect::<Result<_, _>>()?;
    let types: Vec<i32> = match md.get("tokenizer.ggml.token_type").and_then(|v| v.to_vec().ok()) {
        Some(values) => values
            .iter()
            .map(|v| v.to_i32().map_err(|e| format!("tokenizer.ggml.token_type: {e}")))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    if !types.is_empty() && types.len() != tokens.len() {
        return Err(format!(
            "GGUF has {} tokens but {} token types",
            tokens.len(),
            types.len()
        ));
    }

    // Runs of spaces are stored as spaces; the normalized text spells them with '▁'.
    let respelled: Vec<std::borrow::Cow<'_, str>> = tokens
        .iter()
        .map(|t| {
            if t.contains(' ') && t.trim().is_empty() {
                std::borrow::Cow::Owned("\u{2581}".repeat(t.chars().count()))
            } else {
                std::borrow::Cow::Borrowed(*t)
            }
        })
        .collect();
    let mut vocab = Vocab::with_capacity(respelled.len());
    for (i, t) in respelled.iter().enumerate() {
        // A repeated spelling keeps its last id, as a Python dict comprehension does.
        vocab.insert(t.to_string(), i as u32);
    }

    // transformers' generate_merges(vocab, {token: -index}): every token in file order (a repeated
    // spelling at its first position), each split into two tokens, the longer left piece first.
    let mut merges: Vec<(String, String)> = Vec::with_capacity(respelled.len() * 2);
    let has_repeats = vocab.len() != respelled.len();
    let mut seen = std::collections::HashSet::new();
    for t in &respelled {
        if has_repeats && !seen.insert(t.as_ref()) {
            continue;
        }
        for (b, _) in t.char_indices().rev().filter(|&(b, _)| b > 0) {
            let (l, r) = t.split_at(b);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                merges.push((l.to_owned(), r.to_owned()));
            }
        }
    }

    let unk = md
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(|v| v.to_u32().ok())
        .and_then(|id| respelled.get(id as usize))
        .map(|t| t.to_string())
        .unwrap_or_else(|| "<unk>".to_owned());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| format!("building BPE from GGUF: {e}"))?;

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    let space = Replace::new(" ", "\u{2581}").map_err(|e| e.to_string())?;
    tokenizer.with_normalizer(Some(space)).map_err(|e| e.to_string())?;
    tokenizer.with_pre_tokenizer(Some(
        Split::new(
            SplitPattern::String(" ".into()),
            SplitDelimiterBehavior::MergedWithPrevious,
            false,
        )
        .map_err(|e| e.to_string())?,
    ));
    tokenizer.with_decoder(Some(DecoderSequence::new(vec![
        DecoderWrapper::Replace(Replace::new("\u{2581}", " ").map_err(|e| e.to_string())?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ])));

    let of_type = |wanted: i32| {
        tokens
            .iter()
            .zip(types.iter())
            .filter(move |(_, t)| **t == wanted)
            .map(|(s, _)| *s)
    };
    let control: Vec<AddedToken> = of_type(GGUF_TOKEN_CONTROL)
        .map(|s| AddedToken::from(s, true).normalized(false))
        .collect();
    tokenizer.add_special_tokens(control).map_err(|e| e.to_string())?;
    let user_defined: Vec<AddedToken> = of_type(GGUF_TOKEN_USER_DEFINED)
        .filter(|s| tokenizer.token_to_id(s).is_some())
        .map(|s| AddedToken::from(s, false).normalized(false))
        .collect();
    tokenizer.add_tokens(user_defined).map_err(|e| e.to_string())?;
    Ok(tokenizer)
}
