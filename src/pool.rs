//! Thread pools: each model's own, and one shared by work that has no model (checking a data
//! set's values); flush-to-zero in their threads; keeping workers awake during a step; the
//! choice, by measurement, between a model's full pool and a one-thread pool when other
//! processes take the cores; and surviving `fork`.
//!
//! A forked child has the parent's memory but only the forking thread, so a rayon pool made
//! before the fork has no workers in the child and the first job sent to it would wait
//! forever. `Pool` remembers the process that built it and builds a fresh pool on first use in
//! any other process (the old one is forgotten, not dropped: its threads and locks are the
//! parent's). fastvae never uses rayon's global pool, which cannot be rebuilt.

use crate::config::MAX_THREADS;
use crate::error::{Result, VaeError};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// A rayon pool of a fixed number of threads, rebuilt after a fork.
pub struct Pool {
    threads: usize,
    /// The pool and the id of the process it was built in.
    inner: Mutex<(u32, Arc<rayon::ThreadPool>)>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads)
            .finish()
    }
}

impl Pool {
    /// A pool of `threads` workers (1 to MAX_THREADS).
    pub fn new(threads: usize) -> Result<Self> {
        let pool = build(threads)?;
        Ok(Pool {
            threads,
            inner: Mutex::new((std::process::id(), Arc::new(pool))),
        })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The pool for this process: the one built here, or a new one after a fork.
    pub fn get(&self) -> Result<Arc<rayon::ThreadPool>> {
        // A poisoned lock only means a panic elsewhere while it was held; the pair is whole.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let pid = std::process::id();
        if inner.0 != pid {
            let fresh = Arc::new(build(self.threads)?);
            // The parent's pool: its workers do not exist here, so dropping it (which signals
            // them and may wait on their locks) is not safe. Its memory is the parent's copy.
            std::mem::forget(std::mem::replace(&mut inner.1, fresh));
            inner.0 = pid;
        }
        Ok(inner.1.clone())
    }

    /// Run `f` on this process's pool.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        Ok(self.get()?.install(f))
    }
}

/// Which of a model's two pools a slice of training runs on: the full one, or one thread.
///
/// On an idle machine the full pool is fastest. When another process keeps a core busy, the
/// full pool's workers are descheduled in turn and each waits for the other at every split:
/// training on two threads fell to about half its one-thread speed. So the choice is measured:
/// each pool's seconds per row are kept (over its recent slices, weighted by their rows, so
/// that a fit's first small slices, slowed by warming up, count little), training
/// runs on the faster, and the other is tried for one slice now and then (sooner when the
/// current one slows down) to notice when the load comes or goes. Results do not depend on the
/// choice: every split that changes how sums round follows the model's thread count
/// (`Workspace::parts`), not the running pool's.
#[derive(Debug, Clone)]
pub struct PoolChoice {
    /// Seconds and rows of each pool's slices, [full, solo], halved at each new slice of the
    /// pool: their ratio is its recent seconds per row, weighted by rows; rows 0 until measured.
    spent: [(f64, f64); 2],
    /// The pool training runs on between trials (0 full, 1 solo).
    current: usize,
    /// When the other pool is next tried, and the gap after that (doubled while trials
    /// confirm the choice, up to MAX_TRIAL_GAP).
    next_trial: std::time::Instant,
    gap: std::time::Duration,
    /// A pool forced by the caller (tests, measurements), or None to choose.
    pub forced: Option<usize>,
}

/// The first trial's delay: soon, so that a short fit on a loaded machine does not spend its
/// first second on a full pool that waits for a busy core (a 2-epoch fit with one core busy
/// ran at 0.65-0.7x the one-thread speed; a trial costs one slice, about 0.1 s, once).
const FIRST_TRIAL: std::time::Duration = std::time::Duration::from_millis(250);
/// The shortest gap between trials.
const MIN_TRIAL_GAP: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest gap: a trial of the slower pool costs a slice at its speed, so on an idle
/// machine the trials cost well under 1% of the time at this gap.
const MAX_TRIAL_GAP: std::time::Duration = std::time::Duration::from_secs(16);
/// A slice this much slower than its pool's average brings the next trial forward.
const SLOWDOWN: f64 = 1.3;

impl PoolChoice {
    /// Choosing by measurement, or held to `forced`.
    pub fn new(forced: Option<usize>) -> Self {
        PoolChoice {
            spent: [(0.0, 0.0); 2],
            current: 0,
            next_trial: std::time::Instant::now() + FIRST_TRIAL,
            gap: MIN_TRIAL_GAP,
            forced,
        }
    }

    /// Pool `which`'s recent seconds per row, once measured.
    fn per_row(&self, which: usize) -> Option<f64> {
        let (s, r) = self.spent[which];
        (r > 0.0).then(|| s / r)
    }

    /// The pool for the next slice: 0 full, 1 solo.
    pub fn pick(&self) -> usize {
        self.pick_at(std::time::Instant::now())
    }

    fn pick_at(&self, now: std::time::Instant) -> usize {
        if let Some(f) = self.forced {
            return f;
        }
        if now >= self.next_trial {
            1 - self.current
        } else {
            self.current
        }
    }

    /// A slice of `rows` rows took `seconds` on pool `which`.
    pub fn record(&mut self, which: usize, seconds: f64, rows: usize) {
        self.record_at(std::time::Instant::now(), which, seconds, rows)
    }

    fn record_at(&mut self, now: std::time::Instant, which: usize, seconds: f64, rows: usize) {
        if rows == 0 || self.forced.is_some() {
            return;
        }
        let sample = seconds / rows as f64;
        let slowed = self.per_row(which).is_some_and(|a| sample > SLOWDOWN * a);
        let (s, r) = &mut self.spent[which];
        (*s, *r) = (0.5 * *s + seconds, 0.5 * *r + rows as f64);
        if which != self.current {
            // A trial: switch if the other pool is faster (by a margin, so noise does not
            // flip it), and try again sooner after a switch, later after a confirmation.
            let (here, there) = (self.per_row(self.current), self.per_row(which));
            let switch = match (here, there) {
                (Some(h), Some(t)) => t < 0.95 * h,
                _ => false,
            };
            if switch {
                self.current = which;
                self.gap = MIN_TRIAL_GAP;
            } else {
                self.gap = (self.gap * 2).min(MAX_TRIAL_GAP);
            }
            self.next_trial = now + self.gap;
        } else if slowed {
            // The load may have changed: the other pool's average is stale, try it soon.
            self.gap = MIN_TRIAL_GAP;
            self.next_trial = self.next_trial.min(now + MIN_TRIAL_GAP);
        }
    }
}

/// The pool for work without a model (checking and converting a data set), one thread per core.
pub fn shared() -> &'static Pool {
    static SHARED: OnceLock<Pool> = OnceLock::new();
    SHARED.get_or_init(|| {
        let threads = default_threads().min(MAX_THREADS);
        Pool::new(threads).expect("a pool of one thread per core can always start")
    })
}

/// The number of logical cores, the default thread count.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Build a pool of `threads` workers that flush subnormal floats to zero: subnormals appear as
/// weights and gradients shrink and slow every kernel by about a fifth; flushing them changes
/// results only below float rounding of any value that matters.
pub fn build(threads: usize) -> Result<rayon::ThreadPool> {
    if threads == 0 || threads > MAX_THREADS {
        return Err(VaeError::Config(format!(
            "threads must be between 1 and {MAX_THREADS}, got {threads}"
        )));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("fastvae-{i}"))
        .start_handler(|_| flush_denormals())
        .build()
        .map_err(|e| VaeError::Config(format!("cannot start {threads} threads: {e}")))
}

/// Run `f` on the current pool while its other workers poll for work instead of sleeping.
///
/// A step alternates short parallel regions with short serial stretches; a worker that fell
/// asleep in a serial stretch takes 30-80 us to wake for the next region (measured here), more
/// than many regions last. So for the duration of `f` each other worker runs a job that keeps
/// taking pending work with `rayon::yield_now` until `f` is done. A poller that starts on `f`'s
/// own thread (it can be popped there while `f` waits on a stolen job) returns at once, so
/// nothing ever waits on itself.
pub fn keep_awake<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let done = AtomicBool::new(false);
    let owner = rayon::current_thread_index();
    rayon::scope(|s| {
        for _ in 1..rayon::current_num_threads() {
            s.spawn(|_| {
                if rayon::current_thread_index() == owner {
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    if !matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        // Set when f returns or unwinds: the scope waits for the pollers, so a panic in f
        // (reported to Python as an exception) would otherwise leave them, and it, spinning.
        let _stop = SetOnDrop(&done);
        f()
    })
}

/// Sets its flag when dropped, unwinding included.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

#[cfg(all(target_arch = "x86_64", not(miri)))]
fn flush_denormals() {
    // MXCSR bit 15 flush-to-zero, bit 6 denormals-are-zero.
    // SAFETY: stmxcsr and ldmxcsr only read and write the MXCSR register and the 4-byte local
    // they are given; the bits set change how this thread rounds subnormals, nothing else.
    unsafe {
        let mut csr: u32 = 0;
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack));
        csr |= (1 << 15) | (1 << 6);
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, readonly));
    }
}

#[cfg(any(not(target_arch = "x86_64"), miri))]
fn flush_denormals() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "threads and a timeout")]
    fn a_panic_under_keep_awake_reaches_the_caller() {
        // The panic in a parallel region of f, on either thread, comes back to the caller
        // instead of leaving the pollers (and the caller) spinning.
        let pool = Pool::new(2).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.install(|| {
                    keep_awake(|| {
                        rayon::join(
                            || std::thread::sleep(std::time::Duration::from_millis(20)),
                            || panic!("a kernel's panic"),
                        )
                    })
                })
            }));
            tx.send(outcome.is_err()).unwrap();
        });
        let panicked = rx.recv_timeout(std::time::Duration::from_secs(30));
        assert_eq!(panicked, Ok(true), "keep_awake hung or swallowed the panic");
    }

    #[test]
    fn rejects_bad_thread_counts() {
        assert!(Pool::new(0).is_err());
        assert!(Pool::new(MAX_THREADS + 1).is_err());
        let pool = Pool::new(2).unwrap();
        assert_eq!(pool.install(rayon::current_num_threads).unwrap(), 2);
    }

    #[test]
    fn choice_follows_the_faster_pool() {
        use std::time::{Duration, Instant};
        let mut c = PoolChoice::new(None);
        let mut now = Instant::now();
        // Simulated slices of 1000 rows, every 0.1 s: full takes `full` s per row, solo `solo`.
        let mut run = |c: &mut PoolChoice, full: f64, solo: f64, seconds: u64| -> [usize; 2] {
            let mut used = [0, 0];
            for _ in 0..seconds * 10 {
                let which = c.pick_at(now);
                used[which] += 1;
                let per_row = if which == 0 { full } else { solo };
                c.record_at(now, which, per_row * 1000.0, 1000);
                now += Duration::from_millis(100);
            }
            used
        };
        // Idle: the full pool is faster; solo is tried rarely (gaps grow to 16 s).
        let used = run(&mut c, 1.0, 1.6, 120);
        assert_eq!(c.current, 0);
        assert!(used[1] <= 12, "{used:?}");
        // Another process takes a core: the full pool slows past solo, which takes over.
        let used = run(&mut c, 2.8, 1.7, 20);
        assert_eq!(c.current, 1, "{used:?}");
        assert!(used[0] <= 40, "switched late: {used:?}");
        // The load ends: the full pool is tried again and wins back within the longest gap.
        let used = run(&mut c, 1.0, 1.6, 40);
        assert_eq!(c.current, 0, "{used:?}");
        // A new choice tries solo within its first 0.3 s, and a first small slice slowed by
        // warming up (30 times slower per row, as the first slice of a fit measured) does not
        // make it look faster.
        let mut c = PoolChoice::new(None);
        let start = Instant::now();
        c.record_at(start, 0, 30.0 * 128.0, 128);
        let mut t = start;
        let mut tried = None;
        for k in 0..10u32 {
            t += Duration::from_millis(50);
            let which = c.pick_at(t);
            if which == 1 {
                tried.get_or_insert(t - start);
            }
            let rows = 256 << k.min(5);
            let per_row = if which == 0 { 1.0 } else { 1.6 };
            c.record_at(t, which, per_row * rows as f64, rows);
        }
        let tried = tried.expect("solo was tried");
        assert!(
            tried <= Duration::from_millis(300),
            "first trial after {tried:?}"
        );
        assert_eq!(c.current, 0);
        // Forced: no choosing.
        let mut f = PoolChoice::new(Some(1));
        assert_eq!(run(&mut f, 1.0, 9.0, 5), [0, 50]);
    }

    #[cfg(all(unix, not(miri)))]
    #[test]
    fn works_in_a_forked_child() {
        // Used before the fork, then in the child: the child's first install builds a new pool
        // instead of waiting on workers that do not exist there.
        let pool = Pool::new(2).unwrap();
        let sum = |pool: &Pool| {
            use rayon::prelude::*;
            pool.install(|| (0..1000u64).into_par_iter().sum::<u64>())
                .unwrap()
        };
        assert_eq!(sum(&pool), 499_500);
        // SAFETY: fork itself has no preconditions; the child only runs the pool (glibc's
        // malloc is fork-safe) and then leaves with _exit, touching nothing else the other
        // test threads might have held.
        let child = unsafe { libc_fork() };
        if child == 0 {
            let ok = sum(&pool) == 499_500;
            // SAFETY: ends the child at once, without running the parent's exit handlers.
            unsafe { libc_exit(if ok { 0 } else { 1 }) };
        }
        assert!(child > 0, "fork failed");
        // Wait up to a minute, so a child that hangs fails the test instead of hanging it.
        let mut status = 0i32;
        for _ in 0..600 {
            // SAFETY: polls (WNOHANG) the child just forked, writing its status into a local.
            let waited = unsafe { libc_waitpid(child, &mut status, 1) };
            if waited == child {
                assert_eq!(status, 0, "the child's pool did not work (status {status})");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        // SAFETY: kills the child this test forked.
        unsafe { libc_kill(child, 9) };
        panic!("the forked child did not finish within a minute: its pool hangs");
    }

    #[cfg(all(unix, not(miri)))]
    extern "C" {
        #[link_name = "fork"]
        fn libc_fork() -> i32;
        #[link_name = "_exit"]
        fn libc_exit(code: i32) -> !;
        #[link_name = "waitpid"]
        fn libc_waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
        #[link_name = "kill"]
        fn libc_kill(pid: i32, signal: i32) -> i32;
    }
}
