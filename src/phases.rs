//! Where a training step's time goes, phase by phase, measured inside the step: for
//! benchmarks, where a kernel timed on its own (warm caches, nothing beside it) can take half
//! the time it takes in a step. Off unless switched on; process-wide (every model's steps add
//! to the same totals); read and reset together.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// The parts of a training step, in the order they run. The first layer's forward pass
/// includes indexing the batch's nonzeros; its update is its weight gradient fused with Adam.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The whole step, gathering the batch included; the phases below are parts of it.
    Step,
    Gather,
    Noise,
    FirstForward,
    LatentForward,
    DecoderForward,
    Loss,
    DecoderBackward,
    LatentBackward,
    EncoderBackward,
    Check,
    FirstUpdate,
    Update,
}

impl Phase {
    pub const ALL: [Phase; 13] = [
        Phase::Step,
        Phase::Gather,
        Phase::Noise,
        Phase::FirstForward,
        Phase::LatentForward,
        Phase::DecoderForward,
        Phase::Loss,
        Phase::DecoderBackward,
        Phase::LatentBackward,
        Phase::EncoderBackward,
        Phase::Check,
        Phase::FirstUpdate,
        Phase::Update,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Step => "step",
            Phase::Gather => "gather",
            Phase::Noise => "noise",
            Phase::FirstForward => "first_forward",
            Phase::LatentForward => "latent_forward",
            Phase::DecoderForward => "decoder_forward",
            Phase::Loss => "loss",
            Phase::DecoderBackward => "decoder_backward",
            Phase::LatentBackward => "latent_backward",
            Phase::EncoderBackward => "encoder_backward",
            Phase::Check => "check",
            Phase::FirstUpdate => "first_update",
            Phase::Update => "update",
        }
    }
}

static ON: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; Phase::ALL.len()] = [const { AtomicU64::new(0) }; Phase::ALL.len()];
static STEPS: AtomicU64 = AtomicU64::new(0);

/// Switch the timers on or off (off by default: then a timer costs one relaxed load).
pub fn set_enabled(on: bool) {
    ON.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// Times one phase from its start; `stop` adds the time to the phase's total.
#[must_use]
pub struct Timer(Option<Instant>);

impl Timer {
    pub fn start() -> Self {
        Timer(enabled().then(Instant::now))
    }

    pub fn stop(self, phase: Phase) {
        if let Some(t0) = self.0 {
            let nanos = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            NANOS[phase as usize].fetch_add(nanos, Ordering::Relaxed);
            if phase == Phase::Step {
                STEPS.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The steps timed, and each phase's total seconds, since the last call; resets both.
pub fn take() -> (u64, Vec<(&'static str, f64)>) {
    let steps = STEPS.swap(0, Ordering::Relaxed);
    let totals = Phase::ALL
        .iter()
        .map(|&p| {
            let nanos = NANOS[p as usize].swap(0, Ordering::Relaxed);
            (p.name(), nanos as f64 * 1e-9)
        })
        .collect();
    (steps, totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_count_only_while_on() {
        // Process-wide state, and other tests train beside this one: only what they cannot
        // disturb is checked (they never switch the timers on; they may add steps while on).
        set_enabled(false);
        take();
        Timer::start().stop(Phase::Step);
        let (steps, totals) = take();
        assert_eq!(steps, 0);
        assert!(totals.iter().all(|&(_, s)| s == 0.0));
        set_enabled(true);
        let t = Timer::start();
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.stop(Phase::Loss);
        Timer::start().stop(Phase::Step);
        set_enabled(false);
        let (steps, totals) = take();
        assert!(steps >= 1);
        let names: Vec<_> = totals.iter().map(|(n, _)| *n).collect();
        let all: Vec<_> = Phase::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(names, all);
        let loss = totals.iter().find(|(n, _)| *n == "loss").unwrap().1;
        assert!(loss >= 0.002, "{loss}");
    }
}
