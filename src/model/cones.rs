//! Packed forwards: many patching cells' causal cones in one pass, and prompts that share their
//! first tokens (a sweep's clean and corrupted baselines) computing those tokens once.
//!
//! [`Transformer::forward_cones`] packs many cones (each its own start layer and positions) into one
//! `[tokens, hidden]` pass, so a whole block of patching cells shares every weight read;
//! [`Transformer::forward_shared_prefix`] runs the baselines.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor};

use super::attention::{Scoring, cone_attention_cpu, cone_attention_tensors};
use super::decoder::{LayerKv, Site, Transformer};
use super::kernels::fused::rope_thd;
use super::kernels::skinny::linear as linear_fwd;
use super::layers::rotate_partial;
use crate::error::{Error, Result};

/// The causal cone of one patch, for [`Transformer::forward_cones`]: everything a change to the
/// residual stream at position `offset` entering layer `start_layer` can affect.
#[derive(Debug, Clone)]
pub struct Cone {
    /// The first layer to run; `num_layers` runs none (only the final norm and unembedding).
    pub start_layer: usize,
    /// Absolute position of the cone's first token.
    pub offset: usize,
    /// `start_layer`'s resid_pre at positions `offset..`, `[seq, hidden]`, with the patch written in.
    pub hidden: Tensor,
}

/// Where one cone's tokens sit in the packed `[tokens, hidden]` activations of a cone forward.
#[derive(Debug, Clone, Copy)]
pub(super) struct Segment {
    /// Index into the caller's cones.
    pub(super) cone: usize,
    /// First packed row.
    pub(super) row: usize,
    /// Number of tokens.
    pub(super) len: usize,
    /// Absolute position of the first token.
    pub(super) offset: usize,
    /// Which of the forward's key/value prefixes the segment attends to before `offset`.
    pub(super) prefix: usize,
}

/// Where a packed forward's tokens find the keys and values before their segment's offset.
#[derive(Clone)]
enum Prefix<'a> {
    /// Caches from earlier forwards, `[1, kv_heads, len, head_dim]`: each segment attends to
    /// the one its [`Segment::prefix`] names.
    Cached(Vec<&'a LayerKv>),
    /// Rows of this same forward, `(first row, len)` per group: positions `0..len` of the prompts
    /// whose segments name the group as their prefix.
    Shared(Vec<(usize, usize)>),
}

/// One layer of a packed forward: its activations, `[rows, ..]` in the packed row order, and
/// the keys and values of every packed token (after RoPE and QK-norm), `[tokens, kv_heads, hd]`.
struct PackedLayer {
    attn_out: Tensor,
    resid_mid: Tensor,
    mlp_out: Tensor,
    resid_post: Tensor,
    k: Tensor,
    v: Tensor,
}

/// What [`Transformer::forward_shared_prefix`] returns, for each of its prompts.
#[derive(Debug)]
pub struct PromptsForward {
    /// The last layer's residual stream at the last position, `[prompts, hidden]`: what
    /// [`Transformer::final_logits`] turns into logits (left to the caller, so that other rows can
    /// share that pass over the unembedding).
    pub last_hidden: Tensor,
    /// The activations at the sites asked for, per (site, layer), `[prompts, seq, hidden]`.
    pub acts: HashMap<(Site, usize), Tensor>,
    /// Every layer's keys and values, `[prompts, kv_heads, seq, head_dim]`.
    pub kv: Vec<LayerKv>,
}

impl Transformer {
    /// Runs equally long prompts that share their first `shared` tokens, computing those tokens
    /// once: the clean and corrupted baselines of a sweep, whose prompts agree up to the first
    /// difference. Every layer is one packed matmul over the shared tokens and each prompt's own
    /// ones (for IOI 9 + 2 × 7 rows rather than 2 × 16); each prompt's tokens attend to the shared
    /// keys and values, then causally to their own. Returns what the sweep caches: the activations at
    /// `sites`, every layer's keys and values, and the last position's final residual stream, per
    /// prompt, as an unpacked batch would.
    pub fn forward_shared_prefix(&self, prompts: &[&[u32]], shared: usize, sites: &[Site]) -> Result<PromptsForward> {
        let mut out = self.forward_prompt_groups(&[(prompts, shared)], sites)?;
        out.pop()
            .ok_or_else(|| Error::Internal("a packed forward lost its group".into()))
    }

    /// [`Transformer::forward_shared_prefix`] for several groups of prompts at once (a dataset's
    /// pairs): every group's shared tokens and its prompts' own ones in one packed forward, each
    /// prompt attending to its own group's shared tokens. Returns one [`PromptsForward`] per group.
    pub fn forward_prompt_groups(&self, groups: &[(&[&[u32]], usize)], sites: &[Site]) -> Result<Vec<PromptsForward>> {
        struct Placed {
            prompts: usize,
            seq: usize,
            shared_row: usize,
            shared: usize,
            own_row: usize,
        }
        let mut ids: Vec<u32> = Vec::new();
        let mut segments = Vec::new();
        let mut spans = Vec::with_capacity(groups.len());
        let mut placed = Vec::with_capacity(groups.len());
        for (g, &(prompts, shared)) in groups.iter().enumerate() {
            let seq = prompts.first().map_or(0, |p| p.len());
            if seq == 0 || prompts.iter().any(|p| p.len() != seq) {
                return Err(Error::Internal(
                    "a shared-prefix forward needs non-empty prompts of one length".into(),
                ));
            }
            if seq > self.cfg.max_position_embeddings.max(1) {
                return Err(Error::Input(format!(
                    "the prompts are {seq} tokens long, more than this model's {} positions",
                    self.cfg.max_position_embeddings
                )));
            }
            // At least the last token is each prompt's own: it gives that prompt's logits.
            let shared = shared.min(seq - 1);
            if prompts.iter().any(|p| p[..shared] != prompts[0][..shared]) {
                return Err(Error::Internal(format!(
                    "the prompts do not share their first {shared} tokens"
                )));
            }
            let own = seq - shared;
            let shared_row = ids.len();
            ids.extend_from_slice(&prompts[0][..shared]);
            if shared > 0 {
                segments.push(Segment {
                    cone: segments.len(),
                    row: shared_row,
                    len: shared,
                    offset: 0,
                    prefix: g,
                });
            }
            let own_row = ids.len();
            for (i, p) in prompts.iter().enumerate() {
                segments.push(Segment {
                    cone: segments.len(),
                    row: own_row + i * own,
                    len: own,
                    offset: shared,
                    prefix: g,
                });
                ids.extend_from_slice(&p[shared..]);
            }
            spans.push((shared_row, shared));
            placed.push(Placed {
                prompts: prompts.len(),
                seq,
                shared_row,
                shared,
                own_row,
            });
        }
        let dev = &self.device;
        // Per group, the packed rows of each prompt's tokens in order, to unpack `[tokens, ..]`
        // into `[prompts, seq, ..]`.
        let unpackers = placed
            .iter()
            .map(|g| {
                let own = g.seq - g.shared;
                let rows: Vec<u32> = (0..g.prompts)
                    .flat_map(|i| {
                        (g.shared_row..g.shared_row + g.shared).chain((0..own).map(move |j| g.own_row + i * own + j))
                    })
                    .map(|r| r as u32)
                    .collect();
                Ok(Tensor::from_vec(rows, g.prompts * g.seq, dev)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let unpack = |g: usize, t: &Tensor| -> Result<Tensor> {
            let mut dims = vec![placed[g].prompts, placed[g].seq];
            dims.extend_from_slice(&t.dims()[1..]);
            Ok(t.index_select(&unpackers[g], 0)?.reshape(dims)?)
        };
        let mut acts: Vec<HashMap<(Site, usize), Tensor>> = vec![HashMap::new(); groups.len()];
        let mut kv: Vec<Vec<LayerKv>> = vec![Vec::with_capacity(self.layers.len()); groups.len()];
        let positions: Vec<u32> = segments
            .iter()
            .flat_map(|s| (s.offset..s.offset + s.len).map(|p| p as u32))
            .collect();
        let mut x = self.embed_at(&ids, &positions)?;
        for l in 0..self.layers.len() {
            let layer = self.packed_layer(l, &x, &segments, Prefix::Shared(spans.clone()), false)?;
            for g in 0..groups.len() {
                for &site in sites {
                    let act = match site {
                        Site::ResidPre => &x,
                        Site::AttnOut => &layer.attn_out,
                        Site::ResidMid => &layer.resid_mid,
                        Site::MlpOut => &layer.mlp_out,
                        Site::ResidPost => &layer.resid_post,
                        other => {
                            return Err(Error::Internal(format!(
                                "a packed forward keeps residual sites only, not {other:?}"
                            )));
                        }
                    };
                    acts[g].insert((site, l), unpack(g, act)?);
                }
                // `[prompts, seq, kv_heads, hd]` → `[prompts, kv_heads, seq, hd]`, as `forward` keeps them.
                let heads_first = |t: &Tensor| -> Result<Tensor> { Ok(unpack(g, t)?.transpose(1, 2)?.contiguous()?) };
                kv[g].push(LayerKv {
                    k: heads_first(&layer.k)?,
                    v: heads_first(&layer.v)?,
                });
            }
            x = layer.resid_post;
        }
        placed
            .iter()
            .zip(acts.into_iter().zip(kv))
            .map(|(g, (acts, kv))| {
                let own = g.seq - g.shared;
                let last_rows: Vec<u32> = (0..g.prompts).map(|i| (g.own_row + (i + 1) * own - 1) as u32).collect();
                Ok(PromptsForward {
                    last_hidden: x.index_select(&Tensor::from_vec(last_rows, g.prompts, dev)?, 0)?,
                    acts,
                    kv,
                })
            })
            .collect()
    }

    /// Runs many [`Cone`]s in one packed forward and returns each one's last-position logits,
    /// `[cones, vocab]` f32, in the order given.
    ///
    /// The tokens of every cone are packed into one `[tokens, hidden]` matrix, so each projection and
    /// MLP is a single matmul for the whole batch; a cone joins when the forward reaches its start
    /// layer. Its tokens attend to `prefix` (the unpatched run's keys/values per layer, batch 1,
    /// after RoPE and QK-norm, covering at least every cone's positions before its offset) and,
    /// causally, to each other. The last layer runs queries, attention output and MLP only for each
    /// cone's last token: the other tokens are needed there only as keys and values.
    ///
    /// `cancel` is looked at before each layer: when it is set the forward stops with
    /// [`Error::Cancelled`], so a large block does not hold up a cancel. `on_layer` is told after
    /// each layer how many packed token rows it ran, so a large block shows its progress.
    pub fn forward_cones(
        &self,
        cones: &[Cone],
        prefix: &[LayerKv],
        cancel: &AtomicBool,
        on_layer: &mut dyn FnMut(usize),
    ) -> Result<Tensor> {
        self.forward_cones_over(cones, &[prefix], &vec![0; cones.len()], cancel, on_layer)
    }

    /// [`Transformer::forward_cones`] for cones of different runs (the pairs of a dataset): cone
    /// `i` attends to `prefixes[cone_prefix[i]]` before its offset, so cells of many prompts share
    /// one packed forward.
    pub fn forward_cones_over(
        &self,
        cones: &[Cone],
        prefixes: &[&[LayerKv]],
        cone_prefix: &[usize],
        cancel: &AtomicBool,
        on_layer: &mut dyn FnMut(usize),
    ) -> Result<Tensor> {
        let n_layers = self.layers.len();
        let d = self.cfg.hidden_size;
        if cone_prefix.len() != cones.len() || cone_prefix.iter().any(|&p| p >= prefixes.len()) {
            return Err(Error::Internal("every cone needs one of the forward's prefixes".into()));
        }
        for (i, c) in cones.iter().enumerate() {
            let prefix = prefixes[cone_prefix[i]];
            let (seq, hidden) = c.hidden.dims2()?;
            let prefix_len = match prefix.get(c.start_layer.min(n_layers.saturating_sub(1))) {
                Some(kv) => kv.k.dim(2)?,
                None => 0,
            };
            let bad = c.start_layer > n_layers
                || seq == 0
                || hidden != d
                || c.offset + seq > self.cfg.max_position_embeddings.max(1)
                || (c.start_layer < n_layers && (prefix.len() != n_layers || prefix_len < c.offset));
            if bad {
                return Err(Error::Internal(format!(
                    "cone {i} (start layer {}, offset {}, hidden {:?}) does not fit the model or the \
                     {}-layer key/value prefix",
                    c.start_layer,
                    c.offset,
                    c.hidden.dims(),
                    prefix.len()
                )));
            }
        }
        // Cones join in order of their start layer; the packed rows keep that order.
        let mut order: Vec<usize> = (0..cones.len()).collect();
        order.sort_by_key(|&i| cones[i].start_layer);
        let first_layer = order.first().map_or(n_layers, |&i| cones[i].start_layer);
        let mut segments: Vec<Segment> = Vec::with_capacity(cones.len());
        let mut x: Option<Tensor> = None;
        let mut joined = 0;
        for l in first_layer..n_layers {
            let layer_prefixes: Vec<&LayerKv> = prefixes.iter().map(|p| &p[l]).collect();
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled("cancelled".into()));
            }
            let mut parts: Vec<Tensor> = x.take().into_iter().collect();
            let mut rows = segments.last().map_or(0, |s| s.row + s.len);
            while let Some(&i) = order.get(joined).filter(|&&i| cones[i].start_layer == l) {
                let len = cones[i].hidden.dim(0)?;
                segments.push(Segment {
                    cone: i,
                    row: rows,
                    len,
                    offset: cones[i].offset,
                    prefix: cone_prefix[i],
                });
                rows += len;
                parts.push(cones[i].hidden.clone());
                joined += 1;
            }
            let packed = if parts.len() == 1 {
                parts.remove(0)
            } else {
                Tensor::cat(&parts, 0)?
            };
            let layer = self.packed_layer(l, &packed, &segments, Prefix::Cached(layer_prefixes), l + 1 == n_layers)?;
            x = Some(layer.resid_post);
            on_layer(rows);
        }
        // After the last layer `x` holds one row per segment (its last token); cones that start
        // after the last layer contribute their input's last token unchanged.
        let mut finals: Vec<Tensor> = x.into_iter().collect();
        let mut final_cones: Vec<usize> = segments.iter().map(|s| s.cone).collect();
        for &i in &order[joined..] {
            let h = &cones[i].hidden;
            finals.push(h.narrow(0, h.dim(0)? - 1, 1)?);
            final_cones.push(i);
        }
        if finals.is_empty() {
            return Ok(Tensor::zeros((0, self.cfg.vocab_size), DType::F32, &self.device)?);
        }
        let finals = Tensor::cat(&finals, 0)?;
        let mut pick = vec![0u32; cones.len()];
        for (row, &cone) in final_cones.iter().enumerate() {
            pick[cone] = row as u32;
        }
        let finals = finals.index_select(&Tensor::from_vec(pick, cones.len(), &self.device)?, 0)?;
        self.final_logits(&finals)
    }

    /// One decoder layer on the packed tokens `x` (`[tokens, hidden]`) of `segments`. With
    /// `last_only` its activations cover only each segment's last token, `[segments, hidden]`.
    ///
    /// One function for the whole layer, ~100 lines, on purpose: it is the hot loop of every sweep,
    /// read top to bottom as the layer runs (projections, QK-norm, RoPE, the prefix, attention,
    /// MLP), and its tensors' shapes are easiest to check in one place.
    fn packed_layer(
        &self,
        l: usize,
        x: &Tensor,
        segments: &[Segment],
        prefix: Prefix,
        last_only: bool,
    ) -> Result<PackedLayer> {
        let cfg = &self.cfg;
        let layer = &self.layers[l];
        let attn = &layer.attn;
        let (hd, heads, kv_heads) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let (qd, kvd) = (heads * hd, kv_heads * hd);
        let dev = &self.device;
        let tokens = x.dim(0)?;

        // Every packed token's absolute position, for RoPE.
        let positions: Vec<u32> = segments
            .iter()
            .flat_map(|s| (s.offset..s.offset + s.len).map(|p| p as u32))
            .collect();
        let positions = Tensor::from_vec(positions, tokens, dev)?;
        let needed = segments.iter().map(|s| s.offset + s.len).max().unwrap_or(0);
        let (cos, sin) = self.rope(l, needed)?;
        let (cos, sin) = (cos.index_select(&positions, 0)?, sin.index_select(&positions, 0)?);
        let normed = layer.attn_norm.forward(x)?;

        // Keys and values of every token; queries of every token, or in the last layer only of each
        // segment's last token (the others are needed there only as keys and values).
        let (q, k, v, x, q_cos, q_sin) = if last_only {
            let rows: Vec<u32> = segments.iter().map(|s| (s.row + s.len - 1) as u32).collect();
            let rows = Tensor::from_vec(rows, segments.len(), dev)?;
            let kv = linear_fwd(&attn.kv_proj, &normed)?;
            (
                linear_fwd(&attn.q_proj, &normed.index_select(&rows, 0)?)?,
                kv.narrow(1, 0, kvd)?,
                kv.narrow(1, kvd, kvd)?,
                x.index_select(&rows, 0)?,
                cos.index_select(&rows, 0)?,
                sin.index_select(&rows, 0)?,
            )
        } else {
            let qkv = linear_fwd(&attn.qkv_proj, &normed)?;
            (
                qkv.narrow(1, 0, qd)?,
                qkv.narrow(1, qd, kvd)?,
                qkv.narrow(1, qd + kvd, kvd)?,
                x.clone(),
                cos.clone(),
                sin.clone(),
            )
        };
        let n_queries = q.dim(0)?;
        let q = q.contiguous()?.reshape((1, n_queries, heads, hd))?;
        let q = match &attn.q_norm {
            Some(norm) => norm.forward(&q)?,
            None => q,
        };
        let q = rotate_partial(&q, cfg.rotary_dim, |x| rope_thd(x, &q_cos, &q_sin))?.squeeze(0)?;
        let k = k.contiguous()?.reshape((1, tokens, kv_heads, hd))?;
        let k = match &attn.k_norm {
            Some(norm) => norm.forward(&k)?,
            None => k,
        };
        let k = rotate_partial(&k, cfg.rotary_dim, |x| rope_thd(x, &cos, &sin))?.squeeze(0)?;
        let v = v.contiguous()?.reshape((tokens, kv_heads, hd))?;

        let shared;
        let prefixes: Vec<&LayerKv> = match prefix {
            Prefix::Cached(kvs) => kvs,
            Prefix::Shared(spans) => {
                // Each group's shared rows, as a `[1, kv_heads, len, hd]` cache.
                let cache = |t: &Tensor, row: usize, len: usize| -> Result<Tensor> {
                    Ok(t.narrow(0, row, len)?.transpose(0, 1)?.contiguous()?.unsqueeze(0)?)
                };
                shared = spans
                    .iter()
                    .map(|&(row, len)| {
                        Ok(LayerKv {
                            k: cache(&k, row, len)?,
                            v: cache(&v, row, len)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                shared.iter().collect()
            }
        };
        let cpu_f32 = dev.is_cpu() && self.dtype == DType::F32;
        let scoring = Scoring::of(cfg, l);
        let out = if cpu_f32 {
            cone_attention_cpu(&q, &k, &v, &prefixes, segments, last_only, scoring)?
        } else {
            cone_attention_tensors(&q, &k, &v, &prefixes, segments, last_only, scoring)?
        };
        let attn_out = self.attn_post(l, linear_fwd(&attn.o_proj, &out)?)?;
        let mid = (&x + &attn_out)?;
        let mlp_in = if cfg.parallel_residual { &x } else { &mid };
        let mlp_out = layer.mlp.forward(&layer.mlp_norm.forward(mlp_in)?)?;
        Ok(PackedLayer {
            resid_post: (&mid + &mlp_out)?,
            attn_out,
            resid_mid: mid,
            mlp_out,
            k,
            v,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::ArchConfig;
    use crate::model::max_abs_diff;
    use crate::model::{Hooks, Span};
    use candle_core::Device;

    /// Records every site's activation.
    struct Record(HashMap<(Site, usize), Tensor>);

    impl Hooks for Record {
        fn visit(&mut self, site: Site, layer: usize, _offset: usize, x: Tensor) -> Result<Tensor> {
            self.0.insert((site, layer), x.clone());
            Ok(x)
        }
    }

    /// `a` with its tokens from `diff` on changed.
    fn b_for(a: &[u32], diff: usize) -> Vec<u32> {
        let mut b = a.to_vec();
        for id in &mut b[diff..] {
            *id = (*id + 11) % 64;
        }
        b
    }

    #[test]
    fn a_shared_prefix_forward_matches_the_batched_one() {
        use crate::model::config::Family;
        let cfg = ArchConfig {
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            ..ArchConfig::sized(Family::Qwen3, 64, 32, 48, 3, 4, 2, 8)
        };
        let sites = [
            Site::ResidPre,
            Site::AttnOut,
            Site::ResidMid,
            Site::MlpOut,
            Site::ResidPost,
        ];
        // f32 takes the CPU attention loop, bf16 the tensor path (as on a GPU).
        for (dtype, tolerance) in [(DType::F32, 1e-4), (DType::BF16, 0.02)] {
            let (t, _) = crate::model::synthetic::build(&cfg, 7, &Device::Cpu, dtype).unwrap();
            let a: Vec<u32> = vec![5, 9, 2, 33, 7, 1, 60, 12];
            for diff in [0, 1, 4, 7, 8] {
                let mut b = a.clone();
                for id in &mut b[diff..] {
                    *id = (*id + 11) % 64;
                }
                let mut reference = Record(HashMap::new());
                let batched = t
                    .forward(
                        t.embed(&[&a, &b]).unwrap(),
                        Span {
                            keep_kv: true,
                            ..Span::default()
                        },
                        &mut reference,
                    )
                    .unwrap();
                let packed = t.forward_shared_prefix(&[&a, &b], diff, &sites).unwrap();
                let what = format!("{dtype:?}, prompts differing from {diff}");
                let close = |x: &Tensor, y: &Tensor, name: &str| {
                    assert_eq!(x.dims(), y.dims(), "{name}, {what}");
                    let gap = max_abs_diff(&x.to_dtype(DType::F32).unwrap(), &y.to_dtype(DType::F32).unwrap());
                    assert!(gap < tolerance, "{name}, {what}: {gap}");
                };
                close(
                    &t.final_logits(&packed.last_hidden).unwrap(),
                    &batched.last_logits,
                    "logits",
                );
                for l in 0..cfg.num_layers {
                    for site in sites {
                        close(
                            &packed.acts[&(site, l)],
                            &reference.0[&(site, l)],
                            &format!("{site:?} {l}"),
                        );
                    }
                    close(&packed.kv[l].k, &batched.kv[l].k, &format!("keys {l}"));
                    close(&packed.kv[l].v, &batched.kv[l].v, &format!("values {l}"));
                }
            }
            // Groups of prompts in one forward (a dataset's pairs) give each group's own results.
            let c: Vec<u32> = a.iter().map(|id| (id + 5) % 64).collect();
            let mut d = c.clone();
            d[3] = (d[3] + 1) % 64;
            let groups = t
                .forward_prompt_groups(
                    &[(&[&a, &b_for(&a, 4)], 4), (&[&c, &d], 3), (&[&a[..5], &c[..5]], 0)],
                    &sites,
                )
                .unwrap();
            for (group, (prompts, shared)) in [
                (vec![a.clone(), b_for(&a, 4)], 4),
                (vec![c.clone(), d.clone()], 3),
                (vec![a[..5].to_vec(), c[..5].to_vec()], 0),
            ]
            .iter()
            .enumerate()
            {
                let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
                let alone = t.forward_shared_prefix(&rows, *shared, &sites).unwrap();
                let gap = max_abs_diff(
                    &t.final_logits(&groups[group].last_hidden).unwrap(),
                    &t.final_logits(&alone.last_hidden).unwrap(),
                );
                assert!(gap < tolerance, "group {group} {dtype:?}: {gap}");
                for l in 0..cfg.num_layers {
                    let gap = max_abs_diff(
                        &groups[group].kv[l].k.to_dtype(DType::F32).unwrap(),
                        &alone.kv[l].k.to_dtype(DType::F32).unwrap(),
                    );
                    assert!(gap < tolerance, "group {group} keys {l}: {gap}");
                }
            }
            // Prompts that do not share the tokens claimed are refused, not silently mixed.
            assert!(
                t.forward_shared_prefix(&[&a, &[1, 2, 3, 4, 5, 6, 7, 8]], 3, &sites)
                    .is_err()
            );
            assert!(t.forward_shared_prefix(&[&a, &a[..4]], 2, &sites).is_err());
        }
    }
}
