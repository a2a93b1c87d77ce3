//! The worker thread: owns the model and the device, runs loads and sweeps, and reports back.
//!
//! The UI sends [`Command`]s and drains [`Event`]s once per frame; it never runs the model. Both
//! channels are bounded. Cancelling is a shared flag, so it takes effect while a sweep is running.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};

use candle_core::DType;

use crate::dataset::result::DatasetResult;
use crate::dataset::run::{DatasetEvent, DatasetRequest};
use crate::model::{
    ArchConfig, DeviceChoice, DeviceKind, DtypeChoice, LoadProgress, Model, ModelSource, TextTokenizer,
};
use crate::patching::estimate::Attribution;
use crate::patching::{
    Cell, HeadPatterns, PatternRequest, Progress, Sweep, SweepEvent, SweepOptions, SweepRequest, SweepResult,
    head_patterns,
};

/// Commands waiting for the worker; a few are plenty (the UI disables buttons while busy).
const COMMAND_CAPACITY: usize = 16;
/// Events waiting for the UI: a whole sweep's cells fit, so the worker never waits on a slow frame.
const EVENT_CAPACITY: usize = 8192;
/// How long closing the window waits for the worker before leaving it to the OS.
const SHUTDOWN_WAIT: Duration = Duration::from_millis(300);

/// What the UI asks the worker to do.
#[derive(Debug, Clone)]
pub enum Command {
    /// Load a model (replacing the current one).
    LoadModel {
        source: ModelSource,
        device: DeviceChoice,
        dtype: DtypeChoice,
    },
    /// Run a sweep on the loaded model.
    RunSweep {
        request: SweepRequest,
        options: SweepOptions,
    },
    /// Compute a head cell's attention patterns for the inspector.
    HeadPatterns(PatternRequest),
    /// Sweep every pair of a dataset.
    RunDataset {
        request: Box<DatasetRequest>,
        options: SweepOptions,
    },
}

/// A loaded model as the UI sees it.
#[derive(Clone)]
pub struct ModelInfo {
    pub source: ModelSource,
    pub config: ArchConfig,
    pub dtype: DType,
    pub device: DeviceKind,
    pub load_seconds: f64,
    /// A copy of the tokenizer, so the UI can show tokens as the user types.
    pub tokenizer: Arc<TextTokenizer>,
}

/// What the worker reports.
pub enum Event {
    /// Progress of a model load (download bytes or a stage).
    Loading(LoadProgress),
    /// The model is ready.
    ModelLoaded(ModelInfo),
    /// Loading failed; the previous model (if any) is still loaded.
    ModelFailed(String),
    /// Baselines are done; cells follow. Carries the empty grid with tokens, answers and top-k,
    /// and the sweep's [`Progress`] to feed the cells as they come.
    SweepStarted(Box<SweepResult>, Progress),
    /// One cell finished.
    Cell(Cell),
    /// More of the sweep's work is done (for its [`Progress`]; comes layer by layer in a block).
    Work(f64),
    /// Every cell's attribution-patching estimate, before the exact cells.
    Estimated(Box<Attribution>),
    /// The exact cells chosen after the estimate are this much work (the [`Progress`]'s new total).
    Planned(f64),
    /// The sweep ended (complete, or partial after a cancel).
    SweepFinished(Box<SweepResult>),
    /// The sweep was refused or failed; the message says why.
    SweepFailed(String),
    /// A head cell's attention patterns, or why they could not be computed.
    HeadPatterns(Box<PatternRequest>, Result<Box<HeadPatterns>, String>),
    /// A dataset sweep's pair `.0` has run its baselines; its cells follow.
    PairStarted(usize, Box<SweepResult>),
    /// One cell of pair `.0`.
    PairCell(usize, Cell),
    /// Pair `.0` ended (complete, or partial after a cancel).
    PairFinished(usize, Box<SweepResult>),
    /// Pair `.0` could not run; the message says why.
    PairFailed(usize, String),
    /// The dataset sweep ended (complete, or partial after a cancel).
    DatasetFinished(Box<DatasetResult>),
}

/// The UI's handle on the worker thread. Dropping it cancels work and stops the thread.
pub struct Worker {
    commands: Option<Sender<Command>>,
    events: Receiver<Event>,
    cancel: Arc<AtomicBool>,
    busy: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts the worker; `wake` is called after each event (the UI's `request_repaint`).
    pub fn spawn(wake: impl Fn() + Send + 'static) -> Self {
        let (command_tx, command_rx) = bounded::<Command>(COMMAND_CAPACITY);
        let (event_tx, event_rx) = bounded::<Event>(EVENT_CAPACITY);
        let cancel = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicBool::new(false));
        let (c, b) = (cancel.clone(), busy.clone());
        let thread = std::thread::Builder::new()
            .name("patch-worker".into())
            .spawn(move || {
                let mut state = WorkerState {
                    model: None,
                    events: event_tx,
                    wake: Box::new(wake),
                    cancel: c,
                };
                for command in command_rx {
                    b.store(true, Ordering::SeqCst);
                    state.cancel.store(false, Ordering::SeqCst);
                    let alive = state.handle(command);
                    b.store(false, Ordering::SeqCst);
                    (state.wake)();
                    if !alive {
                        break;
                    }
                }
            })
            .ok();
        Self {
            commands: Some(command_tx),
            events: event_rx,
            cancel,
            busy,
            thread,
        }
    }

    /// Queues a command. A new sweep cancels a running one first. Returns false if the worker is gone.
    pub fn send(&self, command: Command) -> bool {
        if matches!(command, Command::RunSweep { .. }) {
            self.cancel();
        }
        match &self.commands {
            Some(tx) => match tx.try_send(command) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => false,
            },
            None => false,
        }
    }

    /// Asks the running sweep to stop after its current batch; finished cells are kept.
    pub fn cancel(&self) {
        if self.busy.load(Ordering::SeqCst) {
            self.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// Whether a command is being processed.
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }

    /// Events that arrived since the last call.
    pub fn drain(&self) -> Vec<Event> {
        self.events.try_iter().collect()
    }

    /// Whether the worker thread is still running.
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.commands = None; // closes the channel: the thread leaves its loop after the current command
        if let Some(thread) = self.thread.take() {
            let deadline = Instant::now() + SHUTDOWN_WAIT;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
            // Otherwise it is mid-download or mid-batch; the process exit ends it.
        }
    }
}

struct WorkerState {
    model: Option<Model>,
    events: Sender<Event>,
    wake: Box<dyn Fn() + Send>,
    cancel: Arc<AtomicBool>,
}

impl WorkerState {
    /// Sends an event; false when the UI is gone.
    fn emit(&self, event: Event) -> bool {
        let ok = self.events.send(event).is_ok();
        (self.wake)();
        ok
    }

    /// Handles one command; false when the UI has gone away.
    fn handle(&mut self, command: Command) -> bool {
        match command {
            Command::LoadModel { source, device, dtype } => {
                let events = self.events.clone();
                let wake = &self.wake;
                let mut last = Instant::now();
                let loaded = Model::load(&source, device, dtype, &mut |p| {
                    // Throttle download progress to ~20 updates a second.
                    let is_stage = matches!(p, LoadProgress::Stage(_));
                    if is_stage || last.elapsed() >= Duration::from_millis(50) {
                        last = Instant::now();
                        let _ = events.try_send(Event::Loading(p));
                        wake();
                    }
                });
                match loaded {
                    Ok(model) => {
                        let info = ModelInfo {
                            source: model.source.clone(),
                            config: model.config.clone(),
                            dtype: model.dtype(),
                            device: model.device_kind(),
                            load_seconds: model.load_seconds,
                            tokenizer: Arc::new(model.tokenizer.clone()),
                        };
                        // Dropping the previous model frees its weights; hand them back now.
                        self.model = Some(model);
                        crate::release_free_memory();
                        self.emit(Event::ModelLoaded(info))
                    }
                    Err(e) => self.emit(Event::ModelFailed(e.to_string())),
                }
            }
            Command::RunSweep { request, options } => {
                let Some(model) = &self.model else {
                    return self.emit(Event::SweepFailed("no model is loaded yet".into()));
                };
                let sweep = match Sweep::prepare(model, &request, options.top_k) {
                    Ok(s) => s,
                    Err(e) => return self.emit(Event::SweepFailed(e.to_string())),
                };
                let started = Event::SweepStarted(Box::new(sweep.result().clone()), sweep.progress(&options));
                if !self.emit(started) {
                    return false;
                }
                let events = &self.events;
                let wake = &self.wake;
                let cancel = self.cancel.clone();
                let outcome = sweep.run_observed(&options, &cancel, &mut |event| {
                    let event = match event {
                        SweepEvent::Cell(cell) => Event::Cell(cell.clone()),
                        SweepEvent::Work(work) => Event::Work(work),
                        SweepEvent::Estimated(a) => Event::Estimated(Box::new(a.clone())),
                        SweepEvent::Planned { work, .. } => Event::Planned(work),
                    };
                    if events.send(event).is_err() {
                        cancel.store(true, Ordering::SeqCst); // the UI is gone
                    }
                    wake();
                });
                match outcome {
                    Ok(result) => self.emit(Event::SweepFinished(Box::new(result))),
                    Err(e) => self.emit(Event::SweepFailed(e.to_string())),
                }
            }
            Command::RunDataset { request, options } => {
                let Some(model) = &self.model else {
                    return self.emit(Event::SweepFailed("no model is loaded yet".into()));
                };
                let events = &self.events;
                let wake = &self.wake;
                let cancel = self.cancel.clone();
                let outcome = crate::dataset::run::run(model, &request, &options, &cancel, &mut |event| {
                    let event = match event {
                        DatasetEvent::PairStarted { index, result } => {
                            Event::PairStarted(index, Box::new(result.clone()))
                        }
                        DatasetEvent::Cell { index, cell } => Event::PairCell(index, cell.clone()),
                        DatasetEvent::Work(w) => Event::Work(w),
                        DatasetEvent::PairFinished { index, result } => {
                            Event::PairFinished(index, Box::new(result.clone()))
                        }
                        DatasetEvent::PairFailed { index, error } => Event::PairFailed(index, error.to_owned()),
                    };
                    if events.send(event).is_err() {
                        cancel.store(true, Ordering::SeqCst); // the UI is gone
                    }
                    wake();
                });
                match outcome {
                    Ok(result) => self.emit(Event::DatasetFinished(Box::new(result))),
                    Err(e) => self.emit(Event::SweepFailed(e.to_string())),
                }
            }
            Command::HeadPatterns(request) => {
                let outcome = match &self.model {
                    Some(model) => head_patterns(model, &request).map(Box::new).map_err(|e| e.to_string()),
                    None => Err("no model is loaded".into()),
                };
                self.emit(Event::HeadPatterns(Box::new(request), outcome))
            }
        }
    }
}

/// Where the demo model lives when `scripts/fetch-test-model.sh` fetched it (PATCHBAY_CACHE or .cache/).
pub fn demo_model_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PATCHBAY_DEMO_MODEL")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
    {
        return Some(p);
    }
    let cache = std::env::var_os("PATCHBAY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".cache"));
    let p = cache.join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf");
    p.is_file().then_some(p)
}
