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
