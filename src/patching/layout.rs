//! Where a sweep's cells sit: [`CellAt`] (what one cell patches), [`Layout`] (the grid's axes,
//! shape and flat index, as TransformerLens' `get_act_patch_*` order them) and [`View`] (the 2-D
//! slice a heatmap or figure shows).

use serde::{Deserialize, Serialize};

use super::Component;
use crate::model::ArchConfig;

/// An axis of a sweep's grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    /// Which of a block sweep's components.
    Component,
    Layer,
    Position,
    /// Query head, or key/value head for head_k and head_v.
    Head,
}

/// Where a cell sits in a sweep: what is patched to compute it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CellAt {
    /// The layer patched.
    pub layer: usize,
    /// The position patched; `None` for every position at once (head sweeps without
    /// `by_position`).
    pub position: Option<usize>,
    /// The head patched (a key/value head for head_k and head_v); `None` for components without heads.
    pub head: Option<usize>,
    /// Block sweeps: the index in [`Component::BLOCK_PARTS`]; 0 otherwise.
    pub part: usize,
}

impl CellAt {
    /// A (layer, position) cell of a component without heads.
    pub fn at(layer: usize, position: usize) -> Self {
        Self {
            layer,
            position: Some(position),
            head: None,
            part: 0,
        }
    }
}

/// The four grids a sweep can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grid {
    /// `[layer, position]`: the residual stream and block outputs.
    LayerPosition,
    /// `[component, layer, position]`: block sweeps.
    Block,
    /// `[layer, head]`: head sweeps, every position of a head at once.
    LayerHead,
    /// `[layer, position, head]`: head sweeps by position.
    LayerPositionHead,
}

/// The cells of a sweep and where each sits in its grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub component: Component,
    pub by_position: bool,
    pub layers: usize,
    pub positions: usize,
    /// Heads per layer along the head axis (key/value heads for head_k and head_v); 0 without heads.
    pub heads: usize,
}

impl Layout {
    /// The layout of a sweep of `component` over `positions` tokens on a model of `cfg`.
    pub fn for_model(component: Component, by_position: bool, cfg: &ArchConfig, positions: usize) -> Self {
        Self {
            component,
            by_position,
            layers: cfg.num_layers,
            positions,
            heads: if component.per_kv_head() {
                cfg.num_kv_heads
            } else if component.has_heads() {
                cfg.num_heads
            } else {
                0
            },
        }
    }

    fn grid(&self) -> Grid {
        match self.component {
            Component::Block => Grid::Block,
            c if !c.has_heads() => Grid::LayerPosition,
            _ if self.by_position => Grid::LayerPositionHead,
            _ => Grid::LayerHead,
        }
    }

    /// The grid's axes.
    pub fn axes(&self) -> Vec<Axis> {
        match self.grid() {
            Grid::LayerPosition => vec![Axis::Layer, Axis::Position],
            Grid::Block => vec![Axis::Component, Axis::Layer, Axis::Position],
            Grid::LayerHead => vec![Axis::Layer, Axis::Head],
            Grid::LayerPositionHead => vec![Axis::Layer, Axis::Position, Axis::Head],
        }
    }

    /// The length of `axis`.
    pub fn len_of(&self, axis: Axis) -> usize {
        match axis {
            Axis::Component => Component::BLOCK_PARTS.len(),
            Axis::Layer => self.layers,
            Axis::Position => self.positions,
            Axis::Head => self.heads,
        }
    }

    /// The grid's shape, one number per axis.
    pub fn shape(&self) -> Vec<usize> {
        self.axes().into_iter().map(|a| self.len_of(a)).collect()
    }

    /// Number of cells.
    pub fn len(&self) -> usize {
        let (l, p, h) = (self.layers, self.positions, self.heads);
        match self.grid() {
            Grid::LayerPosition => l * p,
            Grid::Block => Component::BLOCK_PARTS.len() * l * p,
            Grid::LayerHead => l * h,
            Grid::LayerPositionHead => l * p * h,
        }
    }

    /// Whether the grid has no cells.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The flat (row-major) index of a cell.
    pub fn index(&self, at: CellAt) -> usize {
        let (p, h) = (at.position.unwrap_or(0), at.head.unwrap_or(0));
        match self.grid() {
            Grid::LayerPosition => at.layer * self.positions + p,
            Grid::Block => (at.part * self.layers + at.layer) * self.positions + p,
            Grid::LayerHead => at.layer * self.heads + h,
            Grid::LayerPositionHead => (at.layer * self.positions + p) * self.heads + h,
        }
    }

    /// The cell at a flat index.
    pub fn at(&self, index: usize) -> CellAt {
        let (layers, positions, heads) = (self.layers.max(1), self.positions.max(1), self.heads.max(1));
        match self.grid() {
            Grid::LayerPosition => CellAt::at(index / positions, index % positions),
            Grid::Block => CellAt {
                part: index / (layers * positions),
                ..CellAt::at(index / positions % layers, index % positions)
            },
            Grid::LayerHead => CellAt {
                layer: index / heads,
                position: None,
                head: Some(index % heads),
                part: 0,
            },
            Grid::LayerPositionHead => CellAt {
                layer: index / (positions * heads),
                position: Some(index / heads % positions),
                head: Some(index % heads),
                part: 0,
            },
        }
    }

    /// Every cell, in grid order.
    pub fn cells(&self) -> impl Iterator<Item = CellAt> + '_ {
        (0..self.len()).map(|i| self.at(i))
    }

    /// The component a cell patches: its block part for block sweeps, the sweep's otherwise.
    pub fn component_of(&self, at: CellAt) -> Component {
        if self.component == Component::Block {
            Component::BLOCK_PARTS[at.part]
        } else {
            self.component
        }
    }

    /// Whether patching `at` cannot change anything when the prompts first differ at `first_diff`:
    /// a position before it, where both runs' activations are identical (causal attention), or
    /// any cell of prompts that do not differ.
    pub fn is_noop(&self, at: CellAt, first_diff: usize) -> bool {
        first_diff >= self.positions || at.position.is_some_and(|p| p < first_diff)
    }

    /// The cells a sweep computes (the no-ops aside) when the prompts first differ at `first_diff`.
    pub fn cells_to_compute(&self, first_diff: usize) -> usize {
        self.cells().filter(|&at| !self.is_noop(at, first_diff)).count()
    }

    /// The 2-D views a heatmap shows: one per component of a block sweep, one per position of a
    /// by-position head sweep, else a single one.
    pub fn view_count(&self) -> usize {
        match self.grid() {
            Grid::Block => Component::BLOCK_PARTS.len(),
            Grid::LayerPositionHead => self.positions,
            _ => 1,
        }
    }

    /// The view shown first: the last position of a by-position head sweep (where name movers
    /// act), else the first.
    pub fn default_view(&self) -> usize {
        match self.grid() {
            Grid::LayerPositionHead => self.positions.saturating_sub(1),
            _ => 0,
        }
    }

    /// View `slice` (see [`Layout::view_count`]): layers down, positions or heads across.
    pub fn view(&self, slice: usize) -> View {
        let (columns, fixed) = match self.grid() {
            Grid::LayerPosition => (Axis::Position, None),
            Grid::Block => (Axis::Position, Some((Axis::Component, slice.min(2)))),
            Grid::LayerHead => (Axis::Head, None),
            Grid::LayerPositionHead => (
                Axis::Head,
                Some((Axis::Position, slice.min(self.positions.saturating_sub(1)))),
            ),
        };
        View {
            rows: self.layers,
            cols: self.len_of(columns),
            columns,
            fixed,
        }
    }

    /// The cell at (`row`, `col`) of `view`.
    pub fn view_cell(&self, view: &View, row: usize, col: usize) -> CellAt {
        let mut at = CellAt {
            layer: row,
            position: None,
            head: None,
            part: 0,
        };
        match view.columns {
            Axis::Head => at.head = Some(col),
            _ => at.position = Some(col),
        }
        match view.fixed {
            Some((Axis::Component, part)) => at.part = part,
            Some((Axis::Position, p)) => at.position = Some(p),
            _ => {}
        }
        at
    }
}

/// A 2-D slice of a sweep's grid: layers down, `columns` across, any other axis `fixed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub rows: usize,
    pub cols: usize,
    /// What the columns are: positions or heads.
    pub columns: Axis,
    /// The axis this view holds at one index (a block sweep's component, a by-position head
    /// sweep's position), if any.
    pub fixed: Option<(Axis, usize)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_indexes_each_cell_once_in_transformer_lens_order() {
        for (component, by_position, shape) in [
            (Component::AttnOut, false, vec![3, 5]),
            (Component::Block, false, vec![3, 3, 5]),
            (Component::HeadOut, false, vec![3, 4]),
            (Component::HeadV, true, vec![3, 5, 4]),
        ] {
            let layout = Layout {
                component,
                by_position,
                layers: 3,
                positions: 5,
                heads: 4,
            };
            assert_eq!(layout.shape(), shape, "{component}");
            assert_eq!(layout.len(), shape.iter().product::<usize>(), "{component}");
            for (i, at) in layout.cells().enumerate() {
                assert_eq!(layout.index(at), i, "{component} {at:?}");
            }
            // The views cover every cell exactly once.
            let mut seen = vec![0; layout.len()];
            for slice in 0..layout.view_count() {
                let view = layout.view(slice);
                for r in 0..view.rows {
                    for c in 0..view.cols {
                        seen[layout.index(layout.view_cell(&view, r, c))] += 1;
                    }
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{component}: {seen:?}");
        }
        // [layer][position][head]: position-major within a layer, as get_act_patch_attn_head_out_by_pos.
        let layout = Layout {
            component: Component::HeadOut,
            by_position: true,
            layers: 2,
            positions: 3,
            heads: 4,
        };
        let at = CellAt {
            layer: 1,
            position: Some(2),
            head: Some(3),
            part: 0,
        };
        assert_eq!(layout.index(at), (3 + 2) * 4 + 3);
        // Positions before the first difference are no-ops; every-position head cells are not.
        assert_eq!(layout.cells_to_compute(1), 2 * 2 * 4);
        let every = Layout {
            by_position: false,
            ..layout
        };
        assert_eq!(every.cells_to_compute(1), 2 * 4);
        assert_eq!(every.cells_to_compute(3), 0, "identical prompts");
    }
}
