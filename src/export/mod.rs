//! Writing results: data files that load straight into a notebook.

pub mod data;
