//! Runs one driver's independent kernel requests concurrently over its netlink connection,
//! so a large change costs round trips in parallel rather than in sequence.

use futures::StreamExt;

use super::DataplaneError;

/// Requests in flight at once: enough to hide round trips, small enough to stay well under
/// the socket's receive buffer with every acknowledgement.
const IN_FLIGHT: usize = 64;

/// Runs every request; all are attempted even if some fail. Returns how many succeeded, or
/// a `Batch` error naming the first failure.
pub(crate) async fn run<F>(object: &'static str, requests: Vec<F>) -> Result<usize, DataplaneError>
where
    F: Future<Output = Result<(), DataplaneError>>,
{
    let total = requests.len();
    let results: Vec<_> = futures::stream::iter(requests)
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    let mut first = None;
    let mut failed = 0;
    for r in results {
        if let Err(e) = r {
            failed += 1;
            first.get_or_insert(e);
        }
    }
    match first {
        None => Ok(total),
        Some(first) if total == 1 => Err(first),
        Some(first) => Err(DataplaneError::Batch {
            object,
            failed,
            total,
            first: Box::new(first),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missing(device: &str) -> DataplaneError {
        DataplaneError::DeviceMissing {
            device: device.into(),
            what: "a test request".into(),
        }
    }

    #[tokio::test]
    async fn all_requests_run_and_the_count_is_returned() {
        let reqs: Vec<_> = (0..100).map(|_| async { Ok(()) }).collect();
        assert_eq!(run("route", reqs).await.unwrap(), 100);
    }

    #[tokio::test]
    async fn failures_do_not_stop_the_rest_and_are_counted() {
        let done = std::sync::atomic::AtomicUsize::new(0);
        let reqs: Vec<_> = (0..5)
            .map(|i| {
                let done = &done;
                async move {
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i % 2 == 0 {
                        Err(missing("vx"))
                    } else {
                        Ok(())
                    }
                }
            })
            .collect();
        let err = run("fdb", reqs).await.unwrap_err();
        assert_eq!(done.into_inner(), 5);
        match err {
            DataplaneError::Batch {
                object,
                failed,
                total,
                ..
            } => {
                assert_eq!((object, failed, total), ("fdb", 3, 5));
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[tokio::test]
    async fn a_lone_failure_is_returned_as_is() {
        let err = run("route", vec![async { Err(missing("tunl0")) }])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("device tunl0 is missing"), "{err}");
    }
}
