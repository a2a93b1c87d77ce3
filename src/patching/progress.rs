//! A running sweep's progress by the work done, and what a sweep reports as it goes.

use std::collections::VecDeque;

use super::result::Cell;
use crate::error::Result;

/// What [`Sweep::run_observed`] reports as a sweep goes.
#[derive(Debug)]
pub enum SweepEvent<'a> {
    /// A cell is done.
    Cell(&'a Cell),
    /// More work is done, in the units of [`Sweep::progress`] (token-layers); negative when a
    /// block that failed and will be retried takes back what it had reported.
    Work(f64),
    /// Every cell's attribution-patching estimate, before any exact cell.
    Estimated(&'a crate::patching::estimate::Attribution),
    /// After the estimate chose the exact cells: how many cells the sweep reports in all (the
    /// no-op cells included) and the work they are (the sweep's new total).
    Planned { cells: usize, work: f64 },
}

/// How far a running sweep has got by the work done rather than the cells, and when it should end:
/// the fast schedule sends the no-op cells and the late layers' short cones first and then runs
/// the early layers' long ones in a few large blocks, so counting cells promises an end far too
/// early, and the cells of a large block arrive together at its end. Made by [`Sweep::progress`]
/// and fed [`SweepEvent::Work`], which comes layer by layer within a block.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    total: f64,
    done: f64,
    /// (seconds since the start, work done by then) over the last [`PROGRESS_RATE_WINDOW`] seconds
    /// and one sample before them: the ETA's rate is the recent one, as blocks differ in
    /// efficiency.
    samples: VecDeque<(f64, f64)>,
}

/// Seconds of recent progress the ETA's rate is measured over.
pub const PROGRESS_RATE_WINDOW: f64 = 5.0;

impl Progress {
    /// Progress towards `total` work (any unit), none done yet, at 0 seconds.
    pub fn new(total: f64) -> Self {
        Self {
            total,
            done: 0.0,
            samples: VecDeque::from([(0.0, 0.0)]),
        }
    }

    /// Counts `work` more done, `elapsed` seconds after the start.
    pub fn work_done(&mut self, work: f64, elapsed: f64) {
        self.done += work;
        self.samples.push_back((elapsed, self.done));
        while self.samples.len() > 2 && self.samples[1].0 <= elapsed - PROGRESS_RATE_WINDOW {
            self.samples.pop_front();
        }
    }

    /// Sets the work there is to do (after an estimate chose which cells are computed).
    pub fn set_total(&mut self, total: f64) {
        self.total = total;
    }

    /// The work there is to do.
    pub fn total(&self) -> f64 {
        self.total
    }

    /// The work done so far.
    pub fn done(&self) -> f64 {
        self.done
    }

    /// The share of the work done, 0 to 1 (1 when there is nothing to compute).
    pub fn fraction(&self) -> f64 {
        if self.total > 0.0 {
            (self.done / self.total).min(1.0)
        } else {
            1.0
        }
    }

    /// Seconds left at `elapsed` seconds after the start, at the rate of the last few seconds up
    /// to now (so a stall lengthens it); `None` before any work is done.
    pub fn eta(&self, elapsed: f64) -> Option<f64> {
        let &(since, done_then) = self.samples.front()?;
        let rate = (self.done - done_then) / (elapsed - since);
        let eta = (self.total - self.done).max(0.0) / rate;
        (rate > 0.0 && eta.is_finite()).then_some(eta)
    }
}

/// Runs `attempt`, passing the rows it reports layer by layer on as work; if it fails, takes that
/// work back, as a block that ran out of memory is retried in halves that report it again.
pub(crate) fn reporting_attempt<T>(
    observe: &mut dyn FnMut(SweepEvent<'_>),
    attempt: impl FnOnce(&mut dyn FnMut(usize)) -> Result<T>,
) -> Result<T> {
    let mut reported = 0;
    let out = attempt(&mut |rows| {
        reported += rows;
        observe(SweepEvent::Work(rows as f64));
    });
    if out.is_err() && reported > 0 {
        observe(SweepEvent::Work(-(reported as f64)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn a_failed_attempt_takes_back_the_work_it_reported() {
        let mut work = Vec::new();
        let mut observe = |e: SweepEvent<'_>| {
            if let SweepEvent::Work(w) = e {
                work.push(w);
            }
        };
        let failed: Result<()> = reporting_attempt(&mut observe, |on_layer| {
            on_layer(30);
            on_layer(50);
            Err(Error::Input("out of memory".into()))
        });
        assert!(failed.is_err());
        let done: Result<u8> = reporting_attempt(&mut observe, |on_layer| {
            on_layer(40);
            Ok(7)
        });
        assert_eq!(done.unwrap(), 7);
        assert_eq!(work, [30.0, 50.0, -80.0, 40.0]);
    }

    #[test]
    fn progress_follows_the_work_and_its_recent_rate() {
        let mut p = Progress::new(100.0);
        assert_eq!((p.fraction(), p.eta(1.0)), (0.0, None));
        // 10 units a second for 3 s: 70 left, 7 s at that rate.
        for t in 1..=3 {
            p.work_done(10.0, t as f64);
        }
        assert!((p.fraction() - 0.3).abs() < 1e-12);
        assert!((p.eta(3.0).unwrap() - 7.0).abs() < 1e-9);
        // Then 40 units a second: after more than the window, only the recent rate counts.
        for t in 4..=9 {
            p.work_done(if t < 5 { 40.0 } else { 0.0 }, t as f64);
        }
        assert_eq!(p.done(), 70.0);
        // Nothing in the last five seconds (t = 5..9): no rate to go by.
        assert_eq!(p.eta(10.0), None);
        p.work_done(20.0, 10.0);
        // 20 units in the last 5 s (the sample at t = 5 is the window's start): 4/s, 10 left.
        assert!((p.eta(10.0).unwrap() - 2.5).abs() < 1e-9, "{:?}", p.eta(10.0));
        // A stall lengthens it: the same work over a longer time.
        assert!(p.eta(12.0).unwrap() > 2.5);
        p.work_done(15.0, 12.0);
        assert_eq!((p.fraction(), p.eta(12.0)), (1.0, Some(0.0)));
        assert_eq!(Progress::new(0.0).fraction(), 1.0);
    }
}
