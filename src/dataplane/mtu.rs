//! Host MTU detection against the kernel: lists links and hands them to the pure policy in
//! `desired::mtu`.

use rtnetlink::Handle;

use super::{DataplaneError, links};
use crate::desired::mtu::{LinkMtu, detect_host_mtu};

pub async fn host_mtu(handle: &Handle) -> Result<u32, DataplaneError> {
    let links: Vec<LinkMtu> = links::dump_links(handle)
        .await?
        .into_iter()
        .map(|l| LinkMtu {
            name: l.name,
            mtu: l.mtu,
            up: l.admin_up && l.oper_up,
        })
        .collect();
    Ok(detect_host_mtu(&links))
}
