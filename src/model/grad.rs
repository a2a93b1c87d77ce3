//! Gradients of the logit difference with respect to every site's activation, for attribution
//! patching (AtP): one differentiable forward of a prompt, with a zero "probe" variable added at
//! each site asked for, and one backward pass.
//!
//! The plain forwards use fused CPU kernels without a backward (the few-row matmul, SwiGLU/GeGLU,
//! RoPE, candle's fused norms and softmax); this forward is the same computation written with
//! candle's differentiable ops only, so autograd can run it backwards. Its logits agree with
//! [`Transformer::forward`]'s (tested). A probe `a + 0` leaves every value as it was, and its
//! gradient is `∂LD/∂a`: candle keeps the gradients of variables only.

use std::collections::HashMap;

use candle_core::{D, DType, Tensor, Var};

use super::decoder::{Site, Transformer};
use super::layers::{Attention, Layer, Mlp, Norm, causal_mask};
use crate::error::{Error, Result};

/// One run's activations at the sites asked for and the logit difference's gradient there.
#[derive(Debug)]
pub struct SiteGradients {
    /// logit[correct] − logit[incorrect] at the last position.
    pub logit_diff: f64,
    /// The activation at (site, layer), as [`Transformer::forward`]'s hooks see it without the
    /// batch dimension: `[seq, width]` for residual sites and head outputs (`Z`), `[heads, seq,
    /// head_dim]` for queries, `[kv_heads, seq, head_dim]` for keys and values, `[heads, seq, seq]`
    /// for patterns.
    pub acts: HashMap<(Site, usize), Tensor>,
    /// ∂LD/∂activation, shaped like `acts`.
    pub grads: HashMap<(Site, usize), Tensor>,
}

/// The probes of one forward: a zero variable added at each site asked for.
struct Probes<'a> {
    sites: &'a [Site],
    vars: HashMap<(Site, usize), Var>,
    acts: HashMap<(Site, usize), Tensor>,
}

impl Probes<'_> {
    fn at(&mut self, site: Site, layer: usize, x: Tensor) -> Result<Tensor> {
        if !self.sites.contains(&site) {
            return Ok(x);
        }
        let probe = Var::zeros(x.shape(), x.dtype(), x.device())?;
        let out = (&x + probe.as_tensor())?;
        self.acts.insert((site, layer), x.detach());
        self.vars.insert((site, layer), probe);
        Ok(out)
    }
}

/// x · Wᵀ + b for `x` `[rows, in]`. On the CPU in f32 through [`InputGradLinear`], whose backward
/// skips the weights' gradient.
fn linear(x: &Tensor, l: &candle_nn::Linear) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && l.weight().dtype() == DType::F32 {
        return Ok(x.contiguous()?.apply_op1(InputGradLinear(l.clone()))?);
    }
    let y = x.matmul(&l.weight().t()?)?;
    Ok(match l.bias() {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// A linear layer whose backward gives its input's gradient only. candle's matmul backward also
/// computes the weights' (as large a matmul as the forward, and a weight-sized sum: for a
/// 262,144-token unembedding 168 M floats), which attribution never needs.
struct InputGradLinear(candle_nn::Linear);

impl candle_core::CustomOp1 for InputGradLinear {
    fn name(&self) -> &'static str {
        "input-grad-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("input-grad-linear: f32 only");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("input-grad-linear: contiguous input only");
        };
        let x = Tensor::from_slice(&data[a..b], layout.shape(), &candle_core::Device::Cpu)?;
        let y = super::kernels::skinny::linear(&self.0, &x).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let shape = y.shape().clone();
        Ok((candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.matmul(self.0.weight())?))
    }
}

/// The norm over the last dimension, in differentiable ops (f32 inside, as HF computes it).
fn norm(n: &Norm, x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    Ok(match n {
        Norm::Rms { weight, eps } => {
            let inv = (x.sqr()?.mean_keepdim(D::Minus1)? + f64::from(*eps))?.sqrt()?.recip()?;
            x.broadcast_mul(&inv)?.to_dtype(dtype)?.broadcast_mul(weight)?
        }
        Norm::Layer { weight, bias, eps } => {
            let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
            let inv = (centred.sqr()?.mean_keepdim(D::Minus1)? + f64::from(*eps))?
                .sqrt()?
                .recip()?;
            centred
                .broadcast_mul(&inv)?
                .to_dtype(dtype)?
                .broadcast_mul(weight)?
                .broadcast_add(bias)?
        }
    })
}

/// HF's half-split rotation of the first `rotary_dim` dimensions of `x` `[heads, seq, hd]`, with
/// `cos`/`sin` `[seq, rotary_dim / 2]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, rotary_dim: usize) -> Result<Tensor> {
    if rotary_dim == 0 {
        return Ok(x.clone());
    }
    let hd = x.dim(2)?;
    let half = rotary_dim / 2;
    let (x1, x2) = (x.narrow(2, 0, half)?, x.narrow(2, half, half)?);
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    let mut parts = vec![a, b];
    if rotary_dim < hd {
        parts.push(x.narrow(2, rotary_dim, hd - rotary_dim)?);
    }
    Ok(Tensor::cat(&parts, 2)?)
}

/// Softmax over the last dimension; the max is a constant shift, so it is detached.
fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

impl Transformer {
    /// Runs `ids` (a whole prompt) differentiably and returns the logit difference between
    /// `correct` and `incorrect` at the last position, the activations at `sites` in every layer,
    /// and the difference's gradient with respect to each.
    pub fn site_gradients(&self, ids: &[u32], correct: u32, incorrect: u32, sites: &[Site]) -> Result<SiteGradients> {
        let seq = ids.len();
        let vocab = self.cfg.vocab_size as u32;
        if seq == 0 || correct >= vocab || incorrect >= vocab {
            return Err(Error::Internal(
                "site gradients need a prompt and answers in the vocabulary".into(),
            ));
        }
        let positions: Vec<u32> = (0..seq as u32).collect();
        let mut x = self.embed_at(ids, &positions)?;
        let masks = [
            causal_mask(seq, 0, None, &self.device, self.dtype)?,
            causal_mask(seq, 0, self.cfg.sliding_window, &self.device, self.dtype)?,
        ];
        let mut probes = Probes {
            sites,
            vars: HashMap::new(),
            acts: HashMap::new(),
        };
        for (l, layer) in self.layers.iter().enumerate() {
            let mask = masks[self.cfg.layer_kinds[l] as usize].as_ref();
            x = self.layer_differentiable(l, layer, x, mask, &mut probes)?;
        }
        let last = x.narrow(0, seq - 1, 1)?;
        let logits = linear(&norm(&self.final_norm, &last)?, &self.lm_head)?.to_dtype(DType::F32)?;
        let logits = match self.cfg.final_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        };
        let logits = logits.squeeze(0)?;
        let ld = (logits.get(correct as usize)? - logits.get(incorrect as usize)?)?;
        let logit_diff = f64::from(ld.to_scalar::<f32>()?);
        let store = ld.backward()?;
        let mut grads = HashMap::with_capacity(probes.vars.len());
        for (key, var) in &probes.vars {
            // A site the difference does not depend on (none, in a decoder) has no gradient: zero.
            let grad = match store.get(var.as_tensor()) {
                Some(g) => g.clone(),
                None => var.as_tensor().zeros_like()?,
            };
            grads.insert(*key, grad);
        }
        Ok(SiteGradients {
            logit_diff,
            acts: probes.acts,
            grads,
        })
    }

    /// One decoder layer on `x` `[seq, hidden]`, differentiably, with probes at its sites.
    fn layer_differentiable(
        &self,
        l: usize,
        layer: &Layer,
        x: Tensor,
        mask: Option<&Tensor>,
        probes: &mut Probes,
    ) -> Result<Tensor> {
        let pre = probes.at(Site::ResidPre, l, x)?;
        let o = self.attention_differentiable(l, &layer.attn, &norm(&layer.attn_norm, &pre)?, mask, probes)?;
        let attn = match &layer.attn.post_norm {
            Some(n) => norm(n, &o)?,
            None => o,
        };
        let attn = probes.at(Site::AttnOut, l, attn)?;
        let mid = probes.at(Site::ResidMid, l, (&pre + attn)?)?;
        let mlp_in = if self.cfg.parallel_residual { &pre } else { &mid };
        let mlp = mlp_differentiable(&layer.mlp, &norm(&layer.mlp_norm, mlp_in)?)?;
        let mlp = probes.at(Site::MlpOut, l, mlp)?;
        probes.at(Site::ResidPost, l, (mid + mlp)?)
    }

    /// The attention block of layer `l` on its normed input `[seq, hidden]`: o_proj's output.
    fn attention_differentiable(
        &self,
        l: usize,
        attn: &Attention,
        x: &Tensor,
        mask: Option<&Tensor>,
        probes: &mut Probes,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (seq, hd) = (x.dim(0)?, cfg.head_dim);
        let (heads, kv_heads) = (cfg.num_heads, cfg.num_kv_heads);
        let (qd, kvd) = (heads * hd, kv_heads * hd);
        let qkv = linear(x, &attn.qkv_proj)?;
        let split = |from: usize, n: usize, count: usize| -> Result<Tensor> {
            Ok(qkv.narrow(1, from, n)?.reshape((seq, count, hd))?)
        };
        let (q, k, v) = (
            split(0, qd, heads)?,
            split(qd, kvd, kv_heads)?,
            split(qd + kvd, kvd, kv_heads)?,
        );
        let q = match &attn.q_norm {
            Some(n) => norm(n, &q)?,
            None => q,
        };
        let k = match &attn.k_norm {
            Some(n) => norm(n, &k)?,
            None => k,
        };
        let (cos, sin) = self.rope(l, seq)?;
        let (cos, sin) = (cos.narrow(0, 0, seq)?, sin.narrow(0, 0, seq)?);
        let q = rope(&q.transpose(0, 1)?, &cos, &sin, cfg.rotary_dim)?;
        let k = rope(&k.transpose(0, 1)?, &cos, &sin, cfg.rotary_dim)?;
        let v = v.transpose(0, 1)?;
        let q = probes.at(Site::Q, l, q)?;
        let k = probes.at(Site::K, l, k)?;
        let v = probes.at(Site::V, l, v)?;
        // Each query head's key/value head.
        let rep = heads / kv_heads;
        let groups: Vec<u32> = (0..heads).map(|h| (h / rep) as u32).collect();
        let groups = Tensor::from_vec(groups, heads, &self.device)?;
        let (k, v) = (
            k.contiguous()?.index_select(&groups, 0)?,
            v.contiguous()?.index_select(&groups, 0)?,
        );
        let scores = (q.matmul(&k.t()?)? * cfg.attention_scale)?;
        let scores = match cfg.attn_softcap {
            Some(cap) => ((scores / cap)?.tanh()? * cap)?,
            None => scores,
        };
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = softmax(&scores.to_dtype(DType::F32)?)?.to_dtype(self.dtype)?;
        let probs = probes.at(Site::Pattern, l, probs)?;
        let z = probs.matmul(&v)?.transpose(0, 1)?.reshape((seq, qd))?;
        let z = probes.at(Site::Z, l, z)?;
        linear(&z, &attn.o_proj)
    }
}

/// The MLP block on its normed input, differentiably (post-norm included).
fn mlp_differentiable(mlp: &Mlp, x: &Tensor) -> Result<Tensor> {
    use super::config::Activation;
    let act = |t: &Tensor| -> Result<Tensor> {
        Ok(match mlp.activation {
            Activation::Silu => t.silu()?,
            Activation::GeluTanh => t.gelu()?,
            Activation::Gelu => t.gelu_erf()?,
        })
    };
    let up = linear(x, &mlp.up_proj)?;
    let hidden = match &mlp.gate_proj {
        Some(gate) => (act(&linear(x, gate)?)? * up)?,
        None => act(&up)?,
    };
    let out = linear(&hidden, &mlp.down_proj)?;
    match &mlp.post_norm {
        Some(n) => norm(n, &out),
        None => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{ArchConfig, Family};
    use crate::model::{NoHooks, Span};
    use candle_core::Device;

    fn gemma_like() -> ArchConfig {
        let mut cfg = ArchConfig {
            max_position_embeddings: 64,
            tie_word_embeddings: true,
            sliding_window: Some(3),
            attn_softcap: Some(3.0),
            final_softcap: Some(4.0),
            local_rope_theta: Some(100.0),
            ..ArchConfig::sized(Family::Gemma3, 64, 32, 48, 3, 4, 2, 8)
        };
        cfg.layer_kinds = vec![
            crate::model::config::AttentionKind::Local,
            crate::model::config::AttentionKind::Global,
            crate::model::config::AttentionKind::Local,
        ];
        cfg
    }

    #[test]
    fn the_differentiable_forward_matches_the_plain_one_and_its_gradients_finite_differences() {
        let ids: Vec<u32> = vec![5, 9, 2, 33, 7, 1, 60, 12];
        for cfg in [
            gemma_like(),
            ArchConfig::sized(Family::GptNeoX, 64, 32, 48, 2, 4, 4, 8),
            ArchConfig::sized(Family::Gpt2, 64, 32, 48, 2, 4, 4, 8),
        ] {
            let mut cfg = cfg;
            cfg.max_position_embeddings = 64;
            cfg.rotary_dim = if cfg.family == Family::GptNeoX {
                4
            } else {
                cfg.rotary_dim
            };
            cfg.parallel_residual = cfg.family == Family::GptNeoX;
            let (t, _) = crate::model::synthetic::build(&cfg, 3, &Device::Cpu, DType::F32).unwrap();
            let plain = t
                .forward(t.embed(&[&ids]).unwrap(), Span::default(), &mut NoHooks)
                .unwrap()
                .last_logits
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = f64::from(plain[3] - plain[11]);
            let sites = [Site::ResidPost, Site::Z, Site::Q];
            let g = t.site_gradients(&ids, 3, 11, &sites).unwrap();
            assert!(
                (g.logit_diff - want).abs() < 1e-4,
                "{:?}: {} vs {want}",
                cfg.family,
                g.logit_diff
            );
            // A finite difference along the gradient at one site.
            let key = (Site::ResidPost, 0);
            let (act, grad) = (&g.acts[&key], &g.grads[&key]);
            let eps = 1e-2;
            let step = (grad.clone() * eps).unwrap();
            struct Add(Tensor);
            impl crate::model::Hooks for Add {
                fn visit(&mut self, site: Site, layer: usize, _: usize, x: Tensor) -> Result<Tensor> {
                    Ok(if site == Site::ResidPost && layer == 0 {
                        x.broadcast_add(&self.0)?
                    } else {
                        x
                    })
                }
            }
            let ld = |delta: Tensor| -> f64 {
                let l = t
                    .forward(t.embed(&[&ids]).unwrap(), Span::default(), &mut Add(delta))
                    .unwrap()
                    .last_logits
                    .squeeze(0)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                f64::from(l[3] - l[11])
            };
            let slope = (ld(step.clone()) - ld(step.neg().unwrap())) / (2.0 * eps);
            let norm2: f64 = grad
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .into();
            assert!(
                (slope - norm2).abs() <= 0.02 * norm2.max(1e-3),
                "{:?}: finite difference {slope} vs |g|² {norm2}",
                cfg.family
            );
            assert_eq!(act.dims(), grad.dims());
            assert_eq!(g.grads[&(Site::Q, 1)].dims(), &[4, ids.len(), 8]);
        }
    }
}
