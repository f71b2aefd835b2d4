//! Waiting for a reflector store's first list from several tasks at once.
//!
//! kube-runtime's `Store::wait_until_ready` keeps one oneshot receiver behind a mutex, and
//! each poll replaces the waker it holds: when the list completes only the task that polled
//! last is woken, and every other waiter sleeps forever. The daemon's one Pod store has
//! three waiters (policy, the leader's GC, the post-list trim); a GC that never started was
//! how a deleted node's blocks stayed in the e2e run. Each waiter here polls again at a
//! short interval, so a missed wake-up costs at most that interval.

use std::time::Duration;

use kube::runtime::reflector::Store;
use kube::runtime::reflector::store::WriterDropped;

/// How late a waiter whose wake-up was taken by another may notice the store is ready.
const REPOLL: Duration = Duration::from_millis(50);

/// Completes once the store has its first full list (Err: its writer is gone).
pub async fn listed<K>(store: &Store<K>) -> Result<(), WriterDropped>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        if let Ok(r) = tokio::time::timeout(REPOLL, store.wait_until_ready()).await {
            return r;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;

    #[tokio::test]
    async fn every_waiter_sees_the_first_list() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let s = store.clone();
                tokio::spawn(async move { listed(&s).await })
            })
            .collect();
        // Every waiter has polled (and replaced the one registered waker) before the list.
        tokio::time::sleep(Duration::from_millis(20)).await;
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitDone);
        for w in waiters {
            let done = tokio::time::timeout(Duration::from_secs(2), w).await;
            assert!(matches!(done, Ok(Ok(Ok(())))), "a waiter missed the list");
        }
    }
}
