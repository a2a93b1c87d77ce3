//! [`Grid`]: a sweep's per-cell values, stored flat and written to JSON as nested arrays of its
//! shape (`values[layer][position]`, `values[layer][position][head]`, …), as notebooks index them.

use serde::de::{DeserializeOwned, Error as _};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Values of type `T`, one per cell of an n-dimensional `shape`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid<T> {
    shape: Vec<usize>,
    data: Vec<T>,
}

impl<T: Clone> Grid<T> {
    /// A grid of `shape` with every cell `fill`.
    pub fn new(shape: Vec<usize>, fill: T) -> Self {
        let len = shape.iter().product();
        Self {
            shape,
            data: vec![fill; len],
        }
    }
}

impl<T> Grid<T> {
    /// A grid of `shape` holding `data` row-major.
    ///
    /// # Panics
    /// When `data` does not have one value per cell (a bug in the caller).
    pub fn from_flat(shape: Vec<usize>, data: Vec<T>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len(), "one value per cell");
        Self { shape, data }
    }

    /// The grid's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Every cell, row-major.
    pub fn flat(&self) -> &[T] {
        &self.data
    }

    /// Overwrites cell `i` (row-major); an index past the end is ignored.
    pub fn set(&mut self, i: usize, value: T) {
        if let Some(slot) = self.data.get_mut(i) {
            *slot = value;
        }
    }

    /// The cells of one index along the first axis (a layer, for most sweeps).
    fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }
}

/// A nested JSON array of `shape` as the flat form [`Grid`] deserializes from.
pub(crate) fn wire(nested: serde_json::Value, shape: &[usize]) -> serde_json::Result<serde_json::Value> {
    fn flatten(v: serde_json::Value, depth: usize, out: &mut Vec<serde_json::Value>) -> serde_json::Result<()> {
        if depth == 0 {
            out.push(v);
            return Ok(());
        }
        match v {
            serde_json::Value::Array(items) => items.into_iter().try_for_each(|i| flatten(i, depth - 1, out)),
            _ => Err(serde_json::Error::custom(
                "a per-cell array is not nested as deep as `shape`",
            )),
        }
    }
    let mut data = Vec::new();
    flatten(nested, shape.len(), &mut data)?;
    Ok(serde_json::json!({ "shape": shape, "data": data }))
}

/// Row `i` along the first axis: `values[layer][position]` reads as it did when grids were nested.
impl<T> std::ops::Index<usize> for Grid<T> {
    type Output = [T];
    fn index(&self, i: usize) -> &[T] {
        let n = self.row_len();
        &self.data[i * n..(i + 1) * n]
    }
}

impl<T> std::ops::IndexMut<usize> for Grid<T> {
    fn index_mut(&mut self, i: usize) -> &mut [T] {
        let n = self.row_len();
        &mut self.data[i * n..(i + 1) * n]
    }
}

/// Nested arrays of the shape.
impl<T: Serialize> Serialize for Grid<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Nested<'a, T>(&'a [usize], &'a [T]);
        impl<T: Serialize> Serialize for Nested<'_, T> {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                let Some((&n, rest)) = self.0.split_first() else {
                    return self.1[0].serialize(serializer);
                };
                let stride: usize = rest.iter().product();
                let mut seq = serializer.serialize_seq(Some(n))?;
                for i in 0..n {
                    seq.serialize_element(&Nested(rest, &self.1[i * stride..(i + 1) * stride]))?;
                }
                seq.end()
            }
        }
        if self.data.is_empty() {
            // A zero-length axis: nothing below it to nest.
            return serializer.serialize_seq(Some(0))?.end();
        }
        Nested(&self.shape, &self.data).serialize(serializer)
    }
}

/// From `{"shape": [...], "data": [...]}` ([`wire`] makes it from the nested form).
impl<'de, T: DeserializeOwned> Deserialize<'de> for Grid<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(bound = "T: DeserializeOwned")]
        struct Wire<T> {
            shape: Vec<usize>,
            data: Vec<T>,
        }
        let wire = Wire::<T>::deserialize(deserializer)?;
        if wire.shape.iter().product::<usize>() != wire.data.len() {
            return Err(D::Error::custom(format!(
                "{} cells for a grid of shape {:?}",
                wire.data.len(),
                wire.shape
            )));
        }
        Ok(Self {
            shape: wire.shape,
            data: wire.data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_write_nested_arrays_and_read_them_back() {
        let mut g = Grid::new(vec![2, 3, 2], None);
        g.set(7, Some(1.5));
        g[1][5] = Some(-2.0);
        let json = serde_json::to_value(&g).unwrap();
        assert_eq!(json[1][0][1], 1.5, "index 7 = [1][0][1]");
        assert_eq!(json[1][2][1], -2.0);
        assert!(json[1][0][0].is_null());
        let back: Grid<Option<f64>> = serde_json::from_value(wire(json, &[2, 3, 2]).unwrap()).unwrap();
        assert_eq!(back, g);
        // Nested less deeply than the shape says: refused, not misread.
        let flat = serde_json::json!([1.0, 2.0]);
        assert!(wire(flat, &[1, 2, 1]).is_err());
        let wrong = serde_json::json!({"shape": [2, 2], "data": [1.0]});
        assert!(serde_json::from_value::<Grid<f64>>(wrong).is_err());
    }
}
