//! Activation patching: what can be patched, in which direction, the metrics, sweeps over layers ×
//! positions (× heads), results.

pub mod cost;
pub mod estimate;
mod forwards;
pub mod grid;
mod heads;
mod hooks;
pub mod layout;
pub mod logits;
pub mod metric;
pub mod pattern;
mod prepare;
pub mod progress;
pub mod request;
pub mod result;
pub mod schedule;
pub mod sweep;
pub mod together;

pub use cost::Estimate;
pub use layout::{Axis, CellAt, Layout, View};
pub use metric::Metric;
pub use pattern::{HeadPatterns, PatternRequest, head_patterns};
pub use progress::{Progress, SweepEvent};
pub use request::{SweepRequest, TokenSweepRequest, ValidRequest};
pub use result::{Cell, SweepResult, TopToken};
pub use schedule::Schedule;
pub use sweep::{Sweep, SweepOptions};

use serde::{Deserialize, Serialize};

use crate::model::Site;

/// The activation a sweep patches, named as in TransformerLens' `get_act_patch_*` functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Component {
    /// The residual stream after layer L (the decoder layer's output): what the seed notebook patches.
    #[default]
    ResidPost,
    /// The residual stream entering layer L.
    ResidPre,
    /// The residual stream between layer L's attention and its MLP.
    ResidMid,
    /// The attention block's output at layer L.
    AttnOut,
    /// The MLP block's output at layer L.
    MlpOut,
    /// resid_pre, attn_out and mlp_out side by side, `[3, layer, position]`
    /// (TransformerLens' `get_act_patch_block_every`).
    Block,
    /// One attention head's output: its `head_dim` slice of o_proj's input (TransformerLens' `z`).
    HeadOut,
    /// One head's queries.
    HeadQ,
    /// One key/value head's keys (shared by the query heads of its group under GQA).
    HeadK,
    /// One key/value head's values.
    HeadV,
    /// One head's attention pattern (the softmax probabilities over source positions).
    HeadPattern,
}

impl Component {
    /// Every component, in the order menus show them.
    pub const ALL: [Component; 11] = [
        Component::ResidPost,
        Component::ResidPre,
        Component::ResidMid,
        Component::AttnOut,
        Component::MlpOut,
        Component::Block,
        Component::HeadOut,
        Component::HeadQ,
        Component::HeadK,
        Component::HeadV,
        Component::HeadPattern,
    ];

    /// What a block sweep patches, in the order of its first axis.
    pub const BLOCK_PARTS: [Component; 3] = [Component::ResidPre, Component::AttnOut, Component::MlpOut];

    /// The snake_case name used on the command line and in exports.
    pub fn name(self) -> &'static str {
        match self {
            Component::ResidPost => "resid_post",
            Component::ResidPre => "resid_pre",
            Component::ResidMid => "resid_mid",
            Component::AttnOut => "attn_out",
            Component::MlpOut => "mlp_out",
            Component::Block => "block",
            Component::HeadOut => "head_out",
            Component::HeadQ => "head_q",
            Component::HeadK => "head_k",
            Component::HeadV => "head_v",
            Component::HeadPattern => "head_pattern",
        }
    }

    /// Whether cells are per attention head (query heads, or key/value heads for head_k/head_v).
    pub fn has_heads(self) -> bool {
        matches!(
            self,
            Component::HeadOut | Component::HeadQ | Component::HeadK | Component::HeadV | Component::HeadPattern
        )
    }

    /// Whether cells are per key/value head (GQA: one cell serves several query heads).
    pub fn per_kv_head(self) -> bool {
        matches!(self, Component::HeadK | Component::HeadV)
    }

    /// The forward-pass site this component reads and writes (none for `block`, which patches three).
    pub fn site(self) -> Option<Site> {
        Some(match self {
            Component::ResidPost => Site::ResidPost,
            Component::ResidPre => Site::ResidPre,
            Component::ResidMid => Site::ResidMid,
            Component::AttnOut => Site::AttnOut,
            Component::MlpOut => Site::MlpOut,
            Component::Block => return None,
            Component::HeadOut => Site::Z,
            Component::HeadQ => Site::Q,
            Component::HeadK => Site::K,
            Component::HeadV => Site::V,
            Component::HeadPattern => Site::Pattern,
        })
    }

    /// One line for a menu's tooltip.
    pub fn describe(self) -> &'static str {
        match self {
            Component::ResidPost => "the residual stream leaving the layer (the decoder layer's output)",
            Component::ResidPre => "the residual stream entering the layer",
            Component::ResidMid => "the residual stream between the layer's attention and its MLP",
            Component::AttnOut => "the attention block's output, before it joins the residual stream",
            Component::MlpOut => "the MLP block's output, before it joins the residual stream",
            Component::Block => "resid_pre, attn_out and mlp_out, one sweep each, side by side",
            Component::HeadOut => "one attention head's output (its slice of o_proj's input, TransformerLens' z)",
            Component::HeadQ => "one attention head's queries",
            Component::HeadK => "one key/value head's keys (shared by its group of query heads)",
            Component::HeadV => "one key/value head's values (shared by its group of query heads)",
            Component::HeadPattern => "one head's attention pattern over source positions",
        }
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which run gets the patch (Heimersheim & Nanda, "How to use and interpret activation patching").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Direction {
    /// The clean activation written into the corrupted run: is this component sufficient to
    /// restore clean behaviour? (The seed notebook's procedure.)
    #[default]
    Denoising,
    /// The corrupted activation written into the clean run: is this component necessary for it?
    Noising,
}

impl Direction {
    /// Both directions, in the order menus show them.
    pub const ALL: [Direction; 2] = [Direction::Denoising, Direction::Noising];

    /// The name used on the command line and in exports.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Denoising => "denoising",
            Direction::Noising => "noising",
        }
    }

    /// How to read a sweep's normalized values in this direction.
    pub fn reading(self) -> &'static str {
        match self {
            Direction::Denoising => {
                "clean activations patched into the corrupted run: 1 where the patch alone restores \
                 clean behaviour (this component is sufficient), 0 where it changes nothing"
            }
            Direction::Noising => {
                "corrupted activations patched into the clean run: near 0 where the patch destroys \
                 clean behaviour (this component is necessary), 1 where the model does not need it"
            }
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
