//! How the daemon's heap gives memory back. glibc's malloc, left alone, keeps what a burst
//! of allocations used: each thread may get an arena of its own, large blocks freed move its
//! mmap threshold up (so the next large buffers land in the heap and pin it), and freed
//! pages in the middle of a heap are only returned by `malloc_trim`. The initial lists of a
//! big cluster are such a burst (megabytes of JSON and objects that die once the caches are
//! built), so the daemon sets fixed limits before its threads start and trims once the
//! caches are filled, after each leader GC pass (which judges every allocation), and now
//! and then.

use std::time::Duration;

/// Between trims while running: rare enough to cost nothing measurable when idle.
pub const TRIM_EVERY: Duration = Duration::from_secs(600);

/// Arenas, at most: the daemon's threads mostly wait on the network.
const ARENA_MAX: i32 = 2;
/// Allocations of this size or more are mmapped (and unmapped on free); fixed, so a freed
/// list body does not raise the threshold and let the next one pin heap pages.
const MMAP_THRESHOLD: i32 = 128 * 1024;
/// Free memory at the top of the heap beyond this is returned at once.
const TRIM_THRESHOLD: i32 = 256 * 1024;

/// Sets the allocator limits; call before any thread is started.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocator parameters; called before threads.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Returns free heap pages to the kernel (every arena, not only the top of the heap).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only releases memory malloc holds free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims every `TRIM_EVERY` until `stopped`.
pub async fn trim_periodically(mut stopped: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stopped.wait_for(|s| *s) => return,
            _ = tick.tick() => trim(),
        }
    }
}
