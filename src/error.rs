//! The engine's error type: one enum, each variant a message a user can act on.

use std::path::PathBuf;

/// Everything the engine can refuse or fail at. Messages are complete sentences for the UI and CLI.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The user's input cannot be swept as given (prompts, answers, options). Only for what the
    /// user can change; the engine's own mistakes are [`Error::Internal`].
    #[error("{0}")]
    Input(String),
    /// An invariant of the engine does not hold: a bug in Patchbay, not the user's doing.
    #[error("internal error (please report it): {0}")]
    Internal(String),
    /// A model file is missing, unreadable or malformed. The path comes last.
    #[error("{message}: {}", path.display())]
    ModelFile { message: String, path: PathBuf },
    /// A checkpoint's configuration (config.json or GGUF metadata) lacks a field or describes a
    /// shape the decoder cannot run. Loaders attach the file ([`Error::ModelFile`]).
    #[error("{0}")]
    ModelConfig(String),
    /// The checkpoint's architecture is not one the decoder implements.
    #[error("unsupported architecture '{found}': Patchbay supports {supported}")]
    UnsupportedArchitecture { found: String, supported: String },
    /// The Hugging Face Hub could not provide the model (offline, unknown repo, network).
    #[error("{0}")]
    Hub(String),
    /// Building or running the tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The requested device cannot be used.
    #[error("{0}")]
    Device(String),
    /// The sweep was cancelled (Ctrl-C); the message says what was kept.
    #[error("{0}")]
    Cancelled(String),
    /// The sweep, or writing its outputs, stopped on an error after computing cells, which were
    /// kept (the message says where).
    #[error("{0}")]
    Stopped(String),
    /// A tensor operation failed (shape mismatch, out of memory, ...).
    #[error("{}", candle_message(.0))]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed, or a file name cannot be used. The path comes last.
    #[error("{message}: {}", path.display())]
    Io { message: String, path: PathBuf },
    /// Drawing or encoding a figure failed.
    #[error("{0}")]
    Drawing(String),
}

impl Error {
    /// A model-file error for `path`.
    pub fn model_file(message: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Error::ModelFile {
            message: message.into(),
            path: path.into(),
        }
    }

    /// Whether the device ran out of memory (CUDA's allocator or cuBLAS's workspace). The CPU
    /// backend aborts instead, so this only ever holds on a GPU.
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::Candle(e) if is_out_of_memory(e))
    }

    /// An I/O error for `path`, keeping the OS's reason.
    pub fn io(action: &str, err: std::io::Error, path: impl Into<PathBuf>) -> Self {
        Error::Io {
            message: format!("{action} failed ({err})"),
            path: path.into(),
        }
    }
}

fn is_out_of_memory(e: &candle_core::Error) -> bool {
    // cudarc's errors print as their Debug form: `DriverError(CUDA_ERROR_OUT_OF_MEMORY, "out of
    // memory")`, `CublasError(CUBLAS_STATUS_ALLOC_FAILED)`.
    let text = e.to_string();
    text.contains("OUT_OF_MEMORY") || text.contains("ALLOC_FAILED")
}

fn candle_message(e: &candle_core::Error) -> String {
    let text = candle_text(e);
    if is_out_of_memory(e) {
        format!(
            "the GPU ran out of memory ({text}). Free GPU memory (other programs, a model loaded \
             elsewhere), use a shorter prompt or bf16/f16, or run on the CPU"
        )
    } else {
        format!("tensor operation failed: {text}")
    }
}

/// A candle error's message on one line, without the backtrace candle appends to it when
/// `RUST_BACKTRACE` is set: messages for the UI and CLI say what failed, not where in candle.
pub fn candle_text(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_text(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_text(inner)),
        E::WithPath { inner, path } => format!("{} ({})", candle_text(inner), path.display()),
        E::WrappedContext { wrapped, context } => format!("{context}: {wrapped}"),
        other => other.to_string(),
    }
}

thread_local! {
    /// Set while [`quietly`] runs on this thread: its panics are caught and reported as errors.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic into an error carrying its message, without the panic hook printing
/// it (other threads' panics print as usual).
pub(crate) fn quietly<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    outcome.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "the reader failed".into())
    })
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_messages_leave_out_backtraces() {
        let traced = |inner: candle_core::Error| candle_core::Error::WithBacktrace {
            inner: Box::new(inner),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        let e = traced(candle_core::Error::Msg("unknown magic 0x1234".into()));
        assert!(e.to_string().lines().count() > 1, "candle prints the backtrace");
        assert_eq!(candle_text(&e), "unknown magic 0x1234");
        let e = traced(candle_core::Error::Msg("shape mismatch".into())).context("in layer 3");
        assert_eq!(candle_text(&e), "in layer 3: shape mismatch");
        assert_eq!(
            Error::Candle(e).to_string(),
            "tensor operation failed: in layer 3: shape mismatch"
        );
    }
}
