//! Where a model runs and in which precision: the user's choices, typed, as the command line, the
//! app and the settings file name them.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, candle_text};

/// Which device runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum DeviceChoice {
    /// The CPU, f32.
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = Error;

    /// Parses "cpu", "cuda" or "cuda:N".
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| Error::Input(format!("unknown device '{s}': use cpu, cuda or cuda:N"))),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device, explaining why CUDA is unavailable when it is.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda(ordinal) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::Device(
                        "CUDA was asked for, but this build of Patchbay has no CUDA support: rebuild with \
                         `cargo build --release --features cuda` (needs the CUDA toolkit), or use --device cpu"
                            .into(),
                    ));
                }
                Device::new_cuda(ordinal).map_err(|e| {
                    Error::Device(format!(
                        "cannot open CUDA device {ordinal} ({}); use --device cpu",
                        candle_text(&e)
                    ))
                })
            }
        }
    }

    /// The dtype used unless the user picks one: f32 on CPU (no fast bf16 matmul there), bf16 on GPU.
    pub fn default_dtype(self) -> DType {
        match self {
            DeviceChoice::Cpu => DType::F32,
            DeviceChoice::Cuda(_) => DType::BF16,
        }
    }
}

/// The precision of weights and activations, as the user chooses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum DtypeChoice {
    /// The device's default: f32 on the CPU, bf16 on a GPU.
    #[default]
    Auto,
    /// 32-bit floats: exact, the CPU's fast path.
    #[value(alias = "float32")]
    F32,
    /// bfloat16: a GPU's fast path.
    #[value(alias = "bfloat16")]
    Bf16,
    /// IEEE half precision (GPU only).
    #[value(alias = "float16", alias = "half")]
    F16,
}

impl DtypeChoice {
    /// Every choice, in the order menus show them.
    pub const ALL: [DtypeChoice; 4] = [DtypeChoice::Auto, DtypeChoice::F32, DtypeChoice::Bf16, DtypeChoice::F16];

    /// The dtype on `device`.
    pub fn resolve(self, device: DeviceChoice) -> DType {
        match self {
            DtypeChoice::Auto => device.default_dtype(),
            DtypeChoice::F32 => DType::F32,
            DtypeChoice::Bf16 => DType::BF16,
            DtypeChoice::F16 => DType::F16,
        }
    }

    /// The name on the command line and in settings ("auto", "f32", …).
    pub fn name(self) -> &'static str {
        match self {
            DtypeChoice::Auto => "auto",
            DtypeChoice::F32 => "f32",
            DtypeChoice::Bf16 => "bf16",
            DtypeChoice::F16 => "f16",
        }
    }
}

impl fmt::Display for DtypeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The kind of device a loaded model runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
    Metal,
}

impl DeviceKind {
    /// The kind of `device`.
    pub fn of(device: &Device) -> Self {
        match device {
            Device::Cpu => DeviceKind::Cpu,
            Device::Cuda(_) => DeviceKind::Cuda,
            Device::Metal(_) => DeviceKind::Metal,
        }
    }

    /// Its short name ("cpu", "cuda").
    pub fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Metal => "metal",
        }
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_alike() {
        for (text, device) in [
            ("cpu", DeviceChoice::Cpu),
            ("CUDA", DeviceChoice::Cuda(0)),
            ("cuda:1", DeviceChoice::Cuda(1)),
        ] {
            assert_eq!(text.parse::<DeviceChoice>().unwrap(), device);
        }
        assert_eq!(
            DeviceChoice::Cuda(2).to_string().parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(2)
        );
        let e = "tpu".parse::<DeviceChoice>().unwrap_err().to_string();
        assert!(e.contains("use cpu, cuda or cuda:N"), "{e}");
    }

    #[test]
    fn dtype_choices_resolve_per_device_and_read_old_settings() {
        assert_eq!(DtypeChoice::Auto.resolve(DeviceChoice::Cpu), DType::F32);
        assert_eq!(DtypeChoice::Auto.resolve(DeviceChoice::Cuda(0)), DType::BF16);
        assert_eq!(DtypeChoice::F16.resolve(DeviceChoice::Cpu), DType::F16);
        // Settings files written before the enum stored the same strings.
        let read: DtypeChoice = serde_json::from_str("\"bf16\"").unwrap();
        assert_eq!(read, DtypeChoice::Bf16);
        assert_eq!(serde_json::to_string(&DtypeChoice::Auto).unwrap(), "\"auto\"");
    }
}
