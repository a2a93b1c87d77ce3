//! Attention: the dense causal attention of a plain forward, and a packed cone forward's
//! attention of each cone's queries over its own keys and values (tensor ops for any device and
//! dtype, a direct loop for f32 on the CPU).

use candle_core::{DType, Tensor};

use super::cones::Segment;
use super::decoder::{Hooks, LayerKv, Site, Transformer};
use super::kernels::skinny::linear as linear_fwd;
use super::layers::{Attention, rotate_partial, visible};
use crate::error::{Error, Result};

/// Where a dense attention runs: its layer, the absolute position of its first query, the cached
/// keys/values before it and the batch its prefix is broadcast to.
#[derive(Clone, Copy)]
pub(super) struct At<'a> {
    pub(super) layer: usize,
    pub(super) offset: usize,
    pub(super) prefix: Option<&'a LayerKv>,
    pub(super) batch: usize,
}

/// `cap · tanh(scores / cap)` (Gemma 2's attention softcapping), or `scores` unchanged.
pub(super) fn softcap(scores: Tensor, cap: Option<f64>) -> Result<Tensor> {
    Ok(match cap {
        Some(cap) => ((scores / cap)?.tanh()? * cap)?,
        None => scores,
    })
}

impl Transformer {
    /// The dense causal attention of a plain forward, calling `hooks` at the attention's own sites
    /// (queries, keys, values, pattern and head outputs).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        at: At,
        hooks: &mut dyn Hooks,
    ) -> Result<(Tensor, LayerKv)> {
        let At {
            layer,
            offset,
            prefix,
            batch,
        } = at;
        let cfg = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let hd = cfg.head_dim;
        let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let qkv = linear_fwd(&attn.qkv_proj, x)?;
        let q = qkv.narrow(2, 0, qd)?.reshape((b, t, cfg.num_heads, hd))?;
        let k = qkv.narrow(2, qd, kvd)?.reshape((b, t, cfg.num_kv_heads, hd))?;
        let v = qkv.narrow(2, qd + kvd, kvd)?.reshape((b, t, cfg.num_kv_heads, hd))?;
        let q = match &attn.q_norm {
            Some(norm) => norm.forward(&q.contiguous()?)?,
            None => q,
        };
        let k = match &attn.k_norm {
            Some(norm) => norm.forward(&k.contiguous()?)?,
            None => k,
        };
        let rope = |x: &Tensor| -> Result<Tensor> { Ok(candle_nn::rotary_emb::rope(x, cos, sin)?) };
        let q = rotate_partial(&q.transpose(1, 2)?.contiguous()?, cfg.rotary_dim, rope)?;
        let k = rotate_partial(&k.transpose(1, 2)?.contiguous()?, cfg.rotary_dim, rope)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let q = hooks.visit(Site::Q, layer, offset, q)?;
        let k = hooks.visit(Site::K, layer, offset, k)?;
        let v = hooks.visit(Site::V, layer, offset, v)?;
        let (k, v) = match prefix {
            Some(p) => {
                let expand = |t: &Tensor| -> Result<Tensor> {
                    let (pb, h, s, d) = t.dims4()?;
                    Ok(if pb == batch {
                        t.clone()
                    } else {
                        t.broadcast_as((batch, h, s, d))?.contiguous()?
                    })
                };
                (
                    Tensor::cat(&[&expand(&p.k)?, &k], 2)?,
                    Tensor::cat(&[&expand(&p.v)?, &v], 2)?,
                )
            }
            None => (k, v),
        };
        let n_rep = cfg.num_heads / cfg.num_kv_heads;
        let k_rep = candle_transformers::utils::repeat_kv(k.clone(), n_rep)?;
        let v_rep = candle_transformers::utils::repeat_kv(v.clone(), n_rep)?;
        let scores = softcap((q.matmul(&k_rep.t()?)? * cfg.attention_scale)?, cfg.attn_softcap)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(self.dtype)?;
        let probs = hooks.visit(Site::Pattern, layer, offset, probs)?;
        let out = probs.matmul(&v_rep)?; // [b, heads, t, hd]
        let out = out.transpose(1, 2)?.reshape((b, t, cfg.num_heads * hd))?;
        let out = hooks.visit(Site::Z, layer, offset, out)?;
        Ok((linear_fwd(&attn.o_proj, &out)?, LayerKv { k, v }))
    }
}

/// How a layer scores queries against keys: the scale, Gemma 2's softcap and a sliding window.
#[derive(Debug, Clone, Copy)]
pub(super) struct Scoring {
    pub(super) scale: f64,
    pub(super) softcap: Option<f64>,
    pub(super) window: Option<usize>,
}

impl Scoring {
    /// Layer `layer`'s scoring.
    pub(super) fn of(cfg: &super::config::ArchConfig, layer: usize) -> Self {
        Self {
            scale: cfg.attention_scale,
            softcap: cfg.attn_softcap,
            window: cfg.window(layer),
        }
    }
}

/// Attention of a cone forward's queries (`[queries, heads, head_dim]`, after RoPE) over their own
/// cone's keys and values: `prefix` (batch 1) before the cone's offset, the packed `k`/`v`
/// (`[tokens, kv_heads, head_dim]`) from it, causally. Returns `[queries, heads * head_dim]`.
///
/// Tensor ops, for any device and dtype: every cone padded to the longest, as one batched matmul.
pub(super) fn cone_attention_tensors(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    prefixes: &[&LayerKv],
    segments: &[Segment],
    last_only: bool,
    scoring: Scoring,
) -> Result<Tensor> {
    let (n_queries, heads, hd) = q.dims3()?;
    let kv_heads = k.dim(1)?;
    let rep = heads / kv_heads;
    let dev = q.device();
    // Queries `[cones, lmax]`, key slots `[cones, slots]` where slot s is absolute position s (the
    // prefix before the cone's offset, the cone's own tokens from it).
    let n = segments.len();
    let q_len = |s: &Segment| if last_only { 1 } else { s.len };
    let lmax = segments.iter().map(q_len).max().unwrap_or(1);
    let slots = segments.iter().map(|s| s.offset + s.len).max().unwrap_or(1);
    // Every prefix's rows, then the packed tokens', in one source the key slots index.
    let mut prefix_base = Vec::with_capacity(prefixes.len());
    let mut prefix_rows = 0;
    for p in prefixes {
        prefix_base.push(prefix_rows);
        prefix_rows += p.k.dim(2)?;
    }
    let mut q_rows = Vec::with_capacity(n * lmax);
    let mut k_rows = Vec::with_capacity(n * slots);
    let mut mask = Vec::with_capacity(n * lmax * slots);
    let mut back = Vec::with_capacity(n_queries);
    let mut first_query = 0;
    for (i, s) in segments.iter().enumerate() {
        let ql = q_len(s);
        let first_pos = s.offset + s.len - ql;
        for j in 0..lmax {
            let valid = j < ql;
            q_rows.push((first_query + if valid { j } else { 0 }) as u32);
            if valid {
                back.push((i * lmax + j) as u32);
            }
            // Padding queries see slot 0 only, so their (discarded) softmax stays finite.
            let pos = first_pos + j;
            mask.extend((0..slots).map(|slot| {
                let visible = if valid {
                    visible(pos, slot, scoring.window)
                } else {
                    slot == 0
                };
                if visible { 0.0 } else { f32::NEG_INFINITY }
            }));
        }
        first_query += ql;
        k_rows.extend((0..slots).map(|slot| {
            (if slot < s.offset {
                prefix_base[s.prefix] + slot
            } else if slot < s.offset + s.len {
                prefix_rows + s.row + (slot - s.offset)
            } else {
                0
            }) as u32
        }));
    }
    let gather = |packed: &Tensor, cached: &[&Tensor]| -> Result<Tensor> {
        // [prefix, kv_heads, hd] each; an empty one (a group sharing no tokens) adds no rows.
        let mut parts = cached
            .iter()
            .filter(|c| c.dim(2).is_ok_and(|n| n > 0))
            .map(|c| Ok(c.squeeze(0)?.transpose(0, 1)?.contiguous()?))
            .collect::<Result<Vec<_>>>()?;
        parts.push(packed.clone());
        let src = Tensor::cat(&parts, 0)?;
        let rows = Tensor::from_vec(k_rows.clone(), n * slots, dev)?;
        Ok(src
            .index_select(&rows, 0)?
            .reshape((n, slots, kv_heads, hd))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let keys = gather(k, &prefixes.iter().map(|p| &p.k).collect::<Vec<_>>())?; // [n, kv_heads, slots, hd]
    let values = gather(v, &prefixes.iter().map(|p| &p.v).collect::<Vec<_>>())?;
    // Query heads sharing a key/value head sit together (head = kv * rep + r), so no repeat_kv.
    let q = q
        .index_select(&Tensor::from_vec(q_rows, n * lmax, dev)?, 0)?
        .reshape((n, lmax, kv_heads, rep, hd))?
        .permute((0, 2, 3, 1, 4))?
        .contiguous()?
        .reshape((n, kv_heads, rep * lmax, hd))?;
    let mask = Tensor::from_vec(mask, (n, 1, 1, lmax, slots), dev)?.to_dtype(q.dtype())?;
    let scores = softcap((q.matmul(&keys.t()?)? * scoring.scale)?, scoring.softcap)?
        .reshape((n, kv_heads, rep, lmax, slots))?
        .broadcast_add(&mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
        .to_dtype(q.dtype())?
        .reshape((n, kv_heads, rep * lmax, slots))?;
    Ok(probs
        .matmul(&values)?
        .reshape((n, kv_heads, rep, lmax, hd))?
        .permute((0, 3, 1, 2, 4))?
        .contiguous()?
        .reshape((n * lmax, heads * hd))?
        .index_select(&Tensor::from_vec(back, n_queries, dev)?, 0)?)
}

/// [`cone_attention_tensors`] for f32 on the CPU: a direct loop per query, spread over the cores.
/// A cone's attention is a few dozen keys per head, far too small for a matmul each: the batched
/// matmul of the tensor path spends most of its time launching hundreds of tiny ones.
pub(super) fn cone_attention_cpu(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    prefixes: &[&LayerKv],
    segments: &[Segment],
    last_only: bool,
    scoring: Scoring,
) -> Result<Tensor> {
    use rayon::prelude::*;
    let dev = q.device().clone();
    let (n_queries, heads, hd) = q.dims3()?;
    let kv_heads = k.dim(1)?;
    let rep = heads / kv_heads;
    let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let (q, k, v) = (flat(q)?, flat(k)?, flat(v)?); // [queries, heads, hd], [tokens, kv_heads, hd] ×2
    // Each prefix [1, kv_heads, len, hd], flat, with its length.
    let cached = prefixes
        .iter()
        .map(|p| Ok((flat(&p.k)?, flat(&p.v)?, p.k.dim(2)?)))
        .collect::<Result<Vec<_>>>()?;
    // Each query: its segment and absolute position.
    let queries: Vec<(&Segment, usize)> = segments
        .iter()
        .flat_map(|s| {
            let ql = if last_only { 1 } else { s.len };
            (s.offset + s.len - ql..s.offset + s.len).map(move |pos| (s, pos))
        })
        .collect();
    if queries.len() != n_queries {
        return Err(Error::Internal(format!(
            "{} attention queries for {} segments' {n_queries} query rows",
            queries.len(),
            segments.len()
        )));
    }
    let scale = scoring.scale as f32;
    let cap = scoring.softcap.map(|c| c as f32);
    let mut out = vec![0f32; n_queries * heads * hd];
    out.par_chunks_mut(heads * hd)
        .zip(q.par_chunks(heads * hd))
        .zip(queries.par_iter())
        .for_each(|((out, q), &(s, pos))| {
            let (k, v) = (&k, &v);
            let (pk, pv, prefix_len) = (&cached[s.prefix].0, &cached[s.prefix].1, cached[s.prefix].2);
            let key = |g: usize, slot: usize| -> (&[f32], &[f32]) {
                let (at, keys, values) = if slot < s.offset {
                    ((g * prefix_len + slot) * hd, pk, pv)
                } else {
                    (((s.row + slot - s.offset) * kv_heads + g) * hd, k, v)
                };
                (&keys[at..at + hd], &values[at..at + hd])
            };
            // The keys the query sees: all before it, or the last `window` with a sliding window.
            let first = scoring.window.map_or(0, |w| (pos + 1).saturating_sub(w));
            let mut scores = vec![0f32; pos + 1 - first];
            for h in 0..heads {
                let g = h / rep;
                let qh = &q[h * hd..(h + 1) * hd];
                let mut max = f32::NEG_INFINITY;
                for (i, score) in scores.iter_mut().enumerate() {
                    let raw = dot(qh, key(g, first + i).0) * scale;
                    *score = match cap {
                        Some(c) => c * (raw / c).tanh(),
                        None => raw,
                    };
                    max = max.max(*score);
                }
                let mut sum = 0f32;
                for score in scores.iter_mut() {
                    *score = (*score - max).exp();
                    sum += *score;
                }
                let oh = &mut out[h * hd..(h + 1) * hd];
                for (i, &p) in scores.iter().enumerate() {
                    let w = p / sum;
                    for (o, &x) in oh.iter_mut().zip(key(g, first + i).1) {
                        *o += w * x;
                    }
                }
            }
        });
    Ok(Tensor::from_vec(out, (n_queries, heads * hd), &dev)?)
}

/// a · b, in eight running sums: a plain sum of products is one long chain of dependent additions
/// the compiler may not reorder, so it runs one lane at a time.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8.remainder().iter().zip(b8.remainder()).map(|(x, y)| x * y).sum();
    let mut lanes = [0f32; 8];
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn the_cpu_cone_attention_matches_the_tensor_path() {
        let dev = Device::Cpu;
        let (heads, kv_heads, hd, seq) = (6, 2, 8, 12);
        // Two prefixes (two runs' caches): odd cones attend to the second.
        let cache = || LayerKv {
            k: Tensor::randn(0f32, 1.0, (1, kv_heads, seq, hd), &dev).unwrap(),
            v: Tensor::randn(0f32, 1.0, (1, kv_heads, seq, hd), &dev).unwrap(),
        };
        let (first, second) = (cache(), cache());
        let prefix = [&first, &second];
        // Cones of different offsets and lengths, one of a single token, packed in order.
        let shapes = [(3, 9), (7, 5), (11, 1), (0, 12)];
        let mut segments = Vec::new();
        let mut row = 0;
        for (cone, &(offset, len)) in shapes.iter().enumerate() {
            segments.push(Segment {
                cone,
                row,
                len,
                offset,
                prefix: cone % 2,
            });
            row += len;
        }
        let k = Tensor::randn(0f32, 1.0, (row, kv_heads, hd), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (row, kv_heads, hd), &dev).unwrap();
        let plain = Scoring {
            scale: 1.0 / (hd as f64).sqrt(),
            softcap: None,
            window: None,
        };
        // Gemma 2's softcap and a window shorter than most cones.
        let gemma = Scoring {
            scale: 0.2,
            softcap: Some(2.0),
            window: Some(4),
        };
        for scoring in [plain, gemma] {
            for last_only in [false, true] {
                let queries = if last_only { segments.len() } else { row };
                let q = Tensor::randn(0f32, 1.0, (queries, heads, hd), &dev).unwrap();
                let fast = cone_attention_cpu(&q, &k, &v, &prefix, &segments, last_only, scoring).unwrap();
                let reference = cone_attention_tensors(&q, &k, &v, &prefix, &segments, last_only, scoring).unwrap();
                assert_eq!(fast.dims(), &[queries, heads * hd]);
                assert!(
                    max_abs_diff(&fast, &reference) < 1e-5,
                    "last_only={last_only} {scoring:?}"
                );
            }
        }
    }
}
