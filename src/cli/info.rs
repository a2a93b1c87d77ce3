//! `patchbay info`: a model's architecture and where it was loaded from.

use super::{ModelArgs, load_model};
use patchbay::Result;

pub fn run(args: ModelArgs) -> Result<()> {
    let model = load_model(&args, false)?;
    let c = &model.config;
    println!("model          {}", model.source.display_name());
    println!("source         {:?}", model.source);
    println!("architecture   {}", c.family.hf_class());
    println!("layers         {}", c.num_layers);
    println!("hidden size    {}", c.hidden_size);
    println!(
        "heads          {} query, {} key/value, head_dim {}",
        c.num_heads, c.num_kv_heads, c.head_dim
    );
    println!("mlp size       {}", c.intermediate_size);
    println!(
        "vocab          {} (tokenizer {})",
        c.vocab_size,
        model.tokenizer.vocab_size()
    );
    println!("rope           theta {}, scaling {:?}", c.rope_theta, c.rope_scaling);
    println!("tied embedding {}", c.tie_word_embeddings);
    println!("dtype/device   {} on {}", model.dtype().as_str(), model.device_kind());
    println!("loaded in      {:.2} s", model.load_seconds);
    Ok(())
}
