//! Writing results: data files that load straight into a notebook, and figures.

pub mod colormap;
pub mod data;
pub mod figure;
