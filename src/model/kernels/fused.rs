//! Fused CPU kernels for f32: SwiGLU's silu(gate) · up in one pass, and RoPE spread over the
//! packed tokens. Other devices and dtypes take candle's ops.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// The activations the fused kernels compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Silu,
    /// GELU, tanh approximation.
    GeluTanh,
}

impl Act {
    #[inline(always)]
    fn apply(self, x: f32) -> f32 {
        match self {
            Act::Silu => super::fastmath::silu(x),
            Act::GeluTanh => super::fastmath::gelu_tanh(x),
        }
    }

    /// candle's op, for other devices and dtypes.
    fn candle(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Act::Silu => candle_nn::ops::silu(x)?,
            Act::GeluTanh => x.gelu()?,
        })
    }
}

/// silu(gate) · up, the SwiGLU MLP's activation (see [`gated`]).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gated(gate, up, Act::Silu)
}

/// act(gate) · up, a gated MLP's activation (SwiGLU, GeGLU). On the CPU in f32 one pass over both,
/// spread over the cores (candle's activation then multiply make two passes on one core).
pub fn gated(gate: &Tensor, up: &Tensor, act: Act) -> Result<Tensor> {
    let fused = gate.device().is_cpu()
        && gate.dtype() == DType::F32
        && up.dtype() == DType::F32
        && gate.shape() == up.shape()
        && gate.is_contiguous()
        && up.is_contiguous();
    if fused {
        Ok(gate.apply_op2_no_bwd(up, &ActMul(act))?)
    } else {
        Ok((act.candle(gate)? * up)?)
    }
}

/// act(x) elementwise; on the CPU in f32 spread over the cores.
pub fn activation(x: &Tensor, act: Act) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && x.is_contiguous() {
        Ok(x.apply_op1_no_bwd(&ActOnly(act))?)
    } else {
        act.candle(x)
    }
}

/// The CPU kernel behind [`activation`].
struct ActOnly(Act);

impl candle_core::CustomOp1 for ActOnly {
    fn name(&self) -> &'static str {
        "act"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        use rayon::prelude::*;
        let CpuStorage::F32(x) = x else {
            candle_core::bail!("act: f32 only");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("act: contiguous input only");
        };
        let x = &x[a..b];
        let act = self.0;
        let mut out = vec![0f32; x.len()];
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| {
            for (o, &x) in o.iter_mut().zip(x) {
                *o = act.apply(x);
            }
        });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// The CPU kernel behind [`gated`].
struct ActMul(Act);

impl candle_core::CustomOp2 for ActMul {
    fn name(&self) -> &'static str {
        "act-mul"
    }

    fn cpu_fwd(
        &self,
        gate: &candle_core::CpuStorage,
        gate_layout: &candle_core::Layout,
        up: &candle_core::CpuStorage,
        up_layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        use rayon::prelude::*;
        let (CpuStorage::F32(gate), CpuStorage::F32(up)) = (gate, up) else {
            candle_core::bail!("silu-mul: f32 only");
        };
        let (Some((g0, g1)), Some((u0, u1))) = (gate_layout.contiguous_offsets(), up_layout.contiguous_offsets())
        else {
            candle_core::bail!("silu-mul: contiguous inputs only");
        };
        let (gate, up) = (&gate[g0..g1], &up[u0..u1]);
        if gate.len() != up.len() {
            candle_core::bail!("silu-mul: {} vs {} elements", gate.len(), up.len());
        }
        let mut out = vec![0f32; gate.len()];
        const CHUNK: usize = 1 << 14;
        out.par_chunks_mut(CHUNK)
            .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| {
                let act = self.0;
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = act.apply(g) * u;
                }
            });
        Ok((CpuStorage::F32(out), gate_layout.shape().clone()))
    }
}

/// RoPE (HF's half-split rotation) on `x` `[1, tokens, heads, head_dim]` with per-token tables
/// `cos`/`sin` `[tokens, head_dim / 2]`. On the CPU in f32 spread over the tokens: candle's kernel
/// gives each batch row one thread, and a packed forward is a single row.
pub fn rope_thd(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let own = x.device().is_cpu()
        && [x, cos, sin]
            .iter()
            .all(|t| t.dtype() == DType::F32 && t.is_contiguous())
        && x.dim(0)? == 1;
    if own {
        Ok(x.apply_op3_no_bwd(cos, sin, &RopeRows)?)
    } else {
        Ok(candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin)?)
    }
}

/// The CPU kernel behind [`rope_thd`].
struct RopeRows;

impl candle_core::CustomOp3 for RopeRows {
    fn name(&self) -> &'static str {
        "rope-rows"
    }

    fn cpu_fwd(
        &self,
        x: &candle_core::CpuStorage,
        x_layout: &candle_core::Layout,
        cos: &candle_core::CpuStorage,
        cos_layout: &candle_core::Layout,
        sin: &candle_core::CpuStorage,
        sin_layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        use rayon::prelude::*;
        let (CpuStorage::F32(x), CpuStorage::F32(cos), CpuStorage::F32(sin)) = (x, cos, sin) else {
            candle_core::bail!("rope-rows: f32 only");
        };
        let (Some((x0, x1)), Some((c0, c1)), Some((s0, s1))) = (
            x_layout.contiguous_offsets(),
            cos_layout.contiguous_offsets(),
            sin_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("rope-rows: contiguous inputs only");
        };
        let (x, cos, sin) = (&x[x0..x1], &cos[c0..c1], &sin[s0..s1]);
        let (_, tokens, heads, d) = x_layout.shape().dims4()?;
        let half = d / 2;
        let table = [tokens, half];
        if d % 2 != 0 || cos_layout.dims() != table || sin_layout.dims() != table {
            candle_core::bail!(
                "rope-rows: tables {:?} and {:?} for {tokens} tokens × head_dim {d}",
                cos_layout.dims(),
                sin_layout.dims()
            );
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(heads * d)
            .zip(x.par_chunks(heads * d))
            .zip(cos.par_chunks(half).zip(sin.par_chunks(half)))
            .with_min_len(16)
            .for_each(|((out, x), (cos, sin))| {
                for (out, x) in out.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                    let (o1, o2) = out.split_at_mut(half);
                    let (x1, x2) = x.split_at(half);
                    for i in 0..half {
                        o1[i] = x1[i] * cos[i] - x2[i] * sin[i];
                        o2[i] = x1[i] * sin[i] + x2[i] * cos[i];
                    }
                }
            });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::max_abs_diff;
    use candle_core::Device;

    #[test]
    fn fused_swiglu_matches_silu_times_up() {
        let dev = Device::Cpu;
        let gate = Tensor::randn(0f32, 3.0, (37, 1000), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (37, 1000), &dev).unwrap();
        let reference = (candle_nn::ops::silu(&gate).unwrap() * &up).unwrap();
        assert!(max_abs_diff(&swiglu(&gate, &up).unwrap(), &reference) < 1e-5);
        // Views that are not contiguous take candle's ops.
        let (gt, ut) = (gate.t().unwrap(), up.t().unwrap());
        assert!(max_abs_diff(&swiglu(&gt, &ut).unwrap(), &reference.t().unwrap()) < 1e-5);
    }

    #[test]
    fn fused_gelu_matches_candles() {
        let dev = Device::Cpu;
        let gate = Tensor::randn(0f32, 3.0, (37, 1000), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (37, 1000), &dev).unwrap();
        let reference = (gate.gelu().unwrap() * &up).unwrap();
        assert!(max_abs_diff(&gated(&gate, &up, Act::GeluTanh).unwrap(), &reference) < 1e-5);
        let alone = activation(&gate, Act::GeluTanh).unwrap();
        assert!(max_abs_diff(&alone, &gate.gelu().unwrap()) < 1e-5);
    }

    #[test]
    fn the_cpu_rope_matches_candles() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 37, 6, 32), &dev).unwrap();
        let cos = Tensor::randn(0f32, 1.0, (37, 16), &dev).unwrap();
        let sin = Tensor::randn(0f32, 1.0, (37, 16), &dev).unwrap();
        let reference = candle_nn::rotary_emb::rope_thd(&x, &cos, &sin).unwrap();
        let ours = x.apply_op3_no_bwd(&cos, &sin, &RopeRows).unwrap();
        assert_eq!(ours.dims(), reference.dims());
        assert!(max_abs_diff(&ours, &reference) < 1e-6);
        assert!(max_abs_diff(&rope_thd(&x, &cos, &sin).unwrap(), &reference) < 1e-6);
    }
}
