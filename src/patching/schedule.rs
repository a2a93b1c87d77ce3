//! Planning a sweep's cells: the two schedules, the fast schedule's blocks (one packed forward
//! each, sized for early cells, efficient matmuls and bounded memory) and running blocks with the
//! out-of-memory policy (split and retry).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::ArchConfig;

/// Fast schedule: the first block of cells costs about this fraction of the whole sweep, so cells
/// reach the UI early (SmolLM2 IOI: the next-to-last layer's 7 cells, mostly unembeddings; the
/// last layer's come with the baselines).
const FAST_FIRST_BLOCK_FRACTION: f64 = 1.0 / 400.0;
/// Fast schedule: each later block may cost this many times the one before. Fewer, larger forwards
/// keep the matmuls efficient; more, smaller ones fill the heatmap more smoothly (SmolLM2 IOI:
/// blocks of 7, 14, 42 and 140 cells after the last layer's 7).
const FAST_BLOCK_GROWTH: usize = 6;
/// Fast schedule: a block with this many packed token rows runs its matmuls about as efficiently
/// as any larger one (measured: docs/BENCHMARKS.md, "Measurements behind the code").
const FAST_EFFICIENT_ROWS: usize = 1024;
/// Fast schedule: a block that is efficient ([`FAST_EFFICIENT_ROWS`]) ends at the first layer
/// boundary after it costs this share of the sweep, however large the growth would let it be: a
/// long prompt's heatmap then fills in steady steps rather than one long wait, at no cost in speed
/// (docs/BENCHMARKS.md, "The two schedules").
const FAST_MAX_BLOCK_SHARE: f64 = 1.0 / 8.0;
/// Fast schedule: at most this many bytes of f32 logits per block (bounds memory on big
/// vocabularies: 220 cells of Qwen3's 151,936 logits).
const FAST_MAX_BLOCK_LOGIT_BYTES: usize = 128 << 20;
/// Fast schedule: at most about this many bytes of one layer's activations per block (bounds
/// memory on long prompts, whose cones are long: SmolLM2 in f32 on the CPU packs at most
/// ~16k token rows, Qwen3-0.6B ~7k, far more than a matmul needs to run efficiently).
const FAST_MAX_BLOCK_ACTIVATION_BYTES: usize = 512 << 20;

pub(crate) use super::layout::CellAt;

/// How cells are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Schedule {
    /// Only each patch's causal cone (later layers, later positions), many cells per packed forward,
    /// late-position cells first so every layer row fills early.
    #[default]
    Fast,
    /// One full forward of the corrupted prompt per cell (`batch_cells` rows per forward), as
    /// notebooks do: the baseline.
    Naive,
}

impl Schedule {
    /// Every schedule.
    pub const ALL: [Schedule; 2] = [Schedule::Fast, Schedule::Naive];

    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Fast => "fast",
            Schedule::Naive => "naive",
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How [`run_blocks`] ended.
pub(crate) struct BlockRun {
    /// `cancel` was set before every block had run.
    pub(crate) cancelled: bool,
    /// The error that stopped the run; the blocks before it were delivered.
    pub(crate) error: Option<Error>,
    /// The most cells per forward once the device had run out of memory on larger blocks.
    pub(crate) split_to: Option<usize>,
}

/// Runs `blocks` in order through `step`, which computes a block and delivers its cells, checking
/// `cancel` before each. A block the device has no memory for is split in halves and retried, and
/// no later block is larger than those halves; any other error, or running out of memory on a
/// single cell, stops the run, keeping what was delivered.
pub(crate) fn run_blocks(
    blocks: Vec<Vec<CellAt>>,
    cancel: &AtomicBool,
    step: &mut dyn FnMut(&[CellAt]) -> Result<()>,
) -> BlockRun {
    let mut queue: VecDeque<Vec<CellAt>> = blocks.into();
    let mut run = BlockRun {
        cancelled: false,
        error: None,
        split_to: None,
    };
    let split = |queue: &mut VecDeque<Vec<CellAt>>, block: &[CellAt], most: usize| {
        for part in block.chunks(most).rev() {
            queue.push_front(part.to_vec());
        }
    };
    while let Some(block) = queue.pop_front() {
        if cancel.load(Ordering::Relaxed) {
            run.cancelled = true;
            break;
        }
        if let Some(most) = run.split_to.filter(|&most| block.len() > most) {
            split(&mut queue, &block, most);
            continue;
        }
        match step(&block) {
            Ok(()) => {}
            // `step` saw `cancel` mid-block: the block's cells are dropped, the earlier ones kept.
            Err(Error::Cancelled(_)) => {
                run.cancelled = true;
                break;
            }
            Err(e) if e.is_out_of_memory() && block.len() > 1 => {
                let half = block.len().div_ceil(2);
                run.split_to = Some(half);
                split(&mut queue, &block, half);
            }
            Err(e) => {
                run.error = Some(e);
                break;
            }
        }
    }
    run
}

/// Groups `cells` (in schedule order) into blocks, one packed forward each: the first costs about
/// [`FAST_FIRST_BLOCK_FRACTION`] of the total `cost`, each later one up to [`FAST_BLOCK_GROWTH`]
/// times the one before, but no more than [`FAST_MAX_BLOCK_SHARE`] of the total once it has
/// [`FAST_EFFICIENT_ROWS`] rows; a block ends where the layer changes, and a remainder cheaper
/// than the block just filled joins it. Whatever the costs, no block has more than `max_cells`
/// cells or more than `max_rows` packed token `rows` (but one cell).
pub(crate) fn pack_blocks(
    cells: &[CellAt],
    cost: &dyn Fn(&CellAt) -> usize,
    rows: &dyn Fn(&CellAt) -> usize,
    max_cells: usize,
    max_rows: usize,
) -> Vec<Vec<CellAt>> {
    let mut remaining: usize = cells.iter().map(cost).sum();
    let mut budget = ((remaining as f64 * FAST_FIRST_BLOCK_FRACTION) as usize).max(1);
    let share = ((remaining as f64 * FAST_MAX_BLOCK_SHARE) as usize).max(1);
    let mut blocks = Vec::new();
    let mut block: Vec<CellAt> = Vec::new();
    let (mut spent, mut packed) = (0, 0);
    for (i, cell) in cells.iter().enumerate() {
        spent += cost(cell);
        remaining -= cost(cell);
        packed += rows(cell);
        block.push(*cell);
        let next = cells.get(i + 1);
        let layer_ends = next.is_none_or(|next| next.layer != cell.layer);
        let full = block.len() >= max_cells || next.is_some_and(|next| packed + rows(next) > max_rows);
        let enough = spent >= budget || (packed >= FAST_EFFICIENT_ROWS && spent >= share);
        if full || (layer_ends && enough && remaining >= spent.min(budget)) {
            blocks.push(std::mem::take(&mut block));
            (spent, packed) = (0, 0);
            budget = budget.saturating_mul(FAST_BLOCK_GROWTH);
        }
    }
    if !block.is_empty() {
        blocks.push(block);
    }
    blocks
}

/// Orders the fast schedule's cells and groups them into blocks, one packed forward each.
///
/// Late layers first: their cones are short, so the first block is cheap and reaches the UI
/// quickly, and a block of consecutive layers shares every weight read from its first layer on.
/// The first block costs about [`FAST_FIRST_BLOCK_FRACTION`] of the sweep and each later one up
/// to [`FAST_BLOCK_GROWTH`] times the one before, so the bulk runs in a few large, efficient
/// forwards ([`pack_blocks`]), within the memory bounds [`FAST_MAX_BLOCK_LOGIT_BYTES`] and
/// [`FAST_MAX_BLOCK_ACTIVATION_BYTES`]. `seq` is the prompts' length, `cost` a cell's predicted
/// cost, `rows` its cone's token rows, and `tensor_attention` whether the forward takes the tensor
/// attention (any device and dtype but f32 on the CPU).
pub(crate) fn fast_blocks(
    mut cells: Vec<CellAt>,
    cfg: &ArchConfig,
    seq: usize,
    tensor_attention: bool,
    cost: &dyn Fn(&CellAt) -> usize,
    rows: &dyn Fn(&CellAt) -> usize,
) -> Vec<Vec<CellAt>> {
    late_layers_first(&mut cells);
    let (max_cells, max_rows) = block_bounds(cfg, seq, tensor_attention);
    pack_blocks(&cells, cost, rows, max_cells, max_rows)
}

/// Late layers first, late positions first within a layer; then heads and block parts in order.
fn late_layers_first(cells: &mut [CellAt]) {
    cells.sort_by(|a, b| {
        b.layer
            .cmp(&a.layer)
            .then(b.position.cmp(&a.position))
            .then(a.head.cmp(&b.head))
            .then(a.part.cmp(&b.part))
    });
}

/// One tier of cells an estimate ranked together, as few blocks as the memory bounds allow (late
/// layers first within it): the tier's cells all matter about as much, so they share forwards.
pub(crate) fn tier_blocks(
    mut cells: Vec<CellAt>,
    cfg: &ArchConfig,
    seq: usize,
    tensor_attention: bool,
    rows: &dyn Fn(&CellAt) -> usize,
) -> Vec<Vec<CellAt>> {
    late_layers_first(&mut cells);
    let (max_cells, max_rows) = block_bounds(cfg, seq, tensor_attention);
    let mut blocks: Vec<Vec<CellAt>> = Vec::new();
    let mut packed = 0;
    for cell in cells {
        let r = rows(&cell);
        match blocks.last_mut() {
            Some(block) if block.len() < max_cells && packed + r <= max_rows => {
                block.push(cell);
                packed += r;
            }
            _ => {
                blocks.push(vec![cell]);
                packed = r;
            }
        }
    }
    blocks
}

/// The most cells and packed token rows one block may hold: its logits and its activations stay
/// within [`FAST_MAX_BLOCK_LOGIT_BYTES`] and [`FAST_MAX_BLOCK_ACTIVATION_BYTES`].
pub(super) fn block_bounds(cfg: &ArchConfig, seq: usize, tensor_attention: bool) -> (usize, usize) {
    let max_cells = (FAST_MAX_BLOCK_LOGIT_BYTES / (4 * cfg.vocab_size.max(1))).max(1);
    // A packed token row's activations in one layer: the residual stream and its copies (norm,
    // attention output, resid_mid, MLP output), queries, keys and values, and the MLP's gate,
    // up and product. Off the CPU's f32 path, attention is batched tensors too: a row's scores
    // over every key slot per head (in the dtype, an f32 copy and the probabilities), cones
    // padded to the longest (up to twice the rows).
    let attention_bytes = if tensor_attention {
        2 * cfg.num_heads * seq * 12
    } else {
        0
    };
    let row_bytes = 4
        * (5 * cfg.hidden_size + (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim + 3 * cfg.intermediate_size)
        + attention_bytes;
    let max_rows = (FAST_MAX_BLOCK_ACTIVATION_BYTES / row_bytes.max(1)).max(seq);
    (max_cells, max_rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(sizes: &[usize]) -> Vec<Vec<CellAt>> {
        let mut next = 0;
        sizes
            .iter()
            .map(|&n| {
                let block = (next..next + n).map(|i| CellAt::at(i / 10, i % 10)).collect();
                next += n;
                block
            })
            .collect()
    }

    fn out_of_memory() -> Error {
        // What cudarc's allocator failure looks like through candle.
        Error::Candle(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ))
    }

    #[test]
    fn blocks_grow_end_at_layer_boundaries_and_keep_within_their_bounds() {
        // SmolLM2 IOI resid_post as the fast schedule orders it: layers 28..0 (the last layer's
        // cells come with the baselines) × positions 15..9, each cell costing its cone (the layers
        // after it × its tokens) and the unembedding of a row (8 token-layers).
        let cells: Vec<CellAt> = (0..29)
            .rev()
            .flat_map(|l| (9..16).rev().map(move |p| CellAt::at(l, p)))
            .collect();
        let pos = |at: &CellAt| at.position.unwrap();
        let cost = |at: &CellAt| (29 - at.layer) * (16 - pos(at)) + 8;
        let rows = |at: &CellAt| 16 - pos(at);
        let check = |blocks: &[Vec<CellAt>], max_cells: usize, max_rows: usize| {
            assert_eq!(blocks.concat(), cells, "every cell once, in order");
            for b in blocks {
                assert!(!b.is_empty() && b.len() <= max_cells);
                assert!(b.len() == 1 || b.iter().map(rows).sum::<usize>() <= max_rows, "{b:?}");
            }
        };
        let free = pack_blocks(&cells, &cost, &rows, usize::MAX, usize::MAX);
        check(&free, usize::MAX, usize::MAX);
        let sizes: Vec<usize> = free.iter().map(Vec::len).collect();
        assert_eq!(sizes, [7, 14, 42, 140]);
        // Bounded: no block over 20 cells or 60 rows, though the budget would allow more.
        let bounded = pack_blocks(&cells, &cost, &rows, 20, 60);
        check(&bounded, 20, 60);
        assert!(bounded.len() > free.len());
        // A cell larger than the row bound still runs, alone.
        let alone = pack_blocks(&cells, &cost, &rows, usize::MAX, 3);
        check(&alone, usize::MAX, 3);
        assert!(alone.iter().any(|b| b == &[CellAt::at(28, 9)]));
    }

    #[test]
    fn long_prompts_blocks_stop_growing_once_efficient() {
        // 43 tokens differing at the first: every cell is computed, and the cones are long.
        let (layers, seq) = (30, 43);
        let cells: Vec<CellAt> = (0..layers - 1)
            .rev()
            .flat_map(|l| (0..seq).rev().map(move |p| CellAt::at(l, p)))
            .collect();
        let pos = |at: &CellAt| at.position.unwrap();
        let cost = |at: &CellAt| (layers - 1 - at.layer) * (seq - pos(at)) + 8;
        let rows = |at: &CellAt| seq - pos(at);
        let total: usize = cells.iter().map(cost).sum();
        let blocks = pack_blocks(&cells, &cost, &rows, usize::MAX, usize::MAX);
        assert_eq!(blocks.concat(), cells, "every cell once, in order");
        let costs: Vec<usize> = blocks.iter().map(|b| b.iter().map(cost).sum()).collect();
        // The first blocks grow as usual; no block, the last (which takes a small remainder) aside,
        // costs much more than the share plus one layer's cells.
        assert!(costs[0] < costs[1] && costs[1] < costs[2], "{costs:?}");
        let layer_cost = (layers - 1) * rows(&CellAt::at(0, 0)) * seq;
        let share = (total as f64 * FAST_MAX_BLOCK_SHARE) as usize;
        for &c in &costs[..costs.len() - 1] {
            assert!(c < share + layer_cost, "{c} of {total}: {costs:?}");
        }
        assert!(*costs.last().unwrap() < 2 * (share + layer_cost), "{costs:?}");
        assert!(blocks.len() >= 7, "{costs:?}");
    }

    #[test]
    fn out_of_memory_splits_blocks_and_every_cell_still_arrives_in_order() {
        let all: Vec<_> = blocks(&[7, 14, 1]).concat();
        let mut delivered = Vec::new();
        let mut sizes = Vec::new();
        let run = run_blocks(blocks(&[7, 14, 1]), &AtomicBool::new(false), &mut |block| {
            if block.len() > 2 {
                return Err(out_of_memory());
            }
            sizes.push(block.len());
            delivered.extend_from_slice(block);
            Ok(())
        });
        assert!(!run.cancelled && run.error.is_none());
        assert_eq!(delivered, all);
        // 7 → 4 + 3 → (2 + 2) + (2 + 1); the 14 then runs as 2s without failing first.
        assert_eq!(run.split_to, Some(2));
        assert_eq!(sizes, [2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 2, 1]);
        assert!(out_of_memory().to_string().starts_with("the GPU ran out of memory"));
    }

    #[test]
    fn other_errors_and_a_single_cell_out_of_memory_stop_the_run_keeping_earlier_blocks() {
        for (failure, what) in [
            (Error::Input("broken".into()), "another error"),
            (out_of_memory(), "out of memory on one cell"),
        ] {
            let mut failure = Some(failure);
            let mut delivered = Vec::new();
            let run = run_blocks(blocks(&[1, 1, 1]), &AtomicBool::new(false), &mut |block| {
                if delivered.len() == 1 {
                    return Err(failure.take().expect("no retry after a stop"));
                }
                delivered.extend_from_slice(block);
                Ok(())
            });
            assert_eq!(delivered, [CellAt::at(0, 0)], "{what}");
            assert!(
                run.error.is_some() && !run.cancelled && run.split_to.is_none(),
                "{what}"
            );
        }
        let cancel = AtomicBool::new(true);
        let run = run_blocks(blocks(&[2]), &cancel, &mut |_| panic!("cancelled before it ran"));
        assert!(run.cancelled && run.error.is_none());
        // A cancel seen inside a block (forward_cones looks before each layer) is a cancel.
        let mut delivered = Vec::new();
        let run = run_blocks(blocks(&[1, 1, 1]), &AtomicBool::new(false), &mut |block| {
            if delivered.len() == 1 {
                return Err(Error::Cancelled("cancelled".into()));
            }
            delivered.extend_from_slice(block);
            Ok(())
        });
        assert!(run.cancelled && run.error.is_none() && delivered == [CellAt::at(0, 0)]);
    }
}
