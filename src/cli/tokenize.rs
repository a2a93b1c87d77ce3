//! `patchbay tokenize`: how prompts and answers tokenize, with positions.

use clap::Args;

use super::{ModelArgs, load_model};
use patchbay::Result;

/// `patchbay tokenize`.
#[derive(Debug, Args)]
pub struct TokenizeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Texts to tokenize (prompts get the model's BOS, like a sweep; use --plain for answers).
    #[arg(required = true)]
    pub texts: Vec<String>,
    /// Tokenize without special tokens, as answers are.
    #[arg(long)]
    pub plain: bool,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let model = load_model(&args.model, true)?;
    for text in &args.texts {
        let ids = if args.plain {
            model.tokenizer.encode_plain(text)?
        } else {
            model.tokenizer.encode_prompt(text)?
        };
        println!("{text:?}: {} tokens", ids.len());
        for (i, id) in ids.iter().enumerate() {
            println!("  {i:>4}  {id:>7}  {:?}", model.tokenizer.token_text(*id));
        }
    }
    Ok(())
}
