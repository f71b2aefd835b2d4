//! Per-container locks: ADD, DEL and CHECK of one container run one at a time, while
//! different containers proceed in parallel. Entries vanish when nobody holds or waits.
//! Guards own their entry, so work that outlives a request (ADD's annotation patch) can
//! keep the container locked until it is done.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

type Entries = Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>;

#[derive(Default)]
pub(super) struct ContainerLocks {
    map: Entries,
}

pub(super) struct ContainerGuard {
    map: Entries,
    id: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl ContainerLocks {
    pub(super) async fn lock(&self, id: &str) -> ContainerGuard {
        let entry = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(id.to_string()).or_default().clone()
        };
        let guard = entry.lock_owned().await;
        ContainerGuard {
            map: self.map.clone(),
            id: id.to_string(),
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        // Only the map's own reference left: nobody holds or waits for this container.
        if map.get(&self.id).is_some_and(|m| Arc::strong_count(m) == 1) {
            map.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_container_is_serial_and_others_run_in_parallel() {
        let locks = Arc::new(ContainerLocks::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let max_same = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (locks, inside, max_same) = (locks.clone(), inside.clone(), max_same.clone());
            tasks.push(tokio::spawn(async move {
                let _g = locks.lock("c1").await;
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                max_same.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        // Another container is not held up by c1's queue.
        let other = tokio::time::timeout(Duration::from_millis(20), locks.lock("c2")).await;
        assert!(other.is_ok());
        drop(other);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(max_same.load(Ordering::SeqCst), 1);
        assert_eq!(locks.len(), 0, "entries are dropped when unused");
    }
}
