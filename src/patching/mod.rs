//! Activation patching: what can be patched, the metric, sweeps over layers × positions, results.

pub mod cost;
pub mod logits;
pub mod metric;
pub mod progress;
pub mod request;
pub mod result;
pub mod schedule;
pub mod sweep;

pub use cost::Estimate;
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
    /// The attention block's output at layer L.
    AttnOut,
    /// The MLP block's output at layer L.
    MlpOut,
}

impl Component {
    /// Every component, in the order menus show them.
    pub const ALL: [Component; 4] = [
        Component::ResidPost,
        Component::ResidPre,
        Component::AttnOut,
        Component::MlpOut,
    ];

    /// The snake_case name used on the command line and in exports.
    pub fn name(self) -> &'static str {
        match self {
            Component::ResidPost => "resid_post",
            Component::ResidPre => "resid_pre",
            Component::AttnOut => "attn_out",
            Component::MlpOut => "mlp_out",
        }
    }

    /// The forward-pass site this component reads and writes.
    pub fn site(self) -> Site {
        match self {
            Component::ResidPost => Site::ResidPost,
            Component::ResidPre => Site::ResidPre,
            Component::AttnOut => Site::AttnOut,
            Component::MlpOut => Site::MlpOut,
        }
    }
}

impl std::fmt::Display for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
