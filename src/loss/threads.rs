//! The worker threads of the fused CPU kernels.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

/// Rows are processed in parallel only when there is enough work to pay for
/// the hand-off: to rayon's pool, which sleeps between calls,
const PARALLEL_ELEMENTS: usize = 1 << 16;
/// or to the helper thread while it polls ([`Hot`]).
const SHARED_ELEMENTS: usize = 1 << 13;

thread_local! {
    /// The thread count saved by this thread's [`TorchInline`], if any.
    static OWN_THREADS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Threads for the crate's own parallel work (std threads over disjoint
/// rows): libtorch's intra-op count, as `torch.set_num_threads` sets it,
/// also while a [`TorchInline`] guard has set libtorch's to 1.
pub(crate) fn count() -> usize {
    OWN_THREADS
        .with(|c| c.get())
        .unwrap_or_else(|| tch::get_num_threads().max(1) as usize)
}

/// While alive, libtorch's ops run on the calling thread alone; work
/// shared out by [`count`] (the evaluation's std threads) keeps libtorch's
/// former count, while the fused loss's pool and helper thread, which read
/// libtorch's count, would run on one (no loss runs inside a guard). For loops
/// that alternate small libtorch ops with work on the crate's threads:
/// after each parallel libtorch op its OpenMP workers spin-wait for
/// milliseconds (the default policy), competing with the crate's threads
/// for the cores. Measured on 2 cores: k-means of SOP's size took 22.6 s
/// with the workers spinning and 18.4 s with `OMP_WAIT_POLICY=passive`.
/// libtorch's count is the calling thread's for its OpenMP ops but
/// process-wide for MKL's: matrix products that other threads run through
/// MKL meanwhile run on one thread too.
pub(crate) struct TorchInline {
    saved: Option<usize>,
}

impl TorchInline {
    pub(crate) fn begin() -> Self {
        let threads = count();
        let saved = OWN_THREADS.with(|c| c.replace(Some(threads)));
        if tch::get_num_threads() > 1 {
            tch::set_num_threads(1);
        }
        TorchInline { saved }
    }
}

impl Drop for TorchInline {
    fn drop(&mut self) {
        let threads = OWN_THREADS.with(|c| c.replace(self.saved));
        if self.saved.is_none() {
            if let Some(t) = threads.filter(|&t| t > 1) {
                tch::set_num_threads(t as i32);
            }
        }
    }
}

/// The pool shared by the fused kernels, rebuilt when libtorch's thread
/// count changes.
pub(crate) fn pool() -> Arc<rayon::ThreadPool> {
    static POOL: Mutex<Option<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(None);
    // The same thread count as libtorch, so `torch.set_num_threads` governs both.
    let threads = tch::get_num_threads().max(1) as usize;
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((n, p)) = guard.as_ref() {
        if *n == threads {
            return p.clone();
        }
    }
    let p = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("grouploss-{i}"))
            .build()
            .unwrap_or_else(|_| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .expect("a one-thread pool can always be built")
            }),
    );
    *guard = Some((threads, p.clone()));
    p
}

/// `f` over `0..n`, in parallel when `work` (elements touched) pays for it.
pub(crate) fn par_rows<R: Send>(
    n: usize,
    work: usize,
    f: impl Fn(usize) -> R + Sync + Send,
) -> Vec<R> {
    if work >= SHARED_ELEMENTS && sharing() {
        let mut out: Vec<Option<R>> = (0..n).map(|_| None).collect();
        let slots = Slots(out.as_mut_ptr());
        share(n, &|i| {
            // SAFETY: `share` visits each index once; `out` outlives it.
            unsafe { *slots.at(i) = Some(f(i)) }
        });
        return out
            .into_iter()
            .map(|r| r.expect("every row was visited"))
            .collect();
    }
    if work >= PARALLEL_ELEMENTS && tch::get_num_threads() > 1 {
        pool().install(|| (0..n).into_par_iter().map(f).collect())
    } else {
        (0..n).map(f).collect()
    }
}

/// The result slots of [`par_rows`], each written by one task.
struct Slots<R>(*mut Option<R>);

// SAFETY: each slot is written by one task only.
unsafe impl<R: Send> Send for Slots<R> {}
unsafe impl<R: Send> Sync for Slots<R> {}

impl<R> Slots<R> {
    /// SAFETY: `i` in range and written by this task only.
    unsafe fn at(&self, i: usize) -> *mut Option<R> {
        self.0.add(i)
    }
}

/// A second thread that spins while a loss call is under way, so that work
/// of tens of microseconds can be shared with it.
///
/// Handing work to a sleeping thread (rayon's `install`, or libtorch's
/// OpenMP team once idle) costs a wake-up per hand-off, tens of
/// microseconds on a virtual machine: more than the products of a CUB batch
/// take. Instead the helper is woken once when a call begins ([`Hot`]) and
/// polls a single job slot until the call ends. The caller always works on
/// the job too and takes it back if the helper has not picked it up, so a
/// busy or late helper costs nothing but the wake-up.
///
/// That one wake-up still costs the caller about 15 us of system call on
/// this kind of VM, and the helper arrives some 40 us into the call. So
/// when calls come back to back (less than [`helper::BACK_TO_BACK`] apart,
/// as when a head is trained on cached embeddings), the helper keeps
/// polling for one and a half gaps after a call, yielding its CPU to any
/// other runnable thread meanwhile, as OpenMP runtimes spin after a
/// parallel region. Calls further apart let it sleep at once.
mod helper {
    use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
    use std::sync::{Condvar, Mutex, OnceLock};
    use std::time::{Duration, Instant};

    /// Calls whose starts are closer than this keep the helper polling
    /// between them.
    pub(super) const BACK_TO_BACK: Duration = Duration::from_millis(2);

    const EMPTY: u32 = 0;
    const FILLING: u32 = 1;
    const POSTED: u32 = 2;
    const CLAIMED: u32 = 3;
    const DONE: u32 = 4;

    /// A job: indices `0..n` taken one by one by whoever is free.
    pub(super) struct Job<'a> {
        pub f: &'a (dyn Fn(usize) + Sync),
        pub n: usize,
        pub next: AtomicUsize,
        pub panicked: std::sync::atomic::AtomicBool,
    }

    impl Job<'_> {
        pub fn work(&self) {
            loop {
                let i = self.next.fetch_add(1, Ordering::Relaxed);
                if i >= self.n {
                    return;
                }
                (self.f)(i);
            }
        }
    }

    pub(super) struct Helper {
        pub hot: AtomicUsize,
        /// Whether the helper polls (in a call or lingering after one): a
        /// call that finds it so needs no wake-up.
        pub awake: AtomicBool,
        /// When the last call began, in ns since `epoch` (0: none yet).
        pub last_begin: AtomicU64,
        /// How long to keep polling after a call, in ns.
        pub linger: AtomicU64,
        pub epoch: Instant,
        pub state: AtomicU32,
        pub job: AtomicPtr<Job<'static>>,
        pub sleep: Mutex<()>,
        pub wake: Condvar,
        /// The process that started the helper: a child forked from it
        /// (a data-loader worker) has no helper thread.
        pub pid: u32,
    }

    static HELPER: OnceLock<Option<&'static Helper>> = OnceLock::new();

    /// The helper, started on first use (none in a forked child).
    pub(super) fn get() -> Option<&'static Helper> {
        let h = *HELPER.get_or_init(|| {
            let h: &'static Helper = Box::leak(Box::new(Helper {
                hot: AtomicUsize::new(0),
                awake: AtomicBool::new(false),
                last_begin: AtomicU64::new(0),
                linger: AtomicU64::new(0),
                epoch: Instant::now(),
                state: AtomicU32::new(EMPTY),
                job: AtomicPtr::new(std::ptr::null_mut()),
                sleep: Mutex::new(()),
                wake: Condvar::new(),
                pid: std::process::id(),
            }));
            std::thread::Builder::new()
                .name("grouploss-helper".into())
                .spawn(move || serve(h))
                .ok()
                .map(|_| h)
        });
        h.filter(|h| h.pid == std::process::id())
    }

    /// The helper if it is started and polling.
    pub(super) fn polling() -> Option<&'static Helper> {
        HELPER
            .get()
            .copied()
            .flatten()
            .filter(|h| h.pid == std::process::id() && h.hot.load(Ordering::Acquire) > 0)
    }

    /// How long the helper keeps polling after a call that began `gap` after
    /// the one before it (None: the first call): one and a half gaps when
    /// calls come back to back, else not at all.
    pub(super) fn linger_after(gap: Option<Duration>) -> Duration {
        match gap {
            Some(g) if g < BACK_TO_BACK => g + g / 2,
            _ => Duration::ZERO,
        }
    }

    impl Helper {
        /// Notes the start of a call (the first of concurrent ones) and
        /// sets the linger after it.
        pub fn note_begin(&self) {
            let now = (self.epoch.elapsed().as_nanos() as u64).max(1);
            let prev = self.last_begin.swap(now, Ordering::Relaxed);
            let gap = (prev != 0).then(|| Duration::from_nanos(now.saturating_sub(prev)));
            self.linger
                .store(linger_after(gap).as_nanos() as u64, Ordering::Relaxed);
        }
    }

    fn serve(h: &'static Helper) {
        loop {
            {
                let mut guard = h.sleep.lock().unwrap_or_else(|e| e.into_inner());
                // Sequentially consistent with `Hot::begin`: either that
                // call sees `awake` false and wakes the helper (if it gets
                // the lock; else see `Hot::begin`), or the helper sees its
                // `hot` here.
                h.awake.store(false, Ordering::SeqCst);
                while h.hot.load(Ordering::SeqCst) == 0 {
                    guard = h.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                h.awake.store(true, Ordering::SeqCst);
            }
            loop {
                poll(h);
                let linger = Duration::from_nanos(h.linger.load(Ordering::Relaxed));
                let idle_since = Instant::now();
                while h.hot.load(Ordering::SeqCst) == 0 && idle_since.elapsed() < linger {
                    std::thread::yield_now();
                }
                if h.hot.load(Ordering::SeqCst) == 0 {
                    break;
                }
            }
        }
    }

    /// Runs posted jobs while a call is under way.
    fn poll(h: &Helper) {
        let mut idle = 0u32;
        while h.hot.load(Ordering::Acquire) > 0 {
            // Read before trying to claim: a failed exchange would still
            // take the cache line from the poster.
            if h.state.load(Ordering::Relaxed) == POSTED
                && h.state
                    .compare_exchange(POSTED, CLAIMED, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                // SAFETY: a claimed job stays alive until DONE is seen by
                // its poster, which waits for it.
                let job = unsafe { &*h.job.load(Ordering::Acquire) };
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.work()));
                if run.is_err() {
                    job.panicked.store(true, Ordering::Relaxed);
                }
                h.state.store(DONE, Ordering::Release);
                idle = 0;
            } else {
                idle += 1;
                if idle.is_multiple_of(4096) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }

    /// Runs `job` here and, if it is free, on the helper too.
    pub(super) fn share(h: &Helper, job: &Job<'_>) {
        let posted = h
            .state
            .compare_exchange(EMPTY, FILLING, Ordering::Acquire, Ordering::Relaxed)
            .is_ok();
        if posted {
            // The lifetime is erased for the slot; the job is taken back,
            // or the helper seen done with it, before `share` returns or
            // unwinds (`Withdraw`).
            let ptr = job as *const Job<'_> as *mut Job<'static>;
            h.job.store(ptr, Ordering::Release);
            h.state.store(POSTED, Ordering::Release);
        }
        {
            // `then`, not `then_some`: a Withdraw built and dropped by a
            // caller that posted nothing would free another caller's slot.
            let _withdraw = posted.then(|| Withdraw(h));
            job.work();
        }
        assert!(
            !job.panicked.load(Ordering::Relaxed),
            "a task of the loss's helper thread panicked"
        );
    }

    /// Frees the slot of a posted job: takes it back if the helper has not
    /// claimed it, else waits until the helper is done with it.
    struct Withdraw<'a>(&'a Helper);

    impl Drop for Withdraw<'_> {
        fn drop(&mut self) {
            let h = self.0;
            if h.state
                .compare_exchange(POSTED, FILLING, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                while h.state.load(Ordering::Acquire) != DONE {
                    std::hint::spin_loop();
                }
            }
            h.job.store(std::ptr::null_mut(), Ordering::Relaxed);
            h.state.store(EMPTY, Ordering::Release);
        }
    }
}

/// While alive, the helper thread polls for work ([`share`]). Taken for
/// the length of a loss call that will share work, when libtorch has more
/// than one thread.
pub(crate) struct Hot(Option<&'static helper::Helper>);

impl Hot {
    pub(crate) fn begin(wanted: bool) -> Hot {
        if !wanted || tch::get_num_threads() < 2 {
            return Hot(None);
        }
        let h = helper::get();
        if let Some(h) = h {
            if h.hot.fetch_add(1, Ordering::SeqCst) == 0 {
                h.note_begin();
                // A helper still polling from the last call needs no
                // notice. Else taking the lock orders the notice after the
                // helper's wait (no lost wake-up). If it is busy, the helper
                // is awake or about to check `hot`; at worst it sleeps
                // through this call, whose work is then all done here.
                if !h.awake.load(Ordering::SeqCst) {
                    if let Ok(_guard) = h.sleep.try_lock() {
                        h.wake.notify_one();
                    }
                }
            }
        }
        Hot(h)
    }
}

impl Drop for Hot {
    fn drop(&mut self) {
        if let Some(h) = self.0 {
            h.hot.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// `f(i)` for every `i` in `0..n`, shared with the helper thread when a
/// [`Hot`] is alive (in any order; each index once), else here in order.
pub(crate) fn share(n: usize, f: &(dyn Fn(usize) + Sync)) {
    let job = helper::Job {
        f,
        n,
        next: std::sync::atomic::AtomicUsize::new(0),
        panicked: std::sync::atomic::AtomicBool::new(false),
    };
    match helper::polling() {
        Some(h) if n > 1 => helper::share(h, &job),
        _ => job.work(),
    }
}

/// Whether [`share`] would share work now.
pub(crate) fn sharing() -> bool {
    helper::polling().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn shared_work_visits_every_index_once_from_many_callers() {
        let _hot = Hot::begin(true);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for n in [0, 1, 2, 17, 1000] {
                        let counts: Vec<AtomicUsize> =
                            (0..n).map(|_| AtomicUsize::new(0)).collect();
                        share(n, &|i| {
                            counts[i].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1));
                        let rows = par_rows(n, 1 << 20, |i| i * 2);
                        assert_eq!(rows, (0..n).map(|i| i * 2).collect::<Vec<_>>());
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_frees_the_slot() {
        let _hot = Hot::begin(true);
        let run = std::panic::catch_unwind(|| {
            share(64, &|i| {
                if i == 40 {
                    panic!("task 40 fails");
                }
            })
        });
        assert!(run.is_err());
        let count = AtomicUsize::new(0);
        share(64, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn the_helper_lingers_only_between_calls_back_to_back() {
        use std::time::Duration;
        assert_eq!(helper::linger_after(None), Duration::ZERO);
        assert_eq!(
            helper::linger_after(Some(Duration::from_micros(400))),
            Duration::from_micros(600)
        );
        assert_eq!(
            helper::linger_after(Some(helper::BACK_TO_BACK)),
            Duration::ZERO
        );
        assert_eq!(
            helper::linger_after(Some(Duration::from_secs(1))),
            Duration::ZERO
        );
    }

    /// Whether, within a few seconds of calls, some task of a shared job
    /// runs on a thread other than the caller's.
    fn helper_takes_part(pause: std::time::Duration) -> bool {
        let me = std::thread::current().id();
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(pause);
            let _hot = Hot::begin(true);
            let elsewhere = AtomicUsize::new(0);
            let count = AtomicUsize::new(0);
            share(64, &|_| {
                let t = std::time::Instant::now();
                while t.elapsed() < std::time::Duration::from_micros(20) {
                    std::hint::spin_loop();
                }
                count.fetch_add(1, Ordering::Relaxed);
                if std::thread::current().id() != me {
                    elsewhere.fetch_add(1, Ordering::Relaxed);
                }
            });
            assert_eq!(count.load(Ordering::Relaxed), 64);
            if elsewhere.load(Ordering::Relaxed) > 0 {
                return true;
            }
        }
        false
    }

    #[test]
    fn the_helper_serves_calls_back_to_back_and_after_sleeping() {
        if tch::get_num_threads() < 2 {
            return;
        }
        assert!(helper_takes_part(std::time::Duration::ZERO));
        // Far apart: the helper sleeps between calls and is woken by each.
        assert!(helper_takes_part(std::time::Duration::from_millis(10)));
    }
}
